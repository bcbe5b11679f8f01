"""Large state dicts as safetensors shards, written one shard at a time and read one tensor at a time.

A full fine-tune's weights are gigabytes. ``safetensors.torch.save`` builds a file's bytes in
memory, so writing all weights as one file would hold a second copy of them; here each shard is
built and written (atomically) on its own, so the extra memory is at most one shard
(``max_bytes``). The layout is diffusers' own (``<stem>-00001-of-00003.safetensors`` plus
``<stem>.safetensors.index.json`` with a ``weight_map``), so ``from_pretrained`` reads a
transformer folder written here, and :class:`LazyTensors` reads a tensor only when asked for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..io_utils import atomic_save_safetensors, atomic_write_json

DEFAULT_SHARD_BYTES = 2 * 1024**3


def _nbytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return t.numel() * (dtype.itemsize if dtype is not None else t.element_size())


def plan_shards(
    tensors: Mapping[str, torch.Tensor], max_bytes: int, dtype: torch.dtype | None = None
) -> list[list[str]]:
    """Names grouped in order into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t, dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def index_name(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


def write_sharded(
    folder: Path,
    stem: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    max_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    always_index: bool = False,
) -> list[Path]:
    """Write ``tensors`` (cast to ``dtype`` one shard at a time) as shards of ``folder``; returns the files.

    One shard without ``always_index`` is written as plain ``<stem>.safetensors`` (what diffusers
    writes for a small model); otherwise every shard is numbered and the index names each tensor's file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(tensors, max_bytes, dtype)
    single = len(plan) == 1 and not always_index
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(plan, 1):
        fname = f"{stem}.safetensors" if single else f"{stem}-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = {n: (tensors[n] if dtype is None else tensors[n].to(dtype)) for n in names}
        atomic_save_safetensors(folder / fname, shard, metadata=dict(metadata) if metadata else None)
        total += sum(_nbytes(t, None) for t in shard.values())
        del shard
        weight_map.update(dict.fromkeys(names, fname))
        files.append(folder / fname)
    if not single:
        atomic_write_json(folder / index_name(stem), {"metadata": {"total_size": total}, "weight_map": weight_map})
        files.append(folder / index_name(stem))
    return files


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of a sharded folder (its index), each read from its shard when looked up."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.folder = Path(folder)
        raw = json.loads((self.folder / index_name(stem)).read_text())
        self._map: dict[str, str] = dict(raw["weight_map"])

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.folder / self._map[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` without reading its data."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self._map[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())
