"""Store a nested training state (optimizer, LR schedule, EMA, RNG...) without pickle.

A checkpoint may come from someone else (``resume_from_checkpoint`` can name any folder), and
unpickling runs whatever code the file asks for. So a state is split in two files that can only
ever hold data:

- ``<name>.safetensors``: every tensor, under a generated key (``t0``, ``t1``...);
- ``<name>.json``: the structure around them, with a ``{"__tensor__": "t0"}`` placeholder where
  each tensor was.

The JSON keeps what plain JSON loses, so the state loads back exactly as it was saved: a dict with
non-string keys (``optimizer.state_dict()["state"]`` is keyed by parameter index) is written as
``{"__dict__": [[key, value], ...]}``, a tuple as ``{"__tuple__": [...]}`` (``random.setstate`` and
Adam's ``betas`` need tuples), a numpy array (numpy's RNG state) as ``{"__ndarray__": [...],
"dtype": ...}``. Anything else (a function, a custom object) is refused when saving, naming where
it sits, so a state that cannot be stored this way fails at the first checkpoint, not at resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io_utils import atomic_save_safetensors, atomic_write_text

_MARKERS = ("__tensor__", "__dict__", "__tuple__", "__ndarray__")


def state_files(name: str) -> tuple[str, str]:
    """The two file names that hold the state ``name``."""
    return f"{name}.safetensors", f"{name}.json"


def save_state(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``folder/<name>.safetensors`` + ``folder/<name>.json``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, name)
    tensor_file, json_file = state_files(name)
    atomic_save_safetensors(folder / tensor_file, tensors)
    atomic_write_text(folder / json_file, json.dumps(structure))


def load_state(folder: Path, name: str) -> Any:
    """Read back what :func:`save_state` wrote; reads data only, never runs code.

    Raises ``ValueError`` (with the file named) when the files do not hold a state of this format.
    """
    from safetensors.torch import load_file

    tensor_file, json_file = state_files(name)
    tensors = load_file(str(folder / tensor_file))
    structure = json.loads((folder / json_file).read_text())
    return _decode(structure, tensors, folder / json_file)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # copies: no shared storage
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {
            "__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]
        }
    raise TypeError(
        f"{where} is a {type(obj).__name__}; checkpoint states hold only tensors, numbers, strings, "
        "lists, tuples, dicts and numpy arrays"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise ValueError(f"{source} refers to tensor {key!r}, which its .safetensors file lacks")
        return tensors[key]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, source) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__dict__" in obj:
        return {_decode(k, tensors, source): _decode(v, tensors, source) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors, source) for k, v in obj.items()}
