"""Import SimpleTuner Config: a SimpleTuner ``config.json`` (+ ``multidatabackend.json``) as a TrainSpec.

The conversion is the trainer core's (``trainer_core.simpletuner``); this node only finds the files,
makes the config's relative dataset and cache paths absolute (SimpleTuner resolves them against
its own working folder, which does not exist here), and shows the importer's warnings. The
config's ``output_dir`` is ignored: Train LoRA keeps runs in ComfyUI's output folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from comfy_api.latest import io, ui

from ..trainer_core.errors import ConfigError
from . import comfy_bridge as bridge
from .sockets import CATEGORY_CONFIG, TunerSpec

PATH_KEYS = ("instance_data_dir", "cache_dir_vae", "cache_dir")


def find_file(text: str, what: str) -> Path:
    """An absolute path as is; a relative one in ComfyUI's input folder, else the current folder."""
    raw = text.strip()
    if not raw:
        raise ConfigError(f"no {what} given", f"type the path of the {what}")
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() else [bridge.input_dir() / path, path.absolute()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{what} {raw!r} does not exist; tried: {', '.join(str(c) for c in candidates)}",
        "use an absolute path, or a path relative to ComfyUI's input folder",
    )


def absolute_dataset_paths(datasets: list[dict[str, Any]], config_dir: Path) -> list[dict[str, Any]]:
    """Make relative dataset and cache folders absolute.

    Tried in order: next to config.json, then the folder above it and the one above that (a
    SimpleTuner checkout keeps configs in ``config/`` or ``config/<name>/`` and runs from its root).
    The first place where the folder exists wins; cache folders that do not exist yet go next to
    config.json.
    """
    bases = [config_dir, config_dir.parent, config_dir.parent.parent]
    out = []
    for ds in datasets:
        ds = dict(ds)
        for key in PATH_KEYS:
            value = ds.get(key)
            if not value or Path(value).expanduser().is_absolute():
                continue
            found = next((b / value for b in bases if (b / value).exists()), None)
            ds[key] = str(found or (config_dir / value))
        out.append(ds)
    return out


def _files_fingerprint(*paths: Path | None) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p is not None and p.is_file():
            h.update(str(p).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def lycoris_file_of(config: Path) -> Path | None:
    """The lycoris_config file a SimpleTuner config names, where the importer finds it (or None)."""
    import json

    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = raw.get("lycoris_config", raw.get("--lycoris_config")) if isinstance(raw, dict) else None
    if not isinstance(value, str) or not value.strip():
        return None
    path = Path(value.strip()).expanduser()
    for candidate in [path] if path.is_absolute() else [config.parent / path, path.absolute()]:
        if candidate.is_file():
            return candidate
    return None


class TunerImportSimpleTunerConfig(io.ComfyNode):
    """Import SimpleTuner Config: train from a SimpleTuner quick-start config, unchanged."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerImportSimpleTunerConfig",
            display_name="Import SimpleTuner Config",
            category=CATEGORY_CONFIG,
            description="Read a SimpleTuner config.json and its multidatabackend.json into training settings for "
            "Train LoRA. Options we do not support yet are listed, never silently dropped.",
            inputs=[
                io.String.Input(
                    "config_path",
                    default="",
                    tooltip="SimpleTuner's config.json: absolute, or relative to ComfyUI's input folder.",
                ),
                io.String.Input(
                    "backend_path",
                    default="",
                    tooltip="Its multidatabackend.json. Empty uses the config's data_backend_config.",
                ),
            ],
            outputs=[
                TunerSpec.Output("spec", tooltip="The whole training setup; connect it to Train LoRA's spec input."),
                io.String.Output("warnings", tooltip="What the importer could not carry over, one per line."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, config_path: str = "", backend_path: str = "", **kwargs: object) -> str:
        """Editing either file (or the LyCORIS settings file the config names) makes ComfyUI import it again."""
        try:
            config = find_file(config_path, "config.json")
        except ConfigError:
            return "missing"
        backend = None
        if backend_path.strip():
            try:
                backend = find_file(backend_path, "multidatabackend.json")
            except ConfigError:
                return "missing"
        return _files_fingerprint(config, backend, lycoris_file_of(config))

    @classmethod
    def execute(cls, config_path: str, backend_path: str) -> io.NodeOutput:
        from ..trainer_core.simpletuner import import_simpletuner

        config = find_file(config_path, "config.json")
        backend = find_file(backend_path, "multidatabackend.json") if backend_path.strip() else None
        imported = import_simpletuner(config, backend)
        spec = imported.spec.model_dump(mode="json")
        spec["datasets"] = absolute_dataset_paths(spec["datasets"], config.parent.absolute())
        spec.pop("output_dir", None)
        warnings = "\n".join(imported.warnings)
        text = f"imported {config.name}: {len(spec['datasets'])} dataset(s)" + (f"\n{warnings}" if warnings else "")
        return io.NodeOutput(spec, warnings, ui=ui.PreviewText(text))


NODES = [TunerImportSimpleTunerConfig]
