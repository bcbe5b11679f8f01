"""Quantised, frozen base weights under a trainable LoRA (optimum-quanto or torchao).

Order matters: the base transformer is quantised *before* the LoRA is added, so PEFT wraps the
quantised linears (``QLinear`` / torchao linears) and its A/B matrices stay ordinary fp32
trainable weights. Quantising after the LoRA would either quantise A/B too or swap the base
layers out from under PEFT.

Which layers stay in full precision is a per-family decision (``ModelFamily.quantization_exclude``):
embedders, time and modulation layers, the output projection and norms are small but sensitive,
so quantising them saves little memory and costs quality. Entries are module names (the module
and everything under it) or shell-style patterns (``*norm*``).

``quantize_via``: ``cpu`` quantises before the model moves to the accelerator, so the
full-precision weights never occupy device memory (slower, and what makes a 16 GB card work);
``accelerator`` moves first and quantises there (faster, needs room for the full-precision model).

Text encoders use the same code while the text cache is filled (``text_encoder_1_precision``,
``text_encoder_2_precision``). Quantising Qwen2.5-VL (Kandinsky 5) is discouraged: the cached
embeddings then differ from the full-precision ones ComfyUI feeds the model at inference.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

NO_CHANGE = "no_change"
QUANTO_QTYPES = {"int8-quanto": "qint8", "fp8-quanto": "qfloat8", "int4-quanto": "qint4"}
TORCHAO_CONFIGS = {"int8-torchao": "Int8WeightOnlyConfig", "fp8-torchao": "Float8WeightOnlyConfig"}

# Text encoders: token embeddings, norms, the unused LM head and the vision tower stay as they are.
TEXT_ENCODER_EXCLUDE = ["*embed*", "*norm*", "lm_head", "*visual*"]


@dataclass
class QuantizationResult:
    """What one quantisation pass did; reported in the ``memory`` event."""

    precision: str = NO_CHANGE
    backend: str | None = None
    quantized: list[str] = field(default_factory=list)  # module names now holding quantised weights
    kept: list[str] = field(default_factory=list)  # linear layers the exclude list left unquantised

    @property
    def active(self) -> bool:
        return self.precision != NO_CHANGE


def backend_of(precision: str) -> str | None:
    """'quanto', 'torchao' or None for no_change."""
    if precision in QUANTO_QTYPES:
        return "quanto"
    if precision in TORCHAO_CONFIGS:
        return "torchao"
    if precision == NO_CHANGE:
        return None
    raise ConfigError(f"unknown precision {precision!r}", f"use one of: no_change, {', '.join(QUANTO_QTYPES)}, ...")


def backend_available(backend: str) -> bool:
    """True if the backend's package can be imported (torchao is optional, quanto a dependency)."""
    module = {"quanto": "optimum.quanto", "torchao": "torchao"}[backend]
    try:
        if importlib.util.find_spec(module) is None:
            return False
        importlib.import_module(module)
    except Exception:  # a broken install (missing CUDA kernels, version clash) counts as missing
        return False
    return True


def missing_backend_error(key: str, precision: str) -> ConfigError:
    """The error for a precision whose package is not installed, naming the install command."""
    backend = backend_of(precision)
    package = {"quanto": "optimum-quanto", "torchao": "torchao"}[backend or "quanto"]
    return ConfigError(
        f"{key} {precision!r} needs {package}, which is not installed (or does not import) in this Python",
        f"pip install {package} (into the environment that runs training), "
        "or choose int8-quanto / fp8-quanto, or no_change",
    )


def exclude_patterns(exclude: Iterable[str]) -> list[str]:
    """Module names become 'name' and 'name.*' (the module and its subtree); patterns stay as given."""
    out: list[str] = []
    for entry in exclude:
        out.append(entry)
        if not entry.endswith("*"):
            out.append(entry + ".*")
    return out


def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """A quanto or torchao weight (both are tensor subclasses from those packages)."""
    module = type(t).__module__
    return module.startswith("optimum.quanto") or module.startswith("torchao")


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """Names of modules whose own weight is quantised."""
    out = []
    for name, m in model.named_modules():
        w = m._parameters.get("weight")
        if w is not None and is_quantized_tensor(w):
            out.append(name)
    return out


def quantize_model(
    model: torch.nn.Module, precision: str, exclude: Iterable[str] = (), *, key: str = "base_model_precision"
) -> QuantizationResult:
    """Quantise ``model``'s linear weights in place and freeze them; ``exclude`` stays full precision."""
    backend = backend_of(precision)
    result = QuantizationResult(precision=precision, backend=backend)
    if backend is None:
        return result
    if not backend_available(backend):
        raise missing_backend_error(key, precision)
    patterns = exclude_patterns(exclude)
    if backend == "quanto":
        _quantize_quanto(model, precision, patterns)
    else:
        _quantize_torchao(model, precision, patterns)
    model.requires_grad_(False)
    _own_float_tensors(model)
    result.quantized = quantized_modules(model)
    result.kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and is_excluded(n, patterns)]
    if not result.quantized:
        log.warning("%s %s quantised no layer of %s", key, precision, type(model).__name__)
    return result


def _quantize_quanto(model: torch.nn.Module, precision: str, patterns: list[str]) -> None:
    from optimum import quanto
    from optimum.quanto.nn import QModuleMixin

    qtype = getattr(quanto, QUANTO_QTYPES[precision])
    # Whole model at once is fine: each QLinear shares its float weight rather than copying it, so
    # quantising layer by layer measured the same peak (within 1 MiB, bench/README.md).
    quanto.quantize(model, weights=qtype, exclude=patterns or None)
    # quanto.freeze(model), one layer at a time: each layer's float temporaries are handed back to the
    # OS before the next (glibc keeps them otherwise: +0.45 GB peak RSS on a 100 M-parameter model).
    for module in model.modules():
        if isinstance(module, QModuleMixin):
            module.freeze()
            release_freed_memory()


def _own_float_tensors(model: torch.nn.Module) -> None:
    """Copy the weights left unquantised (small) out of the checkpoint file's memory map.

    ``from_pretrained`` maps the safetensors file and the weights point into it. Quantisation reads
    every page, and while any weight still points into the map all of it stays resident: on the CPU
    the full float checkpoint would remain in RSS next to its int8 copy. Tied weights stay tied.
    """
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original kept alive: ids stay unique, copy)
    with torch.no_grad():
        for module in model.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, t in table.items():
                    if t is None or t.device.type != "cpu" or is_quantized_tensor(t):
                        continue
                    if id(t) not in copies:
                        copy = t.detach().clone()
                        copies[id(t)] = (t, torch.nn.Parameter(copy, requires_grad=False) if is_param else copy)
                    table[name] = copies[id(t)][1]
    copies.clear()  # the originals go, and with them the last references into the file's map
    release_freed_memory()


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = _find_malloc_trim()
    if _malloc_trim:
        _malloc_trim(0)


def _find_malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl)
        return False


_malloc_trim: Any = None


def _quantize_torchao(model: torch.nn.Module, precision: str, patterns: list[str]) -> None:
    import torchao.quantization as tq

    config_cls = getattr(tq, TORCHAO_CONFIGS[precision], None)
    if config_cls is None:
        raise ConfigError(
            f"the installed torchao has no {TORCHAO_CONFIGS[precision]} (needed for {precision})",
            "pip install -U torchao",
        )

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        """Linear and not excluded; before each layer it picks, the previous one's freed memory goes back.

        ``quantize_`` works layer by layer, but glibc keeps what each layer freed (its temporaries,
        and the float weight where it was not mapped from the file): +290 MiB anonymous peak on the
        130 M-parameter bench model without this, none with it (bench/README.md).
        """
        if not isinstance(module, torch.nn.Linear) or is_excluded(fqn, patterns):
            return False
        release_freed_memory()
        return True

    tq.quantize_(model, config_cls(), filter_fn=wanted)
    release_freed_memory()


def quantize_for_device(
    model: torch.nn.Module,
    precision: str,
    exclude: Iterable[str],
    device: torch.device,
    via: str,
    *,
    key: str = "base_model_precision",
    move: bool = True,
) -> QuantizationResult:
    """Quantise on the CPU then move (``via='cpu'``) or move then quantise (``'accelerator'``).

    ``move=False`` leaves the model where quantisation happened (group offload places it itself).
    """
    if precision == NO_CHANGE:
        if move:
            model.to(device)
        return QuantizationResult()
    if via == "accelerator":
        model.to(device)
        return quantize_model(model, precision, exclude, key=key)
    model.to("cpu")
    result = quantize_model(model, precision, exclude, key=key)
    if move:
        model.to(device)
    return result
