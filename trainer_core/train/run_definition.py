"""What defines a run, so that resuming in an output_dir trained with other settings is noticed.

Each checkpoint stores the run's *definition*: every setting that shapes what is learnt, under its
SimpleTuner key (a dataset's keys as ``<dataset id>.<key>``), plus each training dataset's file
count and content hash. On resume the definition of the new spec is compared with the checkpoint's,
after the dataset scan and before any model loads; a difference stops the run with every changed
key (old -> new) and the ways out (:func:`mismatch_error`).

What does not count, and why:

- where weights sit: offload, ``quantize_via``, VAE tiling/slicing, when latents are made
  (:data:`~trainer_core.spec.PLACEMENT_ONLY_MEMORY`), ``gradient_checkpointing`` (recomputes the
  same activations) and ``vae_batch_size``: turning offload on after an out-of-memory error
  continues the same run; so do ``ema_device`` and ``ema_cpu_only`` (where the EMA is kept and updated);
- validation, checkpointing, export and tracking settings, and ``output_dir``: every random draw of training
  step ``n`` is seeded by (seed, n), so renders between steps do not change the weights;
- cache folders (``cache_dir_vae``, a text_embeds dataset's ``cache_dir``): caches are keyed by
  content, so they hold the same latents wherever they are;
- the run length (``max_train_steps``, ``num_train_epochs``) when the LR schedule does not depend
  on it (``constant``, ``constant_with_warmup``): then the first N steps of a longer run are exactly
  the shorter run, and asking for more steps simply continues. Under ``cosine``, ``linear``,
  ``polynomial``... the length shapes every step's learning rate, so it counts.

``resume_with_changes: true`` continues deliberately anyway: the weights, optimizer moments and
step count come from the checkpoint, and the new settings apply from there on (a new learning
rate, a longer schedule). Settings that change what the checkpoint's tensors *are*
(:data:`FIXED_KEYS`: the model, the adapter's shape, the optimizer's kind) cannot be continued.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..errors import ConfigError
from ..spec import PLACEMENT_ONLY_MEMORY, TrainSpec

NOT_DEFINING_SECTIONS = ("validation", "checkpointing", "export", "tracking")
# lycoris_config is where the LyCORIS settings were read from; the settings themselves ("lycoris") define the run.
# ema_device / ema_cpu_only only say where the EMA's fp32 shadow sits and is updated (the same arithmetic):
# moving it to the CPU after an out-of-memory error continues the same run.
# CREPA's teacher cache, encoder batch and decode-only VAE change where and when its features are made, not them.
NOT_DEFINING_KEYS = frozenset(
    {
        *PLACEMENT_ONLY_MEMORY,
        "gradient_checkpointing",
        "vae_batch_size",
        "lycoris_config",
        "ema_device",
        "ema_cpu_only",
        "crepa_teacher_cache",
        "crepa_encoder_frames_batch_size",
        "crepa_drop_vae_encoder",
    }
)
NOT_DEFINING_DATASET_KEYS = frozenset({"cache_dir_vae", "cache_dir", "write_batch_size"})
TRAINING_TYPES = ("image", "video", "conditioning")

LENGTH_KEYS = ("max_train_steps", "num_train_epochs")
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")

# The LoRA target modules as the family resolved them (a preset or the family default), stored next
# to the spec's own peft_lora_target_modules / lora_target_preset, which may be None.
RESOLVED_TARGETS = "lora_target_modules (resolved)"

# Changing these would load the checkpoint's tensors into something they do not describe.
FIXED_KEYS = frozenset(
    {
        RESOLVED_TARGETS,
        "model_family",
        "model_flavour",
        "model_type",
        "lora_type",
        "use_dora",
        "lycoris",
        "lora_rank",
        "peft_lora_target_modules",
        "lora_target_preset",
        "optimizer",
        # CREPA's projector is in the checkpoint and its optimizer state: its presence and shape are fixed
        "crepa_enabled",
        "crepa_feature_source",
        "crepa_encoder",
    }
)


def run_definition(
    spec: TrainSpec | dict[str, Any], content: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Flat SimpleTuner key -> JSON value of everything that defines the run (see the module docstring).

    ``spec`` is a (resolved) TrainSpec or its JSON data (a checkpoint's ``spec.json``); ``content``
    is :func:`dataset_content` of the scanned dataset, when there is one.
    """
    data = spec.model_dump(mode="json") if isinstance(spec, TrainSpec) else spec
    out: dict[str, Any] = {}
    for section, values in data.items():
        if section in NOT_DEFINING_SECTIONS or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key not in NOT_DEFINING_KEYS:
                out[key] = value
    training = [d for d in data.get("datasets", []) if _is_training(d)]
    out["datasets"] = sorted(d["id"] for d in training)
    for d in training:
        for key, value in d.items():
            if key not in NOT_DEFINING_DATASET_KEYS and key != "id":
                out[f"{d['id']}.{key}"] = value
    for ds_id, facts in (content or {}).items():
        for key, value in facts.items():
            out[f"{ds_id}.{key}"] = value
    return out


def _is_training(d: dict[str, Any]) -> bool:
    return d.get("dataset_type", "image") in TRAINING_TYPES and not d.get("disabled")


def dataset_content(samples: list[Any]) -> dict[str, dict[str, Any]]:
    """Per dataset id: how many files it trains on and a hash of their content and captions.

    Built from the scanned samples (their content identity and captions), so adding, removing or
    replacing an image, or editing a caption, changes it; moving the folder does not.
    """
    per: dict[str, list[str]] = {}
    for smp in samples:
        for s in (smp, getattr(smp, "reference", None)):
            if s is not None:
                per.setdefault(s.dataset_id, []).append(f"{s.path.name}\0{s.identity}\0" + "\0".join(s.captions))
    return {
        ds: {"files": len(items), "content": hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]}
        for ds, items in sorted(per.items())
    }


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for each defining key that differs, in key order.

    Only keys both definitions have are compared: a key added to the spec after the checkpoint was
    written (or one the checkpoint did not record) cannot be told apart from its default. The set of
    datasets is one key, so a dataset added or removed is still seen.
    """
    length_matters = not (
        old.get("lr_scheduler") in LENGTH_FREE_SCHEDULES and new.get("lr_scheduler") in LENGTH_FREE_SCHEDULES
    )
    out = []
    for key in sorted(old.keys() & new.keys()):
        if key in LENGTH_KEYS and not length_matters:
            continue
        if old[key] != new[key]:
            out.append((key, old[key], new[key]))
    return out


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe(diff: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {key}: {_show(a)} -> {_show(b)}" for key, a, b in diff)


def mismatch_error(checkpoint: str, output_dir: str, diff: list[tuple[str, Any, Any]]) -> ConfigError:
    """The stop when a resume would train on top of weights made with other settings."""
    fixed = [key for key, _, _ in diff if key in FIXED_KEYS]
    choices = [
        "another output_dir, to keep that run and train this one from the start;",
        f"start over in this output_dir: resume_from_checkpoint '' (Train LoRA: mode 'restart'); delete "
        f"{output_dir}/checkpoints too, so that no old checkpoint is left to resume later;",
    ]
    if fixed:
        choices.append(f"continuing that run is not possible: {', '.join(fixed)} changed what its weights are.")
    else:
        choices.append(
            "continue that run with the new settings on purpose: resume_with_changes true (in the "
            "comfyui_tuner block of a SimpleTuner config; Train LoRA: mode 'continue with changes')."
        )
    return ConfigError(
        f"output_dir {output_dir} holds a run trained with other settings; checkpoint {checkpoint} differs in:\n"
        f"{describe(diff)}\nResuming would train on top of weights made with the old settings.",
        "choose one:\n  - " + "\n  - ".join(choices),
    )


def refuse_fixed(checkpoint: str, diff: list[tuple[str, Any, Any]]) -> ConfigError | None:
    """With resume_with_changes: the error for changes that cannot be continued, or None."""
    fixed = [(k, a, b) for k, a, b in diff if k in FIXED_KEYS]
    if not fixed:
        return None
    return ConfigError(
        f"resume_with_changes cannot continue checkpoint {checkpoint}: these settings change what its weights "
        f"are:\n{describe(fixed)}",
        "set them back, or start over (resume_from_checkpoint '', or another output_dir)",
    )
