"""Numeric precision of a run: the frozen weights' dtype, autocast, and fp16 loss scaling.

``mixed_precision`` (SimpleTuner's key) picks how the transformer computes:

- ``bf16``: frozen weights in ``base_model_default_dtype`` (bf16 by default), autocast bf16. bf16 has
  fp32's exponent range, so gradients neither overflow nor underflow and need no scaling.
- ``fp16``: for GPUs without bf16 (T4, V100, RTX 20xx). Frozen weights in fp16 (unless
  ``base_model_default_dtype`` is ``fp32``), autocast fp16, LoRA parameters in fp32 (they are the
  master weights the optimizer updates; :func:`..lora.adapters.add_lora` keeps them fp32). fp16's
  smallest normal number is 6e-5, so small gradients would flush to zero: the loss is multiplied
  by a dynamic scale before ``backward`` (``torch.amp.GradScaler``), gradients are unscaled before
  clipping (so ``max_grad_norm`` means what it says), and a step whose gradients hold inf/NaN is
  skipped and the scale halved. :class:`LossScaler` reports each skip so the engine can emit it.
- ``no``: no autocast; weights in ``base_model_default_dtype``.

On the CPU the engine trains in fp32 (CPU half-precision kernels are slow and some are missing),
unless told otherwise by ``honour_on_cpu`` — the tests use that to run the fp16 path, loss scaling
included, without a GPU.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..spec import TrainingSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class PrecisionPlan:
    """What the engine does with dtypes; see the module docstring."""

    device_type: str
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None  # None: autocast off
    loss_scaling: bool
    note: str | None = None  # a warning for the user, e.g. "training on CPU: using fp32"

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def plan_precision(training: TrainingSpec, device: torch.device, honour_on_cpu: bool = False) -> PrecisionPlan:
    """The precision plan for ``training`` on ``device``; refuses bf16 on a GPU without it."""
    mp = training.mixed_precision
    if device.type == "cpu" and not honour_on_cpu:
        note = None
        if mp != "no" or training.base_model_default_dtype != "fp32":
            note = "training on CPU: using fp32 (bf16/fp16 mixed precision is only used on a GPU)"
        return PrecisionPlan("cpu", torch.float32, None, False, note)
    if mp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "mixed_precision bf16 needs a GPU with bf16 support (Ampere or newer)",
            "use mixed_precision 'fp16' (with loss scaling) on this GPU",
        )
    if mp == "fp16":
        weights = torch.float32 if training.base_model_default_dtype == "fp32" else torch.float16
        return PrecisionPlan(device.type, weights, torch.float16, True)
    weights = DTYPES[training.base_model_default_dtype]
    return PrecisionPlan(device.type, weights, DTYPES[mp] if mp == "bf16" else None, False)


class LossScaler:
    """fp16 loss scaling around one optimizer step; a pass-through when the plan needs none.

    Use: ``scaler.scale(loss).backward()`` for each micro-batch, then ``scaler.unscale(optimizer)``,
    clip, and ``stepped = scaler.step(optimizer)``. ``step`` returns False when the step was skipped
    because the gradients held inf/NaN (the scale is then lowered for the next step).
    """

    def __init__(self, plan: PrecisionPlan) -> None:
        self.enabled = plan.loss_scaling
        self._scaler = torch.amp.GradScaler(plan.device_type, enabled=self.enabled)

    @property
    def scale_value(self) -> float | None:
        return float(self._scaler.get_scale()) if self.enabled else None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self._scaler.scale(loss) if self.enabled else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.enabled:
            self._scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer unless the gradients overflowed; update the scale; True if it stepped."""
        if not self.enabled:
            optimizer.step()
            return True
        before = self._scaler.get_scale()
        self._scaler.step(optimizer)  # skips optimizer.step() itself when the gradients hold inf/NaN
        self._scaler.update()
        # update() lowers the scale only after an overflow (it grows it after growth_interval clean steps)
        return self._scaler.get_scale() >= before

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (scale, growth tracker, factors): JSON-serialisable, for checkpoints."""
        return {k: (float(v) if isinstance(v, float) else v) for k, v in self._scaler.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            self._scaler.load_state_dict(dict(state))
