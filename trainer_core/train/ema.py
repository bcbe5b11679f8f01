"""Exponential moving average of the trainable (adapter) weights.

An EMA of the weights averages out the step-to-step noise of small-batch LoRA training, which
usually gives a smoother, less over-fitted adapter than the last raw step. Only the trainable
parameters are tracked (a LoRA is megabytes), in fp32 so that ``(1 - decay)``-sized increments are
not lost, optionally on the CPU to keep them off the accelerator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class EMA:
    """fp32 shadow copies of ``params``, updated with a warm-up decay.

    The decay used at step ``n`` is ``min(decay, (1 + n) / (10 + n))``: early on the shadow follows
    the weights closely (the initial weights are not worth remembering), later it settles at
    ``decay``. Parameters are matched by position, so pass the same list, in the same order, to
    every method.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, device: str | torch.device = "cpu") -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.device = torch.device(device)
        self._params = list(params)
        self._shadow = [p.detach().to(device=self.device, dtype=torch.float32, copy=True) for p in self._params]

    def current_decay(self, step: int) -> float:
        """The decay :meth:`update` uses at ``step`` (warm-up, then capped at ``decay``)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int, params: Sequence[torch.nn.Parameter] | None = None) -> None:
        """``shadow = d * shadow + (1 - d) * param`` with ``d = current_decay(step)``.

        ``params`` defaults to the parameters given at construction (kept by reference), so the
        trainer can simply call ``ema.update(step)`` after each optimizer step.
        """
        params = self._params if params is None else params
        self._check(params)
        d = self.current_decay(step)
        for shadow, p in zip(self._shadow, params):
            shadow.lerp_(p.detach().to(device=self.device, dtype=torch.float32), 1.0 - d)

    def shadow_params(self) -> list[torch.Tensor]:
        """The fp32 averaged weights (live tensors: do not modify)."""
        return list(self._shadow)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter] | None = None) -> None:
        """Overwrite ``params`` (default: the tracked ones) with the averaged weights, cast to their dtype."""
        params = self._params if params is None else params
        self._check(params)
        for shadow, p in zip(self._shadow, params):
            p.copy_(shadow.to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, params: Sequence[torch.nn.Parameter] | None = None) -> Iterator[None]:
        """Temporarily load the averaged weights into ``params`` (for validation or export).

        The originals are backed up bit-exactly, in their own dtype, and restored on exit even if
        the body raises, so training resumes from exactly the raw weights.
        """
        params = self._params if params is None else params
        self._check(params)
        with torch.no_grad():  # kept where the shadow lives (the CPU by default): a full model's weights are GBs
            backup = [p.detach().to(self.device, copy=True) for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """Decay and shadow weights (on the CPU, so checkpoints load anywhere)."""
        # no clone: the caller writes them out (a CPU shadow of a full fine-tune is GBs); load copies
        return {"decay": self.decay, "shadow": [s.detach().cpu() for s in self._shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self._shadow):
            raise ValueError(f"EMA state holds {len(shadow)} tensors, this EMA tracks {len(self._shadow)}")
        for i, (mine, saved) in enumerate(zip(self._shadow, shadow)):
            if mine.shape != saved.shape:
                raise ValueError(f"EMA tensor {i}: saved shape {tuple(saved.shape)} != {tuple(mine.shape)}")
        self.decay = float(state["decay"])
        self._shadow = [s.to(device=self.device, dtype=torch.float32, copy=True) for s in shadow]

    # ------------------------------------------------------------------ internals
    def _check(self, params: Sequence[torch.nn.Parameter]) -> None:
        if len(params) != len(self._shadow):
            raise ValueError(f"EMA tracks {len(self._shadow)} parameters, got {len(params)}")
