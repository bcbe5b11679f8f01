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
from collections.abc import Callable, Iterator, Mapping
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


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def stream_safetensors(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    get: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write one safetensors file tensor by tensor: ``get(name)`` is called once per name, in order.

    For a file whose tensors are made on the way (a fused qkv concatenated from q, k and v), so
    only one of them exists at a time. The header is written first from ``shapes`` (all tensors
    in ``dtype``); the file is atomic (temporary name, fsync, rename).
    """
    import os
    import struct
    import tempfile

    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape in shapes.items():
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape in shapes.items():
                t = get(name).detach().to(device="cpu", dtype=dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: shape {tuple(t.shape)}, announced {tuple(shape)}")
                f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
                del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
