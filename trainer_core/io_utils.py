"""Small filesystem helpers: atomic writes and cheap content identities.

Atomic writes go to a temporary file in the same folder and are moved into place with
``os.replace``, so a reader (or a resumed run after SIGKILL) sees either the old file or the
complete new one, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

_SAMPLE = 1 << 20  # bytes hashed from each end of a large file


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def atomic_save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file, but atomic. Tensors are made contiguous first.

    ``save_file`` writes from the tensors' own memory (``safetensors.torch.save`` would first build
    the whole file as bytes: a second copy of a full fine-tune's gigabytes); the bytes are the same.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_identity(path: Path) -> str:
    """A content hash that is cheap for big files: size + the first and last MiB.

    Whole-file hashing of a 10 GB checkpoint at every start-up would cost minutes; editing a
    file in place without changing its size or either end is not something datasets or model
    weights do in practice.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * _SAMPLE:
            h.update(f.read())
        else:
            h.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def folder_identity(folder: Path, patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.bin", "*.model")) -> str:
    """Identity of a model component folder (config + weights), for cache keys."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    for p in files:
        h.update(p.name.encode())
        h.update(file_identity(p).encode())
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (dict keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
