"""Low-memory optimizers from maintained libraries, under SimpleTuner's names.

A full fine-tune's optimizer state is the largest memory cost after the weights: AdamW keeps two
fp32 moments, 8 bytes per parameter. These keep less:

- ``ao-adamw8bit`` / ``ao-adamw4bit`` / ``ao-adamfp8`` / ``ao-adamwfp8`` (torchao, a dependency of
  the ``torchao`` and ``dev`` extras): both moments block-quantized to 8 bits, 4 bits or fp8, about
  2, 1 and 2 bytes per parameter. Tensors under 4096 elements (norms, biases) keep fp32 moments, as
  in bitsandbytes. Their step is ``torch.compile``'d, so on the CPU they need a C++ compiler. bf16
  weights are updated with stochastic rounding, so a full fine-tune keeps them in bf16.
- ``optimi-adamw`` / ``optimi-adam`` / ``optimi-radam`` / ``optimi-ranger`` (torch-optimi): moments in
  the parameter's dtype; for bf16 weights optimi adds Kahan summation (a bf16 compensation buffer),
  so bf16 weights plus 6 bytes of state replace fp32 master weights plus 8 bytes of state.
- ``bnb-adamw8bit`` / ``bnb-lion8bit`` (bitsandbytes, optional): 8-bit moments like torchao's.

All of them run on the CPU here (torch 2.13 CPU, torchao 0.18, torch-optimi 0.3, bitsandbytes 0.50);
a missing package fails with an install hint before any model loads (:func:`check_available`).

torchao keeps its quantized moments as tensor subclasses, which safetensors cannot store; the
optimizers built here flatten them into their plain parts (codes, scales, lookup table) in
``state_dict`` and rebuild them in ``load_state_dict``, so checkpoints stay data-only and a
resumed run continues exactly.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

# our (SimpleTuner's) name -> the class name in its package
AO_OPTIMIZERS = {
    "ao-adamw8bit": "AdamW8bit",
    "ao-adamw4bit": "AdamW4bit",
    "ao-adamfp8": "AdamFp8",
    "ao-adamwfp8": "AdamWFp8",
}
OPTIMI_OPTIMIZERS = {
    "optimi-adamw": "AdamW",
    "optimi-adam": "Adam",
    "optimi-radam": "RAdam",
    "optimi-ranger": "Ranger",
}
BNB_OPTIMIZERS = {
    "bnb-adamw8bit": "AdamW8bit",
    "bnb-lion8bit": "Lion8bit",
}
LOWMEM_OPTIMIZERS = (*AO_OPTIMIZERS, *OPTIMI_OPTIMIZERS, *BNB_OPTIMIZERS)
_PACKAGES = {  # name prefix -> (module to import, pip package)
    "ao-": ("torchao.optim", "torchao"),
    "optimi-": ("optimi", "torch-optimi"),
    "bnb-": ("bitsandbytes", "bitsandbytes"),
}

_FLAT = "__torchao_state__"  # marks a flattened torchao state tensor inside a state dict


def _package(name: str) -> tuple[str, str]:
    for prefix, found in _PACKAGES.items():
        if name.startswith(prefix):
            return found
    raise KeyError(name)


def check_available(name: str) -> None:
    """Raise ConfigError with an install hint when optimizer ``name`` needs a package that is missing.

    Cheap (an import), so spec checks call it before any model is loaded; names this module does not
    own pass.
    """
    if name not in LOWMEM_OPTIMIZERS:
        return
    module, package = _package(name)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"optimizer {name!r} needs the {package} package, which is not installed ({exc})",
            f"pip install {package} (in the Python environment that runs the trainer), or choose another "
            "optimizer: ao-adamw8bit and optimi-adamw run on the CPU too",
        ) from None


def check_device(name: str, device: torch.device | str | None) -> None:
    """Refuse a torchao optimizer on the CPU when torch.compile has no C++ compiler to build its step.

    ``device`` None means what the engine picks: CUDA when this machine has it.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in AO_OPTIMIZERS or torch.device(device).type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
        found = shutil.which(compiler) is not None or Path(compiler).is_file()
    except Exception:  # inductor raises its own errors when it finds no compiler
        found = False
    if not found:
        raise ConfigError(
            f"optimizer {name!r} compiles its step with torch.compile, which on the CPU needs a C++ compiler, "
            "and none was found",
            "install g++ (or set CXX), or use optimi-adamw (no compiler needed) on the CPU",
        )


def build_lowmem_optimizer(
    name: str, params: Any, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`LOWMEM_OPTIMIZERS`) over ``params``."""
    check_available(name)
    if name in AO_OPTIMIZERS:
        cls = _ao_class(AO_OPTIMIZERS[name])
        # stochastic rounding applies to bf16 weights only (a full fine-tune's): without it a bf16 weight
        # drops every update smaller than half its last bit, which is why other optimizers need fp32 masters
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bf16_stochastic_round=True)
    if name in OPTIMI_OPTIMIZERS:
        import optimi

        cls = getattr(optimi, OPTIMI_OPTIMIZERS[name])
        # kahan_sum=None: optimi turns Kahan summation on exactly for low-precision (bf16/fp16) weights
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, kahan_sum=None)
    import bitsandbytes

    cls = getattr(bitsandbytes.optim, BNB_OPTIMIZERS[name])
    if name == "bnb-lion8bit":
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> int:
    """Bytes the optimizer's per-parameter state holds (torchao subclasses counted by their parts).

    ``params``: count only the state of these parameters (default: all).
    """
    total = 0
    states = optimizer.state.values() if params is None else [optimizer.state[p] for p in params]
    for state in states:
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += _tensor_bytes(value)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- torchao state dicts


def _subclasses() -> dict[str, type]:
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    return {c.__name__: c for c in (OptimState8bit, OptimState4bit, OptimStateFp8)}


def _flatten(t: torch.Tensor) -> dict[str, Any]:
    names, ctx = t.__tensor_flatten__()
    attrs: list[Any] = []
    for a in ctx:
        if isinstance(a, torch.dtype):
            attrs.append({"dtype": str(a).removeprefix("torch.")})
        elif isinstance(a, (torch.Size, tuple, list)):
            attrs.append({"shape": [int(x) for x in a]})
        else:
            attrs.append(a)
    return {_FLAT: type(t).__name__, "tensors": {n: getattr(t, n) for n in names}, "attrs": attrs}


def _unflatten(flat: dict[str, Any], device: torch.device) -> torch.Tensor:
    classes = _subclasses()
    kind = flat[_FLAT]
    if kind not in classes:  # only the classes we know are rebuilt: a checkpoint holds data, not types
        raise ValueError(f"unknown torchao optimizer state {kind!r}")
    attrs: list[Any] = []
    for a in flat["attrs"]:
        if isinstance(a, dict) and "dtype" in a:
            attrs.append(getattr(torch, a["dtype"]))
        elif isinstance(a, dict) and "shape" in a:
            attrs.append(tuple(a["shape"]))
        else:
            attrs.append(a)
    tensors = {n: v.to(device) for n, v in flat["tensors"].items()}
    return classes[kind].__tensor_unflatten__(tensors, attrs, None, None)


class _FlatStateDict:
    """Mixin for torchao's optimizers: state dicts hold plain tensors only (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict()  # type: ignore[misc]
        state = {
            pid: {k: (_flatten(v) if type(v) in _subclasses().values() else v) for k, v in s.items()}
            for pid, s in sd["state"].items()
        }
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        flat: dict[Any, dict[str, Any]] = {}
        plain: dict[Any, dict[str, Any]] = {}
        for pid, s in state_dict["state"].items():
            plain[pid] = {k: v for k, v in s.items() if not (isinstance(v, dict) and _FLAT in v)}
            flat[pid] = {k: v for k, v in s.items() if isinstance(v, dict) and _FLAT in v}
        groups = [dict(g) for g in state_dict["param_groups"]]
        for g in groups:  # torchao keeps lr as a tensor (its compiled step reads it without recompiling)
            if not isinstance(g["lr"], torch.Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32)
        super().load_state_dict({"state": plain, "param_groups": groups})  # type: ignore[misc]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        for pid, p in zip(saved_ids, params):
            for key, value in flat.get(pid, {}).items():
                self.state[p][key] = _unflatten(value, p.device)  # type: ignore[attr-defined]
        for g in self.param_groups:  # type: ignore[attr-defined]
            g["lr"] = g["lr"].to(torch.float32)


_AO_CLASSES: dict[str, type] = {}


def _ao_class(name: str) -> type:
    if name not in _AO_CLASSES:
        import torchao.optim

        base = getattr(torchao.optim, name)
        _AO_CLASSES[name] = type(name, (_FlatStateDict, base), {"__module__": __name__, "__doc__": base.__doc__})
    return _AO_CLASSES[name]


def keeps_low_precision_weights(name: str) -> bool:
    """Whether optimizer ``name`` updates bf16 weights without losing small steps (no fp32 master copy needed).

    ``adamw_bf16`` is built for bf16 weights; optimi's optimizers add Kahan summation; torchao's round
    the bf16 update stochastically (``bf16_stochastic_round``, set in :func:`build_lowmem_optimizer`).
    bitsandbytes' 8-bit optimizers do neither, so they get fp32 master weights. The full fine-tune
    (:mod:`trainer_core.train.fullft`) and the memory estimate (:mod:`trainer_core.memory.estimate`)
    both ask this.
    """
    return name == "adamw_bf16" or name in AO_OPTIMIZERS or name in OPTIMI_OPTIMIZERS or name in (
        "optimi-stableadamw",
        "optimi-lion",
    )
