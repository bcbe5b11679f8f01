"""A folder of cached tensors, one safetensors file per entry, addressed by a content key.

Why this shape:
- the key is a hash of *everything* that changes the tensors, so a changed input simply misses
  the cache and is re-encoded: stale entries are never reused, and there is no invalidation
  logic to get wrong;
- each entry is written atomically (temp file + rename), and carries its key and a CRC32 of its
  bytes in the header, so a truncated or bit-flipped entry is detected on read and rebuilt,
  never trained on.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch

from ..io_utils import atomic_save_safetensors

log = logging.getLogger(__name__)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(str(tuple(t.shape)).encode() + str(t.dtype).encode(), crc)
        crc = zlib.crc32(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"", crc)
    return f"{crc:08x}"


class TensorStore:
    """Content-addressed tensor files under ``root`` (``root/ab/abcdef....safetensors``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.rebuilt = 0  # corrupt entries found (and treated as missing) since construction

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = dict(metadata or {})
        meta.update({"key": key, "crc32": _checksum(tensors)})
        atomic_save_safetensors(self.path_for(key), tensors, meta)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry, or None when it is missing or corrupt (a corrupt file is deleted)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("key") != key or meta.get("crc32") != _checksum(tensors):
                raise ValueError("key or checksum mismatch")
        except Exception as e:  # any unreadable entry is rebuilt
            log.warning("cache entry %s is corrupt (%s); it will be rebuilt", path, e)
            path.unlink(missing_ok=True)
            self.rebuilt += 1
            return None
        return tensors
