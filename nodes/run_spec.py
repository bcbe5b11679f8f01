"""Assemble one TrainSpec from the fragments the nodes pass along, and name its run folder.

TrainSpec is the one source of truth (DESIGN.md): every node only contributes a fragment shaped
like part of a TrainSpec, and this module merges them in a fixed order:

    imported SimpleTuner spec (if any) < model < datasets < optimizer < validation < memory < TREAD
    routes < adapter < regularisers < Train LoRA widgets

The adapter fragment (Adapter Settings) names the adapter type in full, so it replaces an imported
config's LoRA/DoRA/LyCORIS choice rather than mixing with it.

A widget set to 0 (or -1 for the seed) keeps what the fragments say, so an imported config is not
silently overwritten by a widget's default.

The run folder is named after a hash of everything that shapes the training trajectory, which is
what makes re-queueing predictable: the step count, validation, checkpoint, export and tracking
settings are left out (trackers only read the run's events), so asking for more steps (or other
validation prompts, or a tracker) finds the same folder and the engine continues from its latest
checkpoint; changing anything else (rank, learning rate, captions, the files in a dataset folder,
quantisation, TREAD routes...) names a new folder and trains from scratch, never on top of an
incompatible checkpoint. Offloading and VAE memory options only change where weights sit, not what
is learnt, so they are left out too: turning group offload on after an out-of-memory error
continues the same run. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..trainer_core.errors import ConfigError
from ..trainer_core.io_utils import stable_hash
from ..trainer_core.spec import (
    PLACEMENT_ONLY_MEMORY,
    CrepaSpec,
    DatasetSpec,
    LoraSpec,
    MemorySpec,
    ModelSpec,
    OptimizerSpec,
    RoutingSpec,
    ScheduledSamplingSpec,
    TrainingSpec,
    TrainSpec,
    ValidationSpec,
    build_spec,
    format_validation_error,
)

Fragment = dict[str, Any]

_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSpec,
    "lora": LoraSpec,
    "optimizer": OptimizerSpec,
    "training": TrainingSpec,
    "validation": ValidationSpec,
    "memory": MemorySpec,
    "routing": RoutingSpec,
    "scheduled_sampling": ScheduledSamplingSpec,
    "crepa": CrepaSpec,
}
CAPTION_SUFFIXES = (".txt", ".caption")
TEXT_EMBEDS_ID = "text-embeds"
# dataset types a Build Dataset node makes: what the model trains on, and reference images for image editing
TRAINING_TYPES = ("image", "video", "conditioning")


def family_defaults(field: str) -> str:
    """Each registered family's default for ``field`` (a FamilyDefaults attribute), for tooltips."""
    from ..trainer_core.families import family_names, get_family_class

    return ", ".join(f"{name}: {getattr(get_family_class(name).defaults, field):g}" for name in family_names())


def checked(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Validate one section now, so a bad value is reported on the node that set it."""
    model = _SECTIONS[section]
    try:
        model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(f"invalid {section} settings:\n{format_validation_error(e)}") from None
    return dict(values)


def checked_dataset(values: dict[str, Any]) -> dict[str, Any]:
    try:
        DatasetSpec.model_validate(values)
    except ValidationError as e:
        raise ConfigError(f"invalid dataset {values.get('id')!r}:\n{format_validation_error(e)}") from None
    return dict(values)


def unique_dataset_ids(datasets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give chained datasets distinct ids (``photos``, ``photos-2``...), as TrainSpec requires.

    A conditioning (reference) dataset comes right before the image dataset that names it in
    ``conditioning_data``, so a renamed reference dataset is followed by its image dataset.
    """
    seen: set[str] = set()
    renamed: dict[str, str] = {}
    out = []
    for ds in datasets:
        ds = dict(ds)
        base, n = ds["id"], 2
        while ds["id"] in seen:
            ds["id"] = f"{base}-{n}"
            n += 1
        seen.add(ds["id"])
        if ds.get("dataset_type") == "conditioning":
            renamed[base] = ds["id"]
        elif ds.get("conditioning_data") in renamed:
            ds["conditioning_data"] = renamed[ds["conditioning_data"]]
        out.append(ds)
    return out


def merge_fragments(
    base: Fragment | None,
    *,
    model: Fragment | None = None,
    datasets: list[dict[str, Any]] | None = None,
    sections: Sequence[Fragment | None] = (),
) -> dict[str, Any]:
    """The merged spec as a plain dict (not validated yet).

    Connected datasets replace the base spec's image and video datasets (its text-embedding entry
    stays); section fragments update the base section key by key (a connected TREAD Route replaces
    the whole ``tread_config``).
    """
    spec = copy.deepcopy(base or {})
    for fragment in [model, *sections]:
        for key, values in (fragment or {}).items():
            if isinstance(values, dict):
                spec.setdefault(key, {}).update(values)
            else:
                spec[key] = copy.deepcopy(values)
    if datasets:
        kept = [d for d in spec.get("datasets", []) if d.get("dataset_type", "image") not in TRAINING_TYPES]
        spec["datasets"] = unique_dataset_ids(list(datasets)) + kept
    return spec


def apply_widgets(
    spec: dict[str, Any],
    *,
    steps: int = 0,
    rank: int = 0,
    alpha: float = 0.0,
    learning_rate: float = 0.0,
    seed: int = -1,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """Train LoRA's (and Fine-tune Model's) widgets over the merged fragments; 0 (seed: -1) keeps the fragments'
    value."""
    spec = copy.deepcopy(spec)
    training = spec.setdefault("training", {})
    if steps > 0:
        training["max_train_steps"] = int(steps)
        training["num_train_epochs"] = None
    if seed >= 0:
        training["seed"] = int(seed)
    lora = spec.setdefault("lora", {})
    if rank > 0:
        lora["lora_rank"] = int(rank)
    if alpha > 0:
        lora["lora_alpha"] = float(alpha)
    if learning_rate > 0:
        spec.setdefault("optimizer", {})["learning_rate"] = float(learning_rate)
    if checkpoint_every > 0:
        spec.setdefault("checkpointing", {})["checkpoint_step_interval"] = int(checkpoint_every)
    return spec


def validate(spec: dict[str, Any]) -> TrainSpec:
    """The merged dict as a TrainSpec; a bad value fails with the option named."""
    if not (spec.get("training") or {}).get("max_train_steps") and not (spec.get("training") or {}).get(
        "num_train_epochs"
    ):
        raise ConfigError("set steps on the training node", "or connect an imported config that sets max_train_steps")
    return build_spec(spec, source="training settings")


# ---------------------------------------------------------------------- run identity
def dataset_content_fingerprint(folder: str | Path) -> str:
    """Identity of a dataset folder's contents: every file's path and size, captions by content.

    Adding, removing or replacing an image, or editing a caption, changes it; copying the folder
    or touching files (new modification times) does not, so a checkout elsewhere still resumes.
    """
    root = Path(folder).expanduser()
    h = hashlib.sha256()
    if not root.is_dir():
        return "missing"
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode())
        if path.suffix.lower() in CAPTION_SUFFIXES:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


# Settings added after run folders were first named ("": top-level sections). A run that leaves them
# at their defaults trains as it did before they existed, so they are left out of its hash and a graph
# queued again after an update continues its run. Add every new trajectory-shaping setting here.
ADDED_LATER: dict[str, tuple[str, ...]] = {
    "": ("crepa", "scheduled_sampling"),
    "lora": ("use_dora", "lycoris_config", "lycoris"),
    "training": ("ema_device", "ema_cpu_only", "ema_update_interval"),
}


def _section_default(name: str) -> dict[str, Any]:
    return TrainSpec.model_fields[name].default_factory().model_dump(mode="json")  # type: ignore[misc]


def _drop_later_defaults(data: dict[str, Any]) -> None:
    for section, keys in ADDED_LATER.items():
        for key in keys:
            have = data if not section else data.get(section, {})
            default = _section_default(key) if not section else _section_default(section).get(key)
            if key in have and have[key] == default:
                del have[key]


def run_identity(spec: TrainSpec) -> str:
    """A hash of everything that shapes the training trajectory (see the module docstring)."""
    data = spec.model_dump(mode="json")
    for key in ("output_dir", "export", "validation", "checkpointing", "tracking"):
        data.pop(key, None)
    data["training"].pop("max_train_steps", None)
    data["training"].pop("num_train_epochs", None)
    for key in PLACEMENT_ONLY_MEMORY:
        data["memory"].pop(key, None)
    _drop_later_defaults(data)
    for ds in data["datasets"]:
        ds.pop("cache_dir_vae", None)
        ds.pop("cache_dir", None)
        if ds.get("dataset_type") in TRAINING_TYPES and ds.get("instance_data_dir"):
            ds["content"] = dataset_content_fingerprint(ds["instance_data_dir"])
    return stable_hash(data)[:12]


def slug(name: str, default: str = "lora") -> str:
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", name.strip()).strip("_")[:60]
    return text or default


def place_run(
    spec: TrainSpec, *, root: Path, loras_dir: Path, name: str, models_dir: Path | None = None
) -> tuple[TrainSpec, str]:
    """Point the spec at its run folder, the shared caches and ComfyUI's loras folder.

    Caches are shared between runs (``root/cache``): their keys already say which model, caption
    and crop produced an entry, so another run on the same data reuses them. The file name carries
    the run id so two runs never overwrite each other's file in ``loras/``. A full fine-tune
    (``model_type: full``) writes no LoRA: its ComfyUI diffusion-model file goes to ``models_dir``
    (``diffusion_models/comfyui-tuner``) instead.
    """
    run_id = run_identity(spec)
    data = spec.model_dump(mode="json")
    data["output_dir"] = str(root / f"{slug(name)}-{run_id}")
    full = spec.model.model_type == "full"
    data["export"] = {
        **data.get("export", {}),
        "comfyui_lora_dir": None if full else str(loras_dir),
        "comfyui_model_dir": str(models_dir) if full and models_dir is not None else None,
        "output_name": f"{slug(name)}_{run_id[:8]}",
    }
    datasets = data["datasets"]
    if not any(d.get("dataset_type") == "text_embeds" and not d.get("disabled") for d in datasets):
        datasets.append(
            {
                "id": TEXT_EMBEDS_ID,
                "dataset_type": "text_embeds",
                "default": True,
                "cache_dir": str(root / "cache" / "text"),
            }
        )
    for ds in datasets:
        if ds.get("dataset_type") in ("image", "video") and not ds.get("cache_dir_vae"):
            where = hashlib.sha256(str(ds.get("instance_data_dir")).encode()).hexdigest()[:8]
            ds["cache_dir_vae"] = str(root / "cache" / "vae" / f"{slug(ds['id'])}-{where}")
    return build_spec(data, source="training settings"), run_id
