"""Checks on the files a run needs, made after the spec is resolved and before the dataset scan.

``resolve_spec`` checks what the spec says; this checks the world it points at: that every folder
the run writes (``output_dir``, the caches) can be created and written, and that the model is
where ``pretrained_model_name_or_path`` (or the flavour's repo id) says. Both take seconds, so a
wrong path is reported before minutes of dataset scanning and model loading, as one user error
naming the path and the fix. It runs in every training process (``Trainer.prepare``), whatever
started it; the ComfyUI node's own early check (``resolve_spec``) does not look at files, because
the node places the run folder itself and tests build specs for models that need not exist.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..families.base import ModelFamily
from ..model_source import check_model_source
from ..spec import TrainSpec


def writable_folders(spec: TrainSpec) -> list[tuple[Path, str, str]]:
    """Every folder the run writes, with its key and where that key is (a dataset), output_dir first."""
    folders = [(Path(spec.output_dir), "output_dir", "")]
    text = spec.text_embed_dataset
    if text is not None and text.cache_dir:
        folders.append((Path(text.cache_dir), "cache_dir", f"dataset {text.id!r}: "))
    for ds in spec.training_datasets:
        if ds.cache_dir_vae:
            folders.append((Path(ds.cache_dir_vae), "cache_dir_vae", f"dataset {ds.id!r}: "))
    return folders


def check_writable_folder(path: Path, key: str, where: str = "") -> None:
    """Raise ConfigError unless ``path`` is, or can be created as, a folder this process can write.

    Writing is tried for real (a temporary folder, removed at once) rather than asked of
    ``os.access``, which says yes to root on a read-only mount and no to some network shares that
    would work.
    """
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise ConfigError(
            f"{where}{key} {path} is a file, not a folder",
            f"choose another {key}, or move that file away",
        )
    if not existing.is_dir():
        raise ConfigError(
            f"{where}{key} {path} cannot be created: {existing} is a file, not a folder",
            f"choose a {key} that is not inside a file (e.g. next to it: {existing.parent / path.name})",
        )
    try:
        Path(tempfile.mkdtemp(prefix=".tuner-write-check-", dir=existing)).rmdir()
    except OSError as e:
        refusing = path if existing == path else existing
        raise ConfigError(
            f"{where}{key} {path} is not writable: {refusing} refuses new files ({e.strerror or type(e).__name__})",
            f"choose a {key} in a folder you can write to, or change that folder's permissions",
        ) from None


def preflight(spec: TrainSpec, family: ModelFamily) -> list[str]:
    """Check the run's folders, then the model source; raise the first user error, return warnings."""
    for path, key, where in writable_folders(spec):
        check_writable_folder(path, key, where)
    return check_model_source(
        family.source,
        spec.model.revision,
        family.weight_folders,
        family.name,
        family.flavour.repo_id,
    )
