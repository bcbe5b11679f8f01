"""Fill the family-dependent blanks of a TrainSpec and check it, before anything heavy loads.

A typo must not cost a 14 GB model load, so everything that can be checked from the spec and the
files on disk is checked here.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..families import ModelFamily, get_family_class
from ..memory.check import check_memory_spec
from ..routing.crepa import check_crepa
from ..routing.tread import check_tread
from ..spec import TrainSpec
from ..tracking import check_tracking
from .evaluation import check_evaluation
from .fullft_checks import check_full_finetune
from .lowmem_optim import check_available as check_optimizer_available
from .lowmem_optim import check_device as check_optimizer_device


def resolve_spec(spec: TrainSpec, device: torch.device | str | None = None) -> tuple[TrainSpec, ModelFamily, list[str]]:
    """Return (a copy of spec with family defaults filled, the bound family, warnings).

    ``device`` is the training device, for the memory options that depend on it (CUDA streams);
    None means "CUDA if this machine has it", as ``pick_device`` chooses. Impossible memory
    combinations are refused here, before the family is even constructed, so every entry point
    (engine, nodes, CLI) rejects them before anything loads; the warnings for ignored memory
    options are returned with the others for the caller to log.
    """
    family_cls = get_family_class(spec.model.model_family)
    family_cls.get_flavour(spec.model.model_flavour)  # unknown flavour fails here
    d = family_cls.defaults
    warnings: list[str] = []
    s = spec.model_copy(deep=True)
    s.model.model_family = family_cls.name
    s.model.model_flavour = s.model.model_flavour or family_cls.default_flavour
    if s.model.tokenizer_max_length is None:
        s.model.tokenizer_max_length = d.tokenizer_max_length
    if s.optimizer.learning_rate is None:
        s.optimizer.learning_rate = d.learning_rate
    if s.training.flow_schedule_shift is None and not s.training.flow_schedule_auto_shift:
        if d.auto_shift:
            s.training.flow_schedule_auto_shift = True
        else:
            s.training.flow_schedule_shift = d.train_shift
    if s.training.aspect_bucket_alignment is None:
        s.training.aspect_bucket_alignment = family_cls.bucket_alignment
    elif s.training.aspect_bucket_alignment % family_cls.bucket_alignment:
        warnings.append(
            f"aspect_bucket_alignment {s.training.aspect_bucket_alignment} is not a multiple of "
            f"{family_cls.bucket_alignment}, which {family_cls.name} needs; using {family_cls.bucket_alignment}"
        )
        s.training.aspect_bucket_alignment = family_cls.bucket_alignment
    v = s.validation
    if v.validation_guidance is None:
        v.validation_guidance = d.validation_guidance
    if v.validation_resolution is None:
        v.validation_resolution = d.validation_resolution
    if v.validation_negative_prompt is None:
        v.validation_negative_prompt = d.validation_negative_prompt
    for ds in s.datasets:
        if ds.dataset_type not in ("image", "video"):
            continue
        if ds.resolution is None:
            ds.resolution = float(d.resolution)
        if ds.resolution_type is None:
            ds.resolution_type = d.resolution_type  # type: ignore[assignment]

    if not s.training_datasets:
        raise ConfigError(
            "no image dataset is configured (or all are disabled)",
            "add an entry with dataset_type 'image' (or 'video') and instance_data_dir to the dataloader config",
        )
    videos = [ds.id for ds in s.video_datasets]
    if videos and not family_cls.supports_video:
        raise ConfigError(
            f"{family_cls.name} trains on images, but dataset(s) {', '.join(videos)} are video datasets",
            "use model_family 'kandinsky5-video' for video, or set dataset_type 'image'",
        )
    if s.training.max_train_steps is None and s.training.num_train_epochs is None:
        raise ConfigError("set max_train_steps or num_train_epochs", "e.g. max_train_steps: 1000")
    check_optimizer_available(s.optimizer.optimizer)  # a missing optimizer package fails before the model loads
    check_tracking(s)  # so does a missing tracker package (report_to)
    check_optimizer_device(s.optimizer.optimizer, device)
    if s.model.model_type == "lora" and s.lora.lora_type == "lycoris":
        from ..lora.lycoris import network_settings  # its refusals, before any model loads

        network_settings(s.lora, quantised=s.memory.base_model_precision != "no_change")
    warnings += check_memory_spec(s, device)  # a quantised base for a full fine-tune is refused here
    warnings += check_full_finetune(s, family_cls)
    family = family_cls(s)
    warnings += family.check_spec()
    paired = [ds.id for ds in s.training_datasets if ds.conditioning_data]
    if paired and not family.uses_reference_images:
        raise ConfigError(
            f"dataset(s) {', '.join(paired)} pair reference images (conditioning_data), but "
            f"{family.name} {family.flavour.name!r} does not edit images",
            "use model_family 'kandinsky5-image' with an i2i flavour (i2i-lite-sft), or remove conditioning_data",
        )
    warnings += check_tread(s, family_cls)
    warnings += check_crepa(s, family_cls)
    warnings += check_evaluation(s)
    s.validation_prompts()  # a broken user_prompt_library fails now, not at the first validation
    return s, family, warnings
