"""What ``model_type: full`` cannot do, refused from the spec alone, before any model loads.

A full fine-tune trains the transformer's own weights, so every setting that assumes frozen base
weights or an adapter beside them is refused with the fix (the quantised base is refused in
:func:`trainer_core.memory.check.check_memory_spec`, with the other precision checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..families.base import ModelFamily
    from ..spec import TrainSpec


def check_full_finetune(spec: TrainSpec, family_cls: type[ModelFamily]) -> list[str]:
    """Raise ConfigError for settings a full fine-tune cannot honour; return warnings."""
    if spec.model.model_type != "full":
        return []
    if not family_cls.supports_full_finetune:
        raise ConfigError(
            f"model_type 'full' is not available for {family_cls.name} yet",
            "use model_type 'lora' (or fine-tune lumina2)",
        )
    lora = spec.lora
    if lora.lora_type == "lycoris":
        raise ConfigError(
            "lora_type 'lycoris' (lycoris_config) trains an adapter, but model_type 'full' trains the weights "
            "themselves",
            "remove lycoris_config / set lora_type 'standard', or use model_type 'lora'",
        )
    if lora.use_dora:
        raise ConfigError(
            "use_dora trains a DoRA adapter, but model_type 'full' trains the weights themselves",
            "set use_dora false, or use model_type 'lora'",
        )
    if lora.init_lora:
        raise ConfigError(
            f"init_lora ({lora.init_lora}) starts a LoRA; model_type 'full' has no LoRA to start",
            "remove init_lora; to continue a fine-tune, point pretrained_model_name_or_path at its diffusers folder",
        )
    if spec.memory.enable_group_offload:
        raise ConfigError(
            "enable_group_offload moves the transformer's weights off the GPU between uses, but in a full "
            "fine-tune they are the trained weights: the optimizer would update copies on the wrong device",
            "set enable_group_offload false for model_type 'full' (use gradient_checkpointing and adamw_bf16 "
            "to save memory)",
        )
    warnings = []
    if spec.optimizer.max_grad_norm <= 0:
        warnings.append("model_type 'full' without gradient clipping (max_grad_norm 0): 1.0 is recommended")
    return warnings
