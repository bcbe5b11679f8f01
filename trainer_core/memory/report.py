"""Measuring memory: what a module really occupies, on which device, and what the process holds.

``numel * element_size`` of a quantised weight reports its logical (dequantised) size; the bytes
that sit in memory are those of its inner tensors (int8 data plus scales), so every count here
goes through :func:`trainer_core.memory.offload.inner_tensors`.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable

import torch

from .offload import inner_tensors
from .quantize import is_quantized_tensor


def same_device(t: torch.device, device: torch.device) -> bool:
    """True if ``t`` is on ``device`` ('cuda' matches 'cuda:0' when no index is given)."""
    if t.type != device.type:
        return False
    return device.index is None or t.index is None or t.index == device.index


def tensor_bytes(t: torch.Tensor, device: torch.device | None = None) -> int:
    """Bytes of ``t``'s storage (inner tensors for quantised weights), optionally only those on ``device``."""
    total = 0
    for inner in inner_tensors(t):
        if inner.device.type == "meta":
            continue
        if device is None or same_device(inner.device, device):
            total += inner.numel() * inner.element_size()
    return total


def module_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def module_bytes(module: torch.nn.Module, device: torch.device | None = None) -> int:
    """Bytes of all parameters and buffers of ``module`` (on ``device`` only, if given)."""
    return sum(tensor_bytes(t, device) for t in module_tensors(module))


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    """Total, trainable and quantised parameter counts (logical element counts)."""
    params = list(module.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "quantized_parameters": sum(p.numel() for p in params if is_quantized_tensor(p)),
    }


def process_rss() -> tuple[int | None, int | None]:
    """(current, peak) resident set size of this process in bytes; None where unknown."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
    try:
        import psutil

        return psutil.Process().memory_info().rss, peak_bytes
    except Exception:  # psutil missing: read /proc on Linux, else only the peak
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            import os

            return pages * os.sysconf("SC_PAGE_SIZE"), peak_bytes
        except Exception:
            return None, peak_bytes


def cuda_stats(device: torch.device) -> dict[str, int | None]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"cuda_allocated": None, "cuda_peak": None, "cuda_reserved": None}
    return {
        "cuda_allocated": torch.cuda.memory_allocated(device),
        "cuda_peak": torch.cuda.max_memory_allocated(device),
        "cuda_reserved": torch.cuda.memory_reserved(device),
    }


def memory_snapshot(device: torch.device) -> dict[str, int | None]:
    """Process RSS and (on CUDA) allocator figures, for stage-by-stage ``memory`` events."""
    rss, peak = process_rss()
    return {"rss_bytes": rss, "peak_rss_bytes": peak, **cuda_stats(device)}
