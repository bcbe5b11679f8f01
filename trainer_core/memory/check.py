"""Checking the memory options before any model loads (a typo must not cost a 14 GB load).

Decisions, so they are written down once:

* torchao is optional: a torchao precision without torchao installed is a ConfigError naming
  ``pip install torchao``; quanto ships as a dependency but is checked the same way.
* ``enable_group_offload`` with ``enable_model_cpu_offload``: refused, both keys named. They are
  two answers to the same question (SimpleTuner refuses the pair too).
* ``group_offload_use_stream`` without a CUDA training device: refused (streams are a CUDA feature;
  silently ignoring it would hide a misconfigured device).
* ``group_offload_use_stream`` with ``gradient_checkpointing``: allowed, streams turned off with a
  warning. Recomputation runs blocks in reverse order during backward, so prefetching "the next
  block" fetches the wrong one; SimpleTuner disables streams in this case too, and refusing would
  reject configs SimpleTuner accepts (its Kandinsky 5 examples set both).
* Options that only matter with group offload (``group_offload_*``) are ignored with a warning
  when ``enable_group_offload`` is off.
* A quantised base needs a LoRA: full fine-tuning cannot update frozen int8/fp8 weights.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..spec import TrainSpec
from .quantize import NO_CHANGE, backend_available, backend_of, missing_backend_error

PRECISION_KEYS = ("base_model_precision", "text_encoder_1_precision", "text_encoder_2_precision")


def _device_is_cuda(device: torch.device | str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def use_stream(spec: TrainSpec, device: torch.device | str | None) -> bool:
    """Whether group offload really uses CUDA streams (after the rules above)."""
    m = spec.memory
    return (
        m.enable_group_offload
        and m.group_offload_use_stream
        and _device_is_cuda(device)
        and not spec.training.gradient_checkpointing
    )


def check_memory_spec(spec: TrainSpec, device: torch.device | str | None = None) -> list[str]:
    """Raise ConfigError for impossible memory options; return warnings for ignored ones.

    ``device`` is the training device; None means "CUDA if this machine has it".
    """
    m = spec.memory
    warnings: list[str] = []
    for key in PRECISION_KEYS:
        precision = getattr(m, key)
        backend = backend_of(precision)
        if backend is not None and not backend_available(backend):
            raise missing_backend_error(key, precision)
    if m.base_model_precision != NO_CHANGE and spec.model.model_type == "full":
        raise ConfigError(
            f"base_model_precision {m.base_model_precision!r} freezes the base weights, so model_type 'full' "
            "has nothing to train",
            "use model_type 'lora', or base_model_precision 'no_change'",
        )
    if m.enable_group_offload and m.enable_model_cpu_offload:
        raise ConfigError(
            "enable_group_offload and enable_model_cpu_offload cannot be used together",
            "keep one: enable_group_offload (less memory while training) or enable_model_cpu_offload "
            "(less memory while validating)",
        )
    if m.enable_group_offload:
        if m.group_offload_use_stream and not _device_is_cuda(device):
            raise ConfigError(
                "group_offload_use_stream needs a CUDA GPU, and this run trains on "
                f"{torch.device(device).type if device is not None else 'the CPU'}",
                "set group_offload_use_stream false (group offload itself still works)",
            )
        if m.group_offload_use_stream and spec.training.gradient_checkpointing:
            warnings.append(
                "group_offload_use_stream is turned off because gradient_checkpointing is on: recomputation "
                "runs the blocks in reverse order, so prefetching would fetch the wrong block"
            )
        if m.group_offload_type == "leaf_level" and m.group_offload_blocks_per_group != 1:
            warnings.append("group_offload_blocks_per_group is ignored with group_offload_type 'leaf_level'")
    else:
        stray = [
            k for k in ("group_offload_use_stream", "group_offload_text_encoder", "group_offload_vae") if getattr(m, k)
        ]
        if stray:
            warnings.append(f"{', '.join(stray)} only apply with enable_group_offload, which is off: ignored")
    for key in ("text_encoder_1_precision", "text_encoder_2_precision"):
        if getattr(m, key) != NO_CHANGE:
            kandinsky = spec.model.model_family.startswith("kandinsky")
            note = " Quantising Kandinsky 5's Qwen2.5-VL is discouraged." if kandinsky else ""
            warnings.append(
                f"{key} {getattr(m, key)!r}: the cached text embeddings will differ from the full-precision ones "
                f"the model sees at inference (they are cached under a separate key).{note}"
            )
    return warnings
