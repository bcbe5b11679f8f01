"""Finding a dataset's files on disk."""

from __future__ import annotations

import os
from pathlib import Path

from .images import IMAGE_EXTENSIONS


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``; see :func:`list_files`."""
    return list_files(root, IMAGE_EXTENSIONS)


def list_files(root: Path, extensions: frozenset[str]) -> list[Path]:
    """Files under ``root`` whose suffix (any case) is in ``extensions``, recursively, following folder
    links once, sorted by relative path.

    Hidden files and folders are skipped: macOS leaves ``._name.jpg`` resource forks next to
    copied photos, which look like images but are not.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop or the same folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in extensions
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())
