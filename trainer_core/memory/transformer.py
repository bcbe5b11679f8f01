"""The transformer's memory set-up, in the one order that works: load, quantise, add the LoRA, place.

1. load on the CPU when it will be quantised via the CPU or group offloaded (the full-precision
   weights then never touch the GPU), else straight onto the training device;
2. quantise the frozen base (:mod:`.quantize`; the family's ``quantization_exclude`` stays as is);
3. the engine adds the LoRA (PEFT wraps the quantised linears);
4. place: group offload (:mod:`.offload`; the LoRA stays on the device) or move everything to the device.
"""

from __future__ import annotations

from typing import Any

import torch

from ..families.base import ModelFamily
from ..spec import TrainSpec
from .check import use_stream
from .offload import GroupOffloader
from .quantize import NO_CHANGE, QuantizationResult, quantize_for_device
from .report import memory_snapshot, module_bytes, parameter_counts

CPU = torch.device("cpu")


def load_device(spec: TrainSpec, device: torch.device) -> torch.device:
    """Where ``load_transformer`` should put the weights."""
    m = spec.memory
    if m.enable_group_offload or (m.base_model_precision != NO_CHANGE and m.quantize_via == "cpu"):
        return CPU
    return device


def quantize_transformer(
    transformer: torch.nn.Module, spec: TrainSpec, family: ModelFamily, device: torch.device
) -> QuantizationResult:
    """Step 2; leaves the transformer where quantisation ran (``place_transformer`` moves it)."""
    m = spec.memory
    return quantize_for_device(
        transformer, m.base_model_precision, family.quantization_exclude, device, m.quantize_via, move=False
    )


def place_transformer(transformer: torch.nn.Module, spec: TrainSpec, device: torch.device) -> GroupOffloader | None:
    """Step 4, after the LoRA exists (so the offloader can tell trainable weights from frozen ones)."""
    m = spec.memory
    if not m.enable_group_offload:
        transformer.to(device)
        return None
    return GroupOffloader(
        transformer,
        device,
        offload_type=m.group_offload_type,
        blocks_per_group=m.group_offload_blocks_per_group,
        use_stream=use_stream(spec, device),
    )


def offload_mode(offloader: GroupOffloader | None) -> str:
    if offloader is None:
        return "none"
    s = offloader.summary()
    per = f" x{offloader.blocks_per_group}" if s.offload_type == "block_level" else ""
    return f"group:{s.offload_type}{per}{' +stream' if s.use_stream else ''}"


def memory_report(
    transformer: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    quantization: QuantizationResult,
    offloader: GroupOffloader | None,
    gradient_checkpointing: bool,
) -> dict[str, Any]:
    """The payload of the ``memory`` event at the start of training.

    ``transformer_bytes`` counts every weight of the transformer wherever it is (quantised weights
    at their real size); ``transformer_device_bytes`` only what sits on the training device between
    steps (with group offload: the LoRA; on a CPU-only run everything is "on the device").
    """
    return {
        "stage": "training",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": quantization.precision,
        "quantized_modules": len(quantization.quantized),
        "offload": offload_mode(offloader),
        "offload_groups": len(offloader.groups) if offloader else 0,
        "offloaded_bytes": offloader.nbytes() if offloader else 0,
        **parameter_counts(transformer),
        "transformer_bytes": module_bytes(transformer),
        "transformer_device_bytes": module_bytes(transformer, device),
        "gradient_checkpointing": gradient_checkpointing,
        **memory_snapshot(device),
    }
