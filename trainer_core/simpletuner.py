"""Read and write SimpleTuner configs (``config.json`` + ``multidatabackend.json``).

Our users arrive with SimpleTuner quick-start configs, so importing one must give the run it
describes in SimpleTuner, and exporting a spec must give a config SimpleTuner accepts. The
:class:`~trainer_core.spec.TrainSpec` field names *are* SimpleTuner's keys, grouped in sections, so
the flat-key -> section mapping is derived from the pydantic models at call time: a field added to
a section later is imported and exported without touching this module. Only what the models
cannot know is written down here:

- :data:`KEY_ALIASES`: older SimpleTuner spellings of a key (its own example configs still use
  ``validation_steps``; pre-2025-04 configs use ``flux_schedule_*``).
- :data:`GLOBAL_DATASET_KEYS`: top-level keys SimpleTuner applies to every dataset lacking them.
- :data:`SIMPLETUNER_DEFAULTS` / :data:`SIMPLETUNER_DATASET_DEFAULTS`: keys whose SimpleTuner
  default differs from ours, so a config that omits them still means what it means in SimpleTuner,
  and an export always states them.
- :data:`TUNER_ONLY_KEYS`: our options SimpleTuner lacks. SimpleTuner's argparse rejects unknown
  flags, but it ignores dict-valued keys in ``config.json``, so these travel in a
  ``"comfyui_tuner": {...}`` block.

Everything else SimpleTuner knows but we do not (eval loss, U-REPA...) is listed in one
warning and ignored, never dropped silently. Three kinds of key stop the import instead, each with
one :class:`~trainer_core.errors.ConfigError` naming the key as the user wrote it:

- a key neither SimpleTuner nor we know (a typo such as ``learning_rat``, which would otherwise
  train at the default learning rate): "did you mean learning_rate?". SimpleTuner's own key list
  is :mod:`trainer_core.simpletuner_keys`;
- an adapter option that would change what is trained (:data:`ADAPTER_REFUSALS`: SingLoRA,
  PiSSA-style initialisation, slider targets): ignoring it would give a plain LoRA while the user
  asked for something else;
- a ``lycoris_config`` file with a key or algorithm we cannot train (:mod:`.simpletuner_lycoris`).

``use_dora`` and ``lora_type: lycoris`` are trained. The LyCORIS settings live in their own JSON
file in SimpleTuner (``lycoris_config``); import reads that file (next to config.json first, then
the current directory) into ``lora.lycoris``, and :func:`write_simpletuner` writes
``lycoris_config.json`` next to the exported config.
- an invalid value.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from . import simpletuner_keys
from . import simpletuner_lycoris as lycoris_file
from .errors import ConfigError
from .spec import TrainSpec, unknown_key_note

logger = logging.getLogger(__name__)

# Older SimpleTuner spellings -> the current key (= our field name).
KEY_ALIASES: dict[str, str] = {
    # Still accepted by SimpleTuner as legacy keys; its lumina2.peft-lora example uses validation_steps.
    "validation_steps": "validation_step_interval",
    "checkpointing_steps": "checkpoint_step_interval",
    "save_total_limit": "checkpoints_total_limit",
    # Renamed flux_* -> flow_*; the old names were removed from SimpleTuner in April 2025.
    "flux_schedule_shift": "flow_schedule_shift",
    "flux_schedule_auto_shift": "flow_schedule_auto_shift",
    "flux_use_uniform_schedule": "flow_use_uniform_schedule",
    "flow_matching_sigmoid_scale": "flow_sigmoid_scale",
    # CrepaRegularizer reads crepa_model first, then crepa_encoder (the registry's key); OPTIONS.md documents both.
    "crepa_model": "crepa_encoder",
}

# SimpleTuner reads ``disable`` as ``disabled`` in a dataset entry.
DATASET_KEY_ALIASES: dict[str, str] = {"disable": "disabled"}

# Top-level config keys that fill every image dataset that lacks them. SimpleTuner does this today for
# resolution, resolution_type, minimum/maximum_image_size, target_downsample_size, caption_strategy,
# instance_prompt and prepend_instance_prompt; crop, crop_style and crop_aspect were global options
# until March 2024, so older configs still carry them at the top level.
GLOBAL_DATASET_KEYS: tuple[str, ...] = (
    "resolution",
    "resolution_type",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "caption_strategy",
    "instance_prompt",
    "prepend_instance_prompt",
    "crop",
    "crop_style",
    "crop_aspect",
)

# SimpleTuner's argparse defaults (its field registry) where they differ from ours and do not depend on
# the model family. Import fills them when a config omits the key; export always writes the key.
# Left out on purpose because SimpleTuner's own sources disagree: model_type (registry "full", OPTIONS.md
# "lora"; export always writes it anyway) and caption_dropout_probability (registry 0.1, its tooltip 0).
# Family-dependent defaults (learning_rate, flow_schedule_shift, validation_guidance) stay None so the
# family picks them, as SimpleTuner's model classes do.
SIMPLETUNER_DEFAULTS: dict[str, Any] = {
    "lr_scheduler": "constant_with_warmup",
    "lr_power": 0.8,
    "lr_end": 4e-7,
    "lora_dropout": 0.1,
    "train_batch_size": 4,
    "max_grad_norm": 2.0,
    "grad_clip_method": "value",
}

SIMPLETUNER_EVALUATION_MODEL = "openai/clip-vit-large-patch14-336"

# Same idea for dataset entries (SimpleTuner's factory defaults), applied to image datasets only.
SIMPLETUNER_DATASET_DEFAULTS: dict[str, Any] = {
    "caption_strategy": "filename",
    "crop_style": "random",
}

# Our options that SimpleTuner has no flag for; exported inside TUNER_BLOCK so SimpleTuner ignores them.
# enable_model_cpu_offload is diffusers' pipeline option; SimpleTuner (bc8e6ab) has no such config key.
TUNER_ONLY_KEYS: frozenset[str] = frozenset(
    {
        "system_prompt",
        "lora_target_preset",
        "dataloader_seed_offset",
        "comfyui_lora_dir",
        "comfyui_model_dir",
        "output_name",
        "resume_with_changes",
        "enable_model_cpu_offload",
        "crepa_teacher_cache",
        # CrepaRegularizer reads it (getattr) and VIDEO_CREPA.md calls it "config only", but no field of SimpleTuner's
        # registry defines it, so its argparse refuses it: exported in our block.
        "crepa_cumulative_neighbors",
    }
)
TUNER_BLOCK = "comfyui_tuner"
# Marks an exported ``peft_lora_target_modules`` as the family's default targets written out for SimpleTuner
# (see _export_family_targets); import gives the spec back its "family default" (None).
FAMILY_TARGETS_MARK = "lora_targets_are_family_default"

# Always written by export: SimpleTuner needs them to start at all.
_ALWAYS_EXPORTED = ("model_family", "model_flavour", "output_dir", "model_type")

# How SimpleTuner spells "unset" for keys whose None we must still export.
_EXPORT_NONE_AS: dict[str, Any] = {"resume_from_checkpoint": "", "max_train_steps": 0, "num_train_epochs": 0}
# SimpleTuner defaults num_train_epochs to 1, so both run lengths are always written (0 = unset).
_ALWAYS_EXPORTED_COUNTS = ("max_train_steps", "num_train_epochs")

_NONE_WORDS = {"", "none", "null"}
_EMBED_DATASET_TYPES = {"text_embeds", "image_embeds", "conditioning_image_embeds", "caption"}
_DROP = object()  # sentinel: use the field's default

UNSUPPORTED_MESSAGE = "These SimpleTuner options are not supported yet and were ignored: "
UNKNOWN_MESSAGE = "has keys that neither SimpleTuner nor comfyui-tuner knows"


def _truthy(value: Any) -> bool:
    """A flag's value as SimpleTuner's config loader reads it ("false", "0", "" and null are off)."""
    if isinstance(value, str):
        return value.strip().lower() not in {"", "0", "false", "no", "off", "none", "null"}
    return bool(value)


def _choice(default: str) -> Callable[[Any], bool]:
    """True when a choice key asks for something other than ``default`` (null and "" mean the default)."""

    def asks_other(value: Any) -> bool:
        text = "" if value is None else str(value).strip().lower()
        return text not in ("", default)

    return asks_other


@dataclass(frozen=True)
class _Refusal:
    """A SimpleTuner adapter option we cannot train: ``asks(value)`` says whether the config uses it."""

    asks: Callable[[Any], bool]
    what: str  # what the option would have trained, for the message
    default: str  # SimpleTuner's default as JSON: the value that trains a plain LoRA


# SimpleTuner adapter options that change *what* is trained. Ignoring one would silently train a plain
# LoRA instead, so a config that turns one on is refused until it is implemented; one left at
# SimpleTuner's default means what we do and is accepted without a word. (use_dora and
# lora_type: lycoris are trained: see _import_adapter.)
ADAPTER_REFUSALS: dict[str, _Refusal] = {
    "peft_lora_mode": _Refusal(_choice("standard"), "a SingLoRA adapter", '"standard"'),
    "lora_init_type": _Refusal(
        _choice("default"), "a LoRA initialised another way (PiSSA, OLoRA, LoftQ, gaussian)", '"default"'
    ),
    "slider_lora_target": _Refusal(_truthy, "a slider LoRA with its own target modules", "false"),
}


# CREPA modes that take their teacher from elsewhere than a DINOv2 encoder, or change the projector: ignoring one
# would train another regulariser than the config asks for. Left at SimpleTuner's default, they are accepted.
CREPA_SOURCE_ALIASES = {"external": "encoder", "internal": "backbone", "selfflow": "self_flow"}
CREPA_REFUSALS: dict[str, _Refusal] = {
    "crepa_feature_source": _Refusal(
        lambda v: isinstance(v, str) and CREPA_SOURCE_ALIASES.get(v.strip().lower(), v.strip().lower()) == "self_flow",
        "CREPA's Self-Flow teacher (an EMA cleaner view)",
        '"encoder" or "backbone"',
    ),
    "crepa_self_flow": _Refusal(_truthy, "CREPA's Self-Flow teacher (an EMA cleaner view)", "false"),
    "irepa_enabled": _Refusal(_truthy, "iREPA's convolutional projector and spatial normalisation", "false"),
}


@dataclass
class ImportResult:
    """What :func:`import_simpletuner` made of a SimpleTuner config."""

    spec: TrainSpec
    warnings: list[str] = field(default_factory=list)  # human-readable; one lists every unsupported key
    unsupported_keys: list[str] = field(default_factory=list)  # sorted; dataset keys as "<id>.<key>"


@dataclass(frozen=True)
class _Slot:
    """Where a flat SimpleTuner key lives in TrainSpec: ``section`` None means a top-level field."""

    section: str | None
    name: str
    info: FieldInfo


# ----------------------------------------------------------------------------- mapping from the models
def _model_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _list_model_class(annotation: Any) -> type[BaseModel] | None:
    if get_origin(annotation) is list:
        args = get_args(annotation)
        return _model_class(args[0]) if args else None
    return None


def _holds_model(annotation: Any) -> bool:
    """A field holding a nested settings model (``lora.lycoris``): SimpleTuner keeps those in a file of their own."""
    return any(_model_class(m) is not None for m in _union_members(annotation))


def _slots() -> dict[str, _Slot]:
    """Flat key -> slot, read from TrainSpec's sections so new fields need no change here.

    A nested settings block inside a section (``lora.lycoris``) is no flat key: SimpleTuner reads it
    from the file ``lycoris_config`` names, which :func:`_import_adapter` handles.
    """
    slots: dict[str, _Slot] = {}

    def add(slot: _Slot) -> None:
        if slot.name in slots:  # a programming error in spec.py: flat keys must be unique
            raise RuntimeError(f"TrainSpec field {slot.name!r} appears in two sections; SimpleTuner keys are flat")
        slots[slot.name] = slot

    for name, info in TrainSpec.model_fields.items():
        section = _model_class(info.annotation)
        if section is not None:
            for sub, sub_info in section.model_fields.items():
                if not _holds_model(sub_info.annotation):
                    add(_Slot(name, sub, sub_info))
        elif _list_model_class(info.annotation) is None:
            add(_Slot(None, name, info))
    return slots


def _datasets_field() -> tuple[str, type[BaseModel]]:
    """The TrainSpec list field holding multidatabackend entries, and its model."""
    for name, info in TrainSpec.model_fields.items():
        model = _list_model_class(info.annotation)
        if model is not None:
            return name, model
    raise RuntimeError("TrainSpec has no list-of-datasets field")


def config_keys() -> dict[str, str]:
    """Every flat ``config.json`` key we understand -> its place in TrainSpec (``"training.seed"``)."""
    return {k: (f"{s.section}.{s.name}" if s.section else s.name) for k, s in _slots().items()}


# ----------------------------------------------------------------------------- value handling
def _union_members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return list(get_args(annotation))
    return [annotation]


def _prepare(value: Any, info: FieldInfo) -> Any:
    """Turn a SimpleTuner-written value into one pydantic accepts for ``info``, or ``_DROP``.

    Pydantic already coerces "16", "1e-4" and "true"; what it refuses is numbers for string fields
    (``validation_resolution: 1024``, ``model_flavour: 2.0``) and the JSON/comma strings SimpleTuner
    accepts for lists (``peft_lora_target_modules``). ``null`` means "not given" to SimpleTuner, so a
    field that cannot hold None gets its default.
    """
    members = _union_members(info.annotation)
    if value is None:
        return None if type(None) in members else _DROP
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if str in members and not {int, float} & set(members):
            return str(value)
    if isinstance(value, str) and str not in members and any(get_origin(m) is list for m in members):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return value  # pydantic reports it
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _unset_if_zero(value: Any) -> Any:
    """SimpleTuner treats max_train_steps / num_train_epochs of 0 as "not set"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value == 0:
        return None
    if isinstance(value, str) and value.strip() in ("", "0"):
        return None
    return value


def _resume_value(value: Any) -> Any:
    """SimpleTuner's WebUI writes "" for "start from scratch"."""
    if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        return None
    return value


def _family_name(value: Any) -> Any:
    """``kandinsky5_image`` -> ``kandinsky5-image``; the engine validates the family itself."""
    return value.strip().lower().replace("_", "-") if isinstance(value, str) else value


def _scheduler_name(value: Any) -> Any:
    """SimpleTuner maps the old ``cosine_with_warmup`` to ``cosine``."""
    if isinstance(value, str):
        value = value.strip().lower()
        return "cosine" if value == "cosine_with_warmup" else value
    return value


def _crepa_source(value: Any) -> Any:
    """SimpleTuner's CrepaFeatureSource aliases (external, internal, selfflow), case-insensitive."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    return CREPA_SOURCE_ALIASES.get(text, text) if text else _DROP


def _caption_strategy(value: Any) -> Any:
    """SimpleTuner's WebUI spells it ``instance_prompt``; the dataloader docs ``instanceprompt``."""
    return "instanceprompt" if value == "instance_prompt" else value


_VALUE_RULES: dict[str, Callable[[Any], Any]] = {
    "max_train_steps": _unset_if_zero,
    "num_train_epochs": _unset_if_zero,
    "resume_from_checkpoint": _resume_value,
    "model_family": _family_name,
    "lr_scheduler": _scheduler_name,
    "lora_type": lambda v: v.strip().lower() if isinstance(v, str) else v,  # SimpleTuner compares .lower()
    "crepa_feature_source": _crepa_source,
    # SimpleTuner: "", "none" (any case) and null turn evaluation off; an interval of 0 or "" is no schedule
    "evaluation_type": lambda v: "none" if _is_none_word(v) else (v.strip().lower() if isinstance(v, str) else v),
    "eval_steps_interval": _unset_if_zero,
}
_DATASET_VALUE_RULES: dict[str, Callable[[Any], Any]] = {"caption_strategy": _caption_strategy}


def _is_none_word(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


# ----------------------------------------------------------------------------- files
def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from e


def _resolve_existing(raw: Any, key: str, base_dir: Path | None) -> Path:
    """Find a relative path next to the config first, then in the current directory.

    SimpleTuner resolves paths against its working directory (``config/lumina2/...``), while a
    config copied elsewhere usually sits next to its files, so both are tried.
    """
    if not isinstance(raw, (str, Path)) or not str(raw).strip():
        raise ConfigError(f"{key} must be a path to a JSON file, got {raw!r}")
    path = Path(str(raw).strip()).expanduser()
    tried: list[Path] = []
    if path.is_absolute():
        tried.append(path)
    else:
        if base_dir is not None:
            tried.append(Path(base_dir).absolute() / path)
        tried.append(Path.cwd() / path)
    tried = list(dict.fromkeys(tried))
    for candidate in tried:
        if candidate.exists():
            return candidate
    raise ConfigError(
        f"{key} {str(raw)!r} does not exist; tried: {', '.join(str(p) for p in tried)}",
        "fix the path (relative paths are looked up next to config.json, then in the current directory)",
    )


def _load_backend(backend: Any, backend_key: Any, base_dir: Path | None) -> list[dict[str, Any]]:
    """The multidatabackend list, from ``backend`` or the config's data_backend_config (may be absent)."""
    if backend is not None:
        if isinstance(backend, (str, Path)):
            path = _resolve_existing(backend, "dataloader config", None)
            data, source = _load_json(path, "dataloader config"), str(path)
        else:
            data, source = backend, "dataloader config"
    elif backend_key is not None:
        path = _resolve_existing(backend_key, "data_backend_config", base_dir)
        data, source = _load_json(path, "data_backend_config"), str(path)
    else:
        return []
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise ConfigError(
            f"{source} must be a JSON list of dataset objects (SimpleTuner's multidatabackend.json format)"
        )
    return data


# ----------------------------------------------------------------------------- import
class _Collector:
    """Builds TrainSpec's nested input and remembers which key the user wrote for each slot."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[tuple[str | None, str], str] = {}
        self.seen: dict[str, tuple[str, Any]] = {}

    def claim(self, canonical: str, written: str, value: Any) -> bool:
        """Record ``canonical`` once; a second spelling with another value is an error."""
        if canonical in self.seen:
            first, first_value = self.seen[canonical]
            if first_value != value:
                raise ConfigError(
                    f"{canonical} is given twice with different values ({first}={first_value!r}, {written}={value!r})",
                    "keep only one of them",
                )
            return False
        self.seen[canonical] = (written, value)
        return True

    def put(self, slot: _Slot, written: str, value: Any) -> None:
        if slot.section is None:
            self.data[slot.name] = value
        else:
            self.data.setdefault(slot.section, {})[slot.name] = value
        self.origin[(slot.section, slot.name)] = written

    def get(self, slot: _Slot, default: Any = None) -> Any:
        holder = self.data if slot.section is None else self.data.get(slot.section, {})
        return holder.get(slot.name, default)


def _flatten_config(raw: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key as written without ``--``, value) pairs, with the comfyui_tuner block spliced in."""
    pairs: list[tuple[str, Any]] = []
    for key, value in raw.items():
        name = str(key).strip().lstrip("-")
        if name == TUNER_BLOCK and isinstance(value, dict):
            pairs.extend((str(k).strip().lstrip("-"), v) for k, v in value.items())
        else:
            pairs.append((name, value))
    return pairs


def import_simpletuner(
    config: dict[str, Any] | str | Path,
    backend: list[dict[str, Any]] | str | Path | None = None,
    *,
    base_dir: Path | None = None,
) -> ImportResult:
    """Turn a SimpleTuner ``config.json`` (+ its ``multidatabackend.json``) into a TrainSpec.

    ``config`` is a dict or a path; keys may carry SimpleTuner's CLI-style ``--`` prefix. The
    datasets come from ``backend`` (a list or a path) if given, else from the config's
    ``data_backend_config``; with neither, the spec has no datasets (the engine reports that).
    ``base_dir`` is where relative paths in the config are looked up first (default: the config
    file's folder), before the current directory.
    """
    if isinstance(config, (str, Path)):
        config_path = Path(config).expanduser()
        raw = _load_json(config_path, "SimpleTuner config")
        source = f"SimpleTuner config {config_path}"
        if base_dir is None:
            base_dir = config_path.absolute().parent
    else:
        raw, source = config, "SimpleTuner config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a JSON object of SimpleTuner options")

    slots = _slots()
    ds_list_name, ds_model = _datasets_field()
    global_keys = [k for k in GLOBAL_DATASET_KEYS if k in ds_model.model_fields]
    out = _Collector()
    unsupported: list[str] = []
    warnings: list[str] = []
    globals_: dict[str, tuple[str, Any]] = {}
    backend_key: Any = None
    refused: list[tuple[str, Any, _Refusal]] = []
    refused_crepa: list[tuple[str, Any, _Refusal]] = []
    backbone_flag: str | None = None
    unknown: list[str] = []
    family_targets = False
    adapter_marks: dict[str, Any] = {}

    for written, value in _flatten_config(raw):
        canonical = KEY_ALIASES.get(written, written)
        if not out.claim(canonical, written, value):
            continue
        crepa_refusal = CREPA_REFUSALS.get(canonical)
        if crepa_refusal is not None and crepa_refusal.asks(value):
            refused_crepa.append((written, value, crepa_refusal))
            continue
        if crepa_refusal is not None and canonical not in slots:
            continue  # at SimpleTuner's default: what we train
        if canonical == "crepa_use_backbone_features":  # SimpleTuner's legacy flag for crepa_feature_source backbone
            if _truthy(value):
                backbone_flag = written
            continue
        refusal = ADAPTER_REFUSALS.get(canonical)
        if refusal is not None and refusal.asks(value):
            refused.append((written, value, refusal))
        elif refusal is not None and canonical not in slots:
            pass  # left at SimpleTuner's default: a plain LoRA, which is what we train
        elif canonical == "data_backend_config":
            backend_key = value
        elif canonical in global_keys:
            if value is not None:
                globals_[canonical] = (written, _DATASET_VALUE_RULES.get(canonical, lambda v: v)(value))
        elif canonical == FAMILY_TARGETS_MARK:
            family_targets = value is True
        elif canonical in (lycoris_file.AUTO_MARK, lycoris_file.SOURCE_MARK, "init_lokr_norm"):
            adapter_marks[canonical] = (written, value)
        elif canonical in slots:
            slot = slots[canonical]
            prepared = _prepare(_VALUE_RULES.get(canonical, lambda v: v)(value), slot.info)
            if prepared is not _DROP:
                out.put(slot, written, prepared)
        elif value is not None:  # null asks for nothing, in SimpleTuner too
            if canonical in simpletuner_keys.CONFIG_KEYS or canonical in simpletuner_keys.LEGACY_CONFIG_KEYS:
                unsupported.append(written)
            else:
                unknown.append(_unknown(written, _known_config_keys(slots)))
    if refused:
        raise ConfigError(
            f"{source} asks for an adapter comfyui-tuner cannot train yet (ignoring it would train a plain "
            "LoRA instead):\n" + "\n".join(f"  {k}: {json.dumps(v)} asks for {r.what}" for k, v, r in refused),
            "to train a plain LoRA, remove "
            + ", ".join(k for k, _, _ in refused)
            + " or set "
            + ", ".join(f"{k}: {r.default}" for k, _, r in refused),
        )

    if refused_crepa:
        raise ConfigError(
            f"{source} asks for a CREPA mode comfyui-tuner does not train (it trains CREPA with a DINOv2 teacher):\n"
            + "\n".join(f"  {k}: {json.dumps(v)} asks for {r.what}" for k, v, r in refused_crepa),
            "remove "
            + ", ".join(k for k, _, _ in refused_crepa)
            + " or set "
            + ", ".join(f"{k}: {r.default}" for k, _, r in refused_crepa),
        )
    if backbone_flag is not None:
        slot = slots["crepa_feature_source"]
        if out.get(slot) not in (None, "backbone"):  # SimpleTuner refuses the contradiction too
            raise ConfigError(
                f"{source}: {backbone_flag} asks for the backbone teacher, but crepa_feature_source is "
                f"{out.get(slot)!r}",
                "keep one of them: crepa_feature_source 'backbone' alone is the current spelling",
            )
        out.put(slot, backbone_flag, "backbone")
    if family_targets:  # our own export wrote the family's default targets out for SimpleTuner
        out.data.get("lora", {}).pop("peft_lora_target_modules", None)
    _apply_simpletuner_semantics(out, slots, warnings, base_dir)
    _import_scheduled_sampling(out, slots, warnings)
    _import_adapter(out, warnings, unsupported, base_dir, adapter_marks)

    entries = _load_backend(backend, backend_key, base_dir)
    datasets, ds_labels, ds_origins = _import_datasets(entries, ds_model, globals_, unsupported, unknown)
    out.data[ds_list_name] = datasets
    if unknown:
        raise ConfigError(
            f"{source} {UNKNOWN_MESSAGE}:\n" + "\n".join(f"  {u}" for u in unknown),
            "fix the spelling, or remove the key",
        )

    try:
        spec = TrainSpec.model_validate(out.data)
    except ValidationError as e:
        details = _explain(e, out.origin, ds_list_name, ds_labels, ds_origins)
        raise ConfigError(
            f"invalid {source}:\n{details}",
            "fix the values named above in config.json / multidatabackend.json",
        ) from None
    spec = _restore_lycoris_auto(spec, adapter_marks)

    unsupported = sorted(set(unsupported))
    if unsupported:
        warnings.insert(0, UNSUPPORTED_MESSAGE + ", ".join(unsupported))
    # Not logged here: the caller shows them (the CLI as warning events, the node in its output),
    # and a logged copy would print each one twice.
    return ImportResult(spec=spec, warnings=warnings, unsupported_keys=unsupported)


def _apply_simpletuner_semantics(
    out: _Collector, slots: dict[str, _Slot], warnings: list[str], base_dir: Path | None
) -> None:
    """Give omitted keys SimpleTuner's meaning and apply its cross-key rules."""
    given = {key for key, (_, value) in out.seen.items() if value is not None}
    for key, default in SIMPLETUNER_DEFAULTS.items():
        if key in slots and key not in given:
            out.put(slots[key], key, default)
    # SimpleTuner trains one epoch when neither length is given.
    if "num_train_epochs" in slots and not {"max_train_steps", "num_train_epochs"} & given:
        out.put(slots["num_train_epochs"], "num_train_epochs", 1)

    # SimpleTuner turns "constant" with warmup steps into "constant_with_warmup".
    scheduler, warmup_slot = slots.get("lr_scheduler"), slots.get("lr_warmup_steps")
    if scheduler is not None and warmup_slot is not None and out.get(scheduler) == "constant":
        try:
            warmup = float(out.get(warmup_slot) or 0)
        except (TypeError, ValueError):
            warmup = 0.0  # pydantic reports the bad value
        if warmup > 0:
            out.put(scheduler, out.origin[(scheduler.section, scheduler.name)], "constant_with_warmup")
            warnings.append(
                "lr_scheduler 'constant' with lr_warmup_steps > 0 becomes 'constant_with_warmup', as in SimpleTuner"
            )

    # SimpleTuner's CLIP evaluator defaults to the 336-pixel CLIP-L (its registry and CLIPModelEvaluator); ours is
    # the 224-pixel one (FEATURES.md), so a config that turns CLIP on without naming a model gets SimpleTuner's.
    model_slot = slots.get("pretrained_evaluation_model_name_or_path")
    type_slot = slots.get("evaluation_type")
    if model_slot and type_slot and out.get(type_slot) == "clip" and out.get(model_slot) is None:
        out.put(model_slot, "evaluation_type", SIMPLETUNER_EVALUATION_MODEL)

    # A prompt library file is found like data_backend_config and stored as an absolute path.
    library_slot = slots.get("user_prompt_library")
    if library_slot is not None and isinstance(out.get(library_slot), str):
        written = out.origin[(library_slot.section, library_slot.name)]
        out.put(library_slot, written, str(_resolve_existing(out.get(library_slot), written, base_dir)))


def _import_scheduled_sampling(out: _Collector, slots: dict[str, _Slot], warnings: list[str]) -> None:
    """``scheduled_sampling_sampler`` with SimpleTuner's meaning for flow-matching models (all our families).

    SimpleTuner rolls flow-matching models out with Euler whatever the key says (its unipc / dpm
    solvers serve eps and v-prediction models), so those values import as ``euler``, with a note.
    """
    sampler = slots.get("scheduled_sampling_sampler")
    value = out.get(sampler) if sampler is not None else None
    if sampler is not None and isinstance(value, str) and value.strip().lower() in ("unipc", "dpm"):
        out.put(sampler, out.origin[(sampler.section, sampler.name)], "euler")
        warnings.append(
            f"scheduled_sampling_sampler {value!r} imports as 'euler': SimpleTuner itself rolls flow-matching "
            "models (Kandinsky 5, Lumina 2) out with Euler whatever this key says"
        )


def _import_adapter(
    out: _Collector,
    warnings: list[str],
    unsupported: list[str],
    base_dir: Path | None,
    marks: dict[str, tuple[str, Any]],
) -> None:
    """``lora_type`` / ``use_dora`` / ``lycoris_config`` / ``init_lokr_norm`` with SimpleTuner's meaning.

    For ``lora_type: lycoris`` the settings file is found like the other paths (next to config.json,
    then the current directory; SimpleTuner's default ``config/lycoris_config.json`` when the key is
    missing), read and checked key by key, so a broken file fails here, before any model loads. The
    spec keeps the file's absolute path and its content. SimpleTuner ignores ``use_dora`` and
    ``lycoris_config`` where they do not apply; so does the import, with a warning.
    """
    lora = out.data.get("lora", {})
    raw = lora.pop("lycoris_config", None)
    key = out.origin.get(("lora", "lycoris_config"), "lycoris_config")
    init = marks.get("init_lokr_norm")
    if lora.get("lora_type", "standard") != "lycoris":
        if raw not in (None, ""):
            warnings.append(f"{key} is ignored because lora_type is not 'lycoris' (as in SimpleTuner)")
        if init is not None and init[1] is not None:
            unsupported.append(init[0])  # a LoKr-only option: SimpleTuner ignores it for a standard LoRA
        return
    if _truthy(lora.get("use_dora", False)):
        lora.pop("use_dora")
        warnings.append(
            "use_dora is ignored with lora_type 'lycoris', as in SimpleTuner; for DoRA's weight decomposition "
            'set "dora_wd": true in the lycoris_config file'
        )
    path: Path | None
    if isinstance(raw, dict):  # export_simpletuner carries the settings inline; write_simpletuner writes the file
        settings, notes = lycoris_file.lycoris_settings(raw, key, simpletuner=True)
        source = marks.get(lycoris_file.SOURCE_MARK, (None, None))[1]
        path = Path(source) if isinstance(source, str) and source else None
    else:
        if raw in (None, "") or (isinstance(raw, str) and not raw.strip()):
            try:
                path = _resolve_existing(lycoris_file.SIMPLETUNER_DEFAULT_PATH, key, base_dir)
            except ConfigError as e:
                raise ConfigError(
                    f"lora_type 'lycoris' needs a LyCORIS settings file, and lycoris_config is not set; "
                    f"SimpleTuner's default {lycoris_file.SIMPLETUNER_DEFAULT_PATH} is not there either "
                    f"({e.message})",
                    'set lycoris_config to your LyCORIS JSON file, e.g. {"algo": "lokr", "multiplier": 1.0, '
                    '"linear_dim": 10000, "linear_alpha": 1, "factor": 4, "full_matrix": true}',
                ) from None
        else:
            path = _resolve_existing(raw, key, base_dir)
        settings, notes = lycoris_file.load_settings(path, simpletuner=True, key=key)
    warnings.extend(notes)
    if not settings.get("apply_preset"):
        warnings.append(
            f"{key} has no apply_preset: comfyui-tuner adapts the model family's LoRA target layers "
            "(lora_target_preset), where SimpleTuner's lycoris would adapt every Linear layer; add apply_preset "
            'with target_module (e.g. ["Attention", "FeedForward"]) to choose the layers yourself'
        )
    if init is not None and init[1] is not None:
        in_file = settings.get("init_lokr_norm")
        if in_file is not None and in_file != init[1]:
            raise ConfigError(
                f"init_lokr_norm is given twice with different values (config {init[0]}={init[1]!r}, "
                f"{key}: {in_file!r})",
                "keep only one of them (SimpleTuner reads the one in config.json)",
            )
        settings["init_lokr_norm"] = init[1]
    lora["lycoris_config"] = str(path) if path is not None else None
    lora["lycoris"] = settings
    out.origin[("lora", "lycoris")] = key


def _restore_lycoris_auto(spec: TrainSpec, marks: dict[str, tuple[str, Any]]) -> TrainSpec:
    """Our export wrote resolved values for "not given" LyCORIS settings; give back "not given"."""
    auto = marks.get(lycoris_file.AUTO_MARK, (None, None))[1]
    lycoris = spec.lora.lycoris
    if not auto or lycoris is None or not isinstance(auto, list):
        return spec
    update = lycoris_file.restore_auto(lycoris.model_dump(), auto, lycoris_file.resolved_values(spec))
    restored = lycoris.model_copy(update={k: update[k] for k in auto if k in update})
    return spec.model_copy(update={"lora": spec.lora.model_copy(update={"lycoris": restored})})


def _known_config_keys(slots: dict[str, _Slot]) -> set[str]:
    """Every config.json key anyone reads: ours, our aliases, SimpleTuner's; what a typo is matched to."""
    return (
        set(slots)
        | set(KEY_ALIASES)
        | set(ADAPTER_REFUSALS)
        | {"data_backend_config"}
        | simpletuner_keys.CONFIG_KEYS
        | simpletuner_keys.LEGACY_CONFIG_KEYS
    )


def _unknown(written: str, known: set[str]) -> str:
    """``learning_rat (did you mean learning_rate?)``: one line of the unknown-keys error."""
    guess = simpletuner_keys.did_you_mean(written, known)
    return f"{written} (did you mean {guess}?)" if guess else written


def _import_datasets(
    entries: list[dict[str, Any]],
    ds_model: type[BaseModel],
    globals_: dict[str, tuple[str, Any]],
    unsupported: list[str],
    unknown: list[str],
) -> tuple[list[dict[str, Any]], list[str], list[dict[str, str]]]:
    """Dataset dicts for TrainSpec, their labels for messages, and key-as-written per field.

    A key SimpleTuner reads in a dataset entry but we do not goes to ``unsupported``; one nobody
    reads goes to ``unknown``, as ``dataset 'id': key (did you mean ...?)``.
    """
    fields = ds_model.model_fields
    known_keys = set(fields) | set(DATASET_KEY_ALIASES) | simpletuner_keys.DATASET_KEYS
    datasets: list[dict[str, Any]] = []
    labels: list[str] = []
    origins: list[dict[str, str]] = []
    for index, entry in enumerate(entries):
        raw_id = entry.get("id")
        label = str(raw_id) if raw_id not in (None, "") else f"#{index + 1}"
        item: dict[str, Any] = {}
        origin: dict[str, str] = {}
        seen: dict[str, tuple[str, Any]] = {}
        for written, value in entry.items():
            key = DATASET_KEY_ALIASES.get(written, written)
            if key in seen:
                if seen[key][1] != value:
                    raise ConfigError(
                        f"dataset {label!r}: {key} is given twice with different values "
                        f"({seen[key][0]}={seen[key][1]!r}, {written}={value!r})",
                        "keep only one of them",
                    )
                continue
            seen[key] = (written, value)
            info = fields.get(key)
            if info is None:
                if value is None:
                    pass
                elif key in simpletuner_keys.DATASET_KEYS:
                    unsupported.append(f"{label}.{written}")
                else:
                    unknown.append(f"dataset {label!r}: {_unknown(written, known_keys)}")
                continue
            prepared = _prepare(_DATASET_VALUE_RULES.get(key, lambda v: v)(value), info)
            if prepared is not _DROP:
                item[key] = prepared
                origin[key] = written
        if str(entry.get("dataset_type", "image")) not in _EMBED_DATASET_TYPES:
            for key, (written, value) in globals_.items():
                if key not in seen:
                    prepared = _prepare(value, fields[key])
                    if prepared is not _DROP:
                        item[key] = prepared
                        origin[key] = f"{written} (top-level config value)"
            for key, value in SIMPLETUNER_DATASET_DEFAULTS.items():
                if key in fields and key not in item and key not in seen:
                    item[key] = value
                    origin[key] = f"{key} (SimpleTuner default)"
        datasets.append(item)
        labels.append(label)
        origins.append(origin)
    return datasets, labels, origins


def _explain(
    e: ValidationError,
    origin: dict[tuple[str | None, str], str],
    ds_list_name: str,
    ds_labels: list[str],
    ds_origins: list[dict[str, str]],
) -> str:
    """Pydantic's report, with each location turned back into the SimpleTuner key the user wrote."""
    grouped: dict[str, list[str]] = {}
    for err in e.errors():
        loc = err["loc"]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        elif err["type"] == "extra_forbidden":
            msg = "not a known option" + unknown_key_note(loc)
        if len(loc) >= 2 and loc[0] == ds_list_name and isinstance(loc[1], int):
            index = loc[1]
            label = ds_labels[index] if index < len(ds_labels) else f"#{index + 1}"
            if len(loc) >= 3:
                key = ds_origins[index].get(str(loc[2]), str(loc[2])) if index < len(ds_origins) else str(loc[2])
                key = ".".join([key, *(str(p) for p in loc[3:])])  # inside the video block: video.num_frames
                where = f"dataset {label!r}: {key}"
            else:  # a check across the whole entry; its message usually names the dataset already
                where = "" if repr(label) in msg else f"dataset {label!r}"
        elif len(loc) >= 2 and (str(loc[0]), str(loc[1])) in origin:
            where = origin[(str(loc[0]), str(loc[1]))]
        elif len(loc) >= 1 and (None, str(loc[0])) in origin:
            where = origin[(None, str(loc[0]))]
        elif len(loc) >= 2:
            where = str(loc[1])
        else:
            where = ".".join(str(p) for p in loc)
        messages = grouped.setdefault(where, [])
        if msg not in messages:
            messages.append(msg)
    return "\n".join(f"  {where + ': ' if where else ''}{'; '.join(msgs)}" for where, msgs in grouped.items())


# ----------------------------------------------------------------------------- export
def _differs(value: Any, info: FieldInfo) -> bool:
    if info.is_required():
        return True
    return value != info.get_default(call_default_factory=True)


def export_simpletuner(spec: TrainSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(config.json dict, multidatabackend.json list)`` describing ``spec`` for SimpleTuner.

    The config holds non-default values plus the keys SimpleTuner needs or defaults differently
    (:data:`SIMPLETUNER_DEFAULTS`); our own options go in the ``comfyui_tuner`` block. A
    ``user_prompt_library`` mapping stays inline here (:func:`write_simpletuner` writes it to a
    file, which is all SimpleTuner reads). ``data_backend_config`` names ``multidatabackend.json``
    next to the config. ``import_simpletuner(*export_simpletuner(spec)).spec == spec``.
    """
    config: dict[str, Any] = {}
    tuner: dict[str, Any] = {}
    for key, slot in _slots().items():
        if key == "lycoris_config":
            continue  # _export_adapter: the settings themselves, not the path they were read from
        holder = spec if slot.section is None else getattr(spec, slot.section)
        value = getattr(holder, slot.name)
        always = key in _ALWAYS_EXPORTED or key in SIMPLETUNER_DEFAULTS or key in _ALWAYS_EXPORTED_COUNTS
        if not (always or _differs(value, slot.info)):
            continue
        if value is None:
            if key in _EXPORT_NONE_AS:
                value = _EXPORT_NONE_AS[key]
            elif always:
                continue  # e.g. no flavour: SimpleTuner picks the family's default
        (tuner if key in TUNER_ONLY_KEYS else config)[key] = to_jsonable_python(value)
    config["data_backend_config"] = "multidatabackend.json"
    if "," in config.get("report_to", ""):  # several trackers: SimpleTuner hands accelerate a list, not a comma string
        config["report_to"] = config["report_to"].split(",")
    if spec.validation.evaluation_type != "none":  # SimpleTuner's default CLIP differs from ours: always say which
        config["pretrained_evaluation_model_name_or_path"] = spec.validation.pretrained_evaluation_model_name_or_path
    if spec.crepa.crepa_enabled:  # SimpleTuner has no default block: it refuses CREPA without one
        config["crepa_block_index"] = spec.crepa.crepa_block_index
    _export_family_targets(spec, config, tuner)
    _export_adapter(spec, config, tuner)
    if tuner:
        config[TUNER_BLOCK] = tuner

    ds_list_name, ds_model = _datasets_field()
    datasets: list[dict[str, Any]] = []
    for ds in getattr(spec, ds_list_name):
        image_like = str(getattr(ds, "dataset_type", "image")) not in _EMBED_DATASET_TYPES
        entry: dict[str, Any] = {}
        for name, info in ds_model.model_fields.items():
            value = getattr(ds, name)
            if value is None:
                continue
            always = name in ("id", "type", "dataset_type") or (image_like and name in SIMPLETUNER_DATASET_DEFAULTS)
            if always or _differs(value, info):
                entry[name] = to_jsonable_python(value)
        datasets.append(entry)
    return config, datasets


def _export_family_targets(spec: TrainSpec, config: dict[str, Any], tuner: dict[str, Any]) -> None:
    """Write the LoRA targets the family picks by default as ``peft_lora_target_modules``.

    SimpleTuner's own defaults differ (Kandinsky 5: q/k/v only, where we train the authors'
    attention+ffn set), so leaving the key out would make SimpleTuner train other layers than we do.
    The mark in the tuner block lets :func:`import_simpletuner` restore "family default".
    """
    if spec.model.model_type != "lora" or spec.lora.peft_lora_target_modules or spec.lora.lora_type == "lycoris":
        return  # SimpleTuner's LyCORIS reads its targets from the lycoris_config file, not this key
    from .families import get_family_class

    try:
        family = get_family_class(spec.model.model_family)(spec)
        config["peft_lora_target_modules"] = family.lora_target_modules()
    except ConfigError:
        return  # an unknown family, flavour or preset: resolve_spec reports it when the spec is used
    tuner[FAMILY_TARGETS_MARK] = True


def _export_adapter(spec: TrainSpec, config: dict[str, Any], tuner: dict[str, Any]) -> None:
    """A LyCORIS spec's settings, inline under ``lycoris_config`` (:func:`write_simpletuner` makes it a file).

    SimpleTuner reads ``init_lokr_norm`` from config.json, so it goes there. Settings the run resolves
    (linear_dim / linear_alpha from the rank / alpha, bypass_mode from the base precision) are written
    resolved, as SimpleTuner needs them, and listed in our block so an import gives back "not given".
    """
    lycoris = spec.lora.lycoris
    if spec.lora.lora_type != "lycoris" or lycoris is None:
        return
    content, auto = lycoris_file.file_content(spec)
    config["lycoris_config"] = content
    if lycoris.init_lokr_norm is not None:
        config["init_lokr_norm"] = lycoris.init_lokr_norm
    if auto:
        tuner[lycoris_file.AUTO_MARK] = auto
    if spec.lora.lycoris_config:
        tuner[lycoris_file.SOURCE_MARK] = spec.lora.lycoris_config


def write_simpletuner(spec: TrainSpec, folder: Path) -> tuple[Path, Path]:
    """Write ``config.json`` and ``multidatabackend.json`` into ``folder``; return their paths.

    The config's ``data_backend_config`` (and ``user_prompt_library``, written to
    ``user_prompt_library.json`` when the spec holds a mapping, and ``lycoris_config``, written to
    ``lycoris_config.json`` for a LyCORIS spec) are absolute, because SimpleTuner resolves paths
    against its own working directory, not the config's folder.
    """
    from .io_utils import atomic_write_json

    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    config, datasets = export_simpletuner(spec)
    config_path = folder / "config.json"
    backend_path = folder / "multidatabackend.json"
    config["data_backend_config"] = str(backend_path)
    library = config.get("user_prompt_library")
    if isinstance(library, dict):
        library_path = folder / "user_prompt_library.json"
        atomic_write_json(library_path, library)
        config["user_prompt_library"] = str(library_path)
    lycoris = config.get("lycoris_config")
    if isinstance(lycoris, dict):
        lycoris_path = folder / lycoris_file.FILE_NAME
        atomic_write_json(lycoris_path, lycoris)
        config["lycoris_config"] = str(lycoris_path)
        block = config.get(TUNER_BLOCK, {})
        block.pop(lycoris_file.SOURCE_MARK, None)  # the file written here is where the settings now come from
        if TUNER_BLOCK in config and not block:
            del config[TUNER_BLOCK]
    atomic_write_json(backend_path, datasets)
    atomic_write_json(config_path, config)
    return config_path, backend_path
