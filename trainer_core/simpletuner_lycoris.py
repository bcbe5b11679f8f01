"""SimpleTuner's ``lycoris_config`` files: read one as SimpleTuner does, write one it reads.

SimpleTuner (``lora_type: lycoris``) loads a JSON file, takes ``multiplier``, ``linear_dim`` and
``linear_alpha`` out of it through ``int()`` (defaults 1, 4 and 1), hands ``apply_preset`` to
``LycorisNetwork.apply_preset`` and passes every other key to ``lycoris.create_lycoris``, which
silently ignores what it does not know. So a typo there (``facter``) trains a different adapter
without a word. Here every key of such a file is checked before any model loads: a key neither
lycoris nor we know is an error with the nearest spelling, a LyCORIS option we cannot train yet is
refused by name (unless it is at lycoris's default, which means what we do), and an algorithm
other than lokr / loha / locon / full is refused. Values SimpleTuner accepts are accepted with its
meaning: ``"128"`` for ``linear_dim``, lycoris's ``"True"``/``"false"`` strings for flags, and
the integer truncation of the three positional numbers (reported when it changes a value).

The same reader serves the Adapter Settings node's "LyCORIS config file" choice, where the file
is not part of a SimpleTuner config: there an omitted ``linear_dim`` / ``linear_alpha`` keeps
meaning "Train LoRA's rank / alpha" instead of SimpleTuner's 4 / 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import simpletuner_keys
from .errors import ConfigError
from .spec import LYCORIS_ALGOS, LycorisPreset, LycorisSpec, TrainSpec

FILE_NAME = "lycoris_config.json"
# SimpleTuner's field-registry default for lycoris_config.
SIMPLETUNER_DEFAULT_PATH = "config/lycoris_config.json"
# SimpleTuner's trainer: int(lycoris_config.get("multiplier", 1)), ("linear_dim", 4), ("linear_alpha", 1).
SIMPLETUNER_INT_DEFAULTS: dict[str, int] = {"multiplier": 1, "linear_dim": 4, "linear_alpha": 1}
# lycoris's network_module_dict maps "lora" to the same module as "locon".
ALGO_ALIASES = {"lora": "locon"}
# Algorithms lycoris has that we do not train (yet); anything else is a typo.
OTHER_LYCORIS_ALGOS = ("dylora", "glora", "diag-oft", "boft", "ia3", "tlora")
# lycoris's deprecated spellings (wrapper.deprecated_arg_dict) -> (our key, inverted)
KEY_ALIASES: dict[str, tuple[str, bool]] = {
    "use_cp": ("use_tucker", False),
    "use_conv_cp": ("use_tucker", False),
    "disable_conv_cp": ("use_tucker", True),
}
# Options create_lycoris reads that change what is trained, which we do not build: value that means
# "off" (accepted without a word) -> what the option does, for the message.
UNSUPPORTED_OPTIONS: dict[str, tuple[Any, str]] = {
    "preset": ("full", "a built-in lycoris target preset (write apply_preset with target_module instead)"),
    "train_norm": (False, "training the normalisation layers"),
    "constraint": (0, "a norm constraint on the update"),
    "constrain": (0, "a norm constraint on the update"),
    "rescaled": (False, "a rescaled OFT update"),
    "block_size": (4, "the OFT block size"),
    "train_llm_adapter": (False, "an LLM adapter"),
}
# Flags create_lycoris reads with str_bool (only "false" is false); decompose_both and the preset's
# flags it reads as plain Python truthiness.
_STR_BOOL_FLAGS = {
    "use_tucker",
    "use_scalar",
    "dora_wd",
    "wd_on_output",
    "full_matrix",
    "bypass_mode",
    "unbalanced_factorization",
}
_PLAIN_FLAGS = {"decompose_both", "rs_lora"}
# What a module_algo_map / name_algo_map entry may set: lycoris passes it to the module's constructor,
# whose argument names differ from the file's top level (dim, not linear_dim).
MAP_ENTRY_KEYS = {
    "algo",
    "dim",
    "alpha",
    "factor",
    "decompose_both",
    "full_matrix",
    "use_tucker",
    "use_scalar",
    "rank_dropout_scale",
    "weight_decompose",
    "wd_on_out",
    "bypass_mode",
    "rs_lora",
    "unbalanced_factorization",
}
_MAP_RENAMES = {
    "linear_dim": "dim",
    "linear_alpha": "alpha",
    "dora_wd": "weight_decompose",
    "wd_on_output": "wd_on_out",
}
_PRESET_ONLY_LYCORIS = {
    "lora_prefix",
    "unet_target_module",
    "unet_target_name",
    "text_encoder_target_module",
    "text_encoder_target_name",
}
# Config keys whose "not given" is resolved when the spec is used, so an export writes the resolved
# value and this tuner-block mark lets an import give back "not given".
AUTO_MARK = "lycoris_keys_follow_the_run"
# The file a spec's settings came from, kept through an export that carries them inline.
SOURCE_MARK = "lycoris_config_source"


def read_file(path: Path, key: str = "lycoris_config") -> dict[str, Any]:
    """The JSON object in a lycoris_config file; a missing or broken file names itself and the key."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{key} file {path} does not exist", f"fix the path in {key}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{key} file {path} is not readable JSON: {e}",
            'fix the file: it holds one JSON object such as {"algo": "lokr", "multiplier": 1.0, ...}',
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{key} file {path} must hold a JSON object of LyCORIS settings, not {type(raw).__name__}",
            'write it as {"algo": "lokr", "multiplier": 1.0, "linear_dim": 16, "linear_alpha": 16}',
        )
    return raw


# ----------------------------------------------------------------------------- reading values
def _simpletuner_int(key: str, value: Any, problems: list[str], notes: list[str]) -> int | None:
    """``int(value)`` as SimpleTuner's trainer does; strings such as "128" or "1.0" are numbers too."""
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        problems.append(f"{key}: {value!r} is not a number")
        return None
    whole = int(number)
    if whole != number:
        notes.append(f"{key} {value!r} is read as {whole}, as SimpleTuner reads it (int())")
    return whole


def _flag(key: str, value: Any, problems: list[str], *, lycoris_strings: bool) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    kind = "any string but 'false' as true" if lycoris_strings else "any string as true"
    problems.append(f"{key}: {value!r} is not true or false (lycoris would read {kind})")
    return None


def _algo(value: Any, where: str, problems: list[str]) -> str | None:
    name = str(value).strip().lower()
    name = ALGO_ALIASES.get(name, name)
    if name in LYCORIS_ALGOS:
        return name
    if name in OTHER_LYCORIS_ALGOS:
        problems.append(f"{where}: {value!r} is a LyCORIS algorithm comfyui-tuner does not train")
    else:
        guess = simpletuner_keys.did_you_mean(name, [*LYCORIS_ALGOS, *OTHER_LYCORIS_ALGOS])
        problems.append(
            f"{where}: {value!r} is not a LyCORIS algorithm" + (f" (did you mean {guess}?)" if guess else "")
        )
    return None


def _algo_map(name: str, value: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    """``module_algo_map`` / ``name_algo_map``: per-entry settings with lycoris's constructor names."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        problems.append(
            f'apply_preset.{name}: must map names to objects of settings, e.g. {{"Attention": {{"factor": 4}}}}'
        )
        return {}
    out: dict[str, dict[str, Any]] = {}
    for target, settings in value.items():
        entry: dict[str, Any] = {}
        for key, item in settings.items():
            where = f"apply_preset.{name}.{target}.{key}"
            if key == "algo":
                algo = _algo(item, where, problems)
                if algo is not None:
                    entry[key] = algo
            elif key in MAP_ENTRY_KEYS:
                entry[key] = item
            elif key in _MAP_RENAMES:
                problems.append(f"{where}: lycoris reads {_MAP_RENAMES[key]!r} here, so {key!r} would be ignored")
            else:
                guess = simpletuner_keys.did_you_mean(key, MAP_ENTRY_KEYS)
                problems.append(
                    f"{where}: not a LyCORIS module setting" + (f" (did you mean {guess}?)" if guess else "")
                )
        out[str(target)] = entry
    return out


def _preset(value: Any, problems: list[str]) -> dict[str, Any] | None:
    if value in (None, {}):
        return None
    if not isinstance(value, dict):
        problems.append("apply_preset: must be an object (target_module, module_algo_map, ...)")
        return None
    known = set(LycorisPreset.model_fields)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in ("module_algo_map", "name_algo_map"):
            out[key] = _algo_map(key, item, problems)
        elif key in ("target_module", "target_name", "exclude_name"):
            out[key] = [item] if isinstance(item, str) else item
        elif key in known:
            out[key] = item
        elif key in _PRESET_ONLY_LYCORIS:
            problems.append(f"apply_preset.{key}: a lycoris preset option comfyui-tuner does not use; remove it")
        else:
            guess = simpletuner_keys.did_you_mean(key, known)
            problems.append(
                f"apply_preset.{key}: not a lycoris preset key" + (f" (did you mean {guess}?)" if guess else "")
            )
    return out


def lycoris_settings(raw: dict[str, Any], source: str, *, simpletuner: bool) -> tuple[dict[str, Any], list[str]]:
    """A lycoris_config file's content as LycorisSpec fields, and notes worth showing.

    ``simpletuner``: fill what SimpleTuner fills when a key is missing (multiplier 1, linear_dim 4,
    linear_alpha 1); otherwise a missing linear_dim / linear_alpha follows the run's rank / alpha.
    Every problem of the file is reported in one :class:`ConfigError` naming ``source``.
    """
    problems: list[str] = []
    notes: list[str] = []
    fields = set(LycorisSpec.model_fields)
    out: dict[str, Any] = {}
    if "algo" not in raw:
        problems.append("algo: missing (SimpleTuner requires it): lokr, loha, locon or full")
    for key, value in raw.items():
        if key in KEY_ALIASES:
            target, inverted = KEY_ALIASES[key]
            flag = _flag(key, value, problems, lycoris_strings=True)
            if flag is not None:
                out[target] = (not flag) if inverted else flag
        elif key == "algo":
            algo = _algo(value, "algo", problems)
            if algo is not None:
                out["algo"] = algo
        elif key in SIMPLETUNER_INT_DEFAULTS:
            if value is not None:
                out[key] = _simpletuner_int(key, value, problems, notes)
        elif key == "apply_preset":
            out[key] = _preset(value, problems)
        elif key in _STR_BOOL_FLAGS or key in _PLAIN_FLAGS:
            out[key] = _flag(key, value, problems, lycoris_strings=key in _STR_BOOL_FLAGS)
        elif key in fields:
            out[key] = value
        elif key in UNSUPPORTED_OPTIONS:
            off, what = UNSUPPORTED_OPTIONS[key]
            if value != off and str(value).strip().lower() != str(off).lower():
                problems.append(f"{key}: {json.dumps(value)} asks for {what}, which comfyui-tuner does not train")
        else:
            guess = simpletuner_keys.did_you_mean(key, fields | set(KEY_ALIASES))
            problems.append(f"{key}: not a LyCORIS option" + (f" (did you mean {guess}?)" if guess else ""))
    if simpletuner:
        for key, default in SIMPLETUNER_INT_DEFAULTS.items():
            out.setdefault(key, default)
    if out.get("linear_alpha") == 0:  # lycoris: alpha 0 means alpha = dim (no scaling)
        out["linear_alpha"] = out.get("linear_dim")
        notes.append("linear_alpha 0 means 'equal to linear_dim' in lycoris")
    if out.get("multiplier") == 0:
        problems.append("multiplier: SimpleTuner reads it as int(...) = 0, which trains nothing; use 1")
    if not problems:
        try:
            LycorisSpec.model_validate(out)
        except ValidationError as e:
            for err in e.errors():
                problems.append(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}")
    if problems:
        raise ConfigError(
            f"{source} has settings comfyui-tuner cannot train:\n" + "\n".join(f"  {p}" for p in problems),
            f"fix these keys in {source}",
        )
    return out, [f"{source}: {n}" for n in notes]


def load_settings(
    path: str | Path, *, simpletuner: bool, key: str = "lycoris_config"
) -> tuple[dict[str, Any], list[str]]:
    """Read and check a lycoris_config file: :func:`read_file` then :func:`lycoris_settings`."""
    file = Path(path).expanduser()
    return lycoris_settings(read_file(file, key), f"{key} file {file}", simpletuner=simpletuner)


# ----------------------------------------------------------------------------- writing
def resolved_values(spec: TrainSpec) -> dict[str, Any]:
    """What the run uses for the LyCORIS settings left "not given" (None) in the spec."""
    lora = spec.lora
    return {
        "linear_dim": lora.lora_rank,
        "linear_alpha": lora.alpha,
        "bypass_mode": spec.memory.base_model_precision != "no_change",
    }


def file_content(spec: TrainSpec) -> tuple[dict[str, Any], list[str]]:
    """The lycoris_config file SimpleTuner needs for ``spec``, and the keys written as resolved values.

    SimpleTuner requires algo, multiplier and linear_alpha (and linear_dim without full_matrix), so
    they are always written; other settings only when they differ from lycoris's defaults.
    ``init_lokr_norm`` is a config.json key in SimpleTuner, so it is not written here.
    """
    lycoris = spec.lora.lycoris
    if lycoris is None:
        raise ValueError("spec has no LyCORIS settings")
    resolved = resolved_values(spec)
    data = lycoris.model_dump(mode="json", exclude_defaults=True, exclude={"init_lokr_norm", "apply_preset"})
    content: dict[str, Any] = {"algo": lycoris.algo, "multiplier": lycoris.multiplier}
    auto: list[str] = []
    for key in ("linear_dim", "linear_alpha", "bypass_mode"):
        value = getattr(lycoris, key)
        if value is None:
            value = resolved[key]
            auto.append(key)
        content[key] = value
    for key, value in data.items():
        content.setdefault(key, value)
    if lycoris.apply_preset is not None:
        content["apply_preset"] = lycoris.apply_preset.model_dump(mode="json", exclude_defaults=True)
    return content, auto


def restore_auto(settings: dict[str, Any], auto: list[str], resolved: dict[str, Any]) -> dict[str, Any]:
    """Give back "not given" for marked keys whose value is still the resolved one (not edited since)."""
    out = dict(settings)
    for key in auto:
        if key in out and key in resolved and out[key] == resolved[key]:
            out[key] = None
    return out
