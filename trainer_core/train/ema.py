"""Exponential moving average of the trainable (adapter) weights.

An EMA of the weights averages out the step-to-step noise of small-batch LoRA training, which
usually gives a smoother, less over-fitted adapter than the last raw step. Only the trainable
parameters are tracked (a LoRA is megabytes), in fp32 so that ``(1 - decay)``-sized increments are
not lost. Where they live and when they move follows SimpleTuner's keys (see :func:`ema_devices`):
``ema_device`` ``cpu`` (default) or ``accelerator``, ``ema_cpu_only``, ``ema_update_interval``.
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

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        decay: float,
        device: str | torch.device = "cpu",
        *,
        update_interval: int = 1,
        update_device: str | torch.device | None = None,
    ) -> None:
        """``device``: where the shadow lives; ``update_device``: where :meth:`update` does its arithmetic
        (None: ``device``). With a CPU shadow and an accelerator ``update_device`` each shadow tensor goes
        to the accelerator, is updated there and comes back, one tensor at a time (so the accelerator
        holds at most one extra tensor). ``update_interval`` N: only steps N-1, 2N-1, ... (0-based, i.e.
        after N, 2N, ... optimizer steps) update the shadow.
        """
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if update_interval < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {update_interval}")
        self.decay = float(decay)
        self.device = torch.device(device)
        self.update_device = self.device if update_device is None else torch.device(update_device)
        self.update_interval = int(update_interval)
        self._params = list(params)
        self._shadow = [self._new_shadow(p) for p in self._params]

    def should_update(self, step: int) -> bool:
        """True when :meth:`update` at 0-based ``step`` changes the shadow (every ``update_interval`` steps)."""
        return (step + 1) % self.update_interval == 0

    def current_decay(self, step: int) -> float:
        """The decay :meth:`update` uses at ``step`` (warm-up, then capped at ``decay``)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int, params: Sequence[torch.nn.Parameter] | None = None) -> bool:
        """``shadow = d * shadow + (1 - d) * param`` with ``d = current_decay(step)``, if :meth:`should_update`.

        ``params`` defaults to the parameters given at construction (kept by reference), so the
        trainer can simply call ``ema.update(step)`` after each optimizer step. The decay is that of
        the global ``step`` (as SimpleTuner's), not of the number of updates made. Returns whether
        the shadow was updated.
        """
        params = self._params if params is None else params
        self._check(params)
        if not self.should_update(step):
            return False
        d = self.current_decay(step)
        here = self.update_device
        for shadow, p in zip(self._shadow, params):
            value = p.detach().to(device=here, dtype=torch.float32)
            if here == self.device:
                shadow.lerp_(value, 1.0 - d)
            else:  # shuttle: to the update device, update, back (one tensor at a time)
                moved = shadow.to(here, non_blocking=True)
                moved.lerp_(value, 1.0 - d)
                shadow.copy_(moved)
        return True

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
        with torch.no_grad():  # on the CPU, even with an accelerator shadow: a full model's weights are GBs
            backup = [p.detach().to("cpu", copy=True) for p in params]
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
        self._shadow = [self._new_shadow(s) for s in shadow]

    def nbytes(self) -> int:
        """Bytes of the shadow (fp32: 4 per tracked element), wherever it lives."""
        return sum(s.numel() * s.element_size() for s in self._shadow)

    # ------------------------------------------------------------------ internals
    def _new_shadow(self, t: torch.Tensor) -> torch.Tensor:
        shadow = t.detach().to(device=self.device, dtype=torch.float32, copy=True)
        if self.device.type == "cpu" and self.update_device.type == "cuda":
            with contextlib.suppress(RuntimeError):  # pinned host memory: faster, asynchronous shuttles
                shadow = shadow.pin_memory()
        return shadow

    def _check(self, params: Sequence[torch.nn.Parameter]) -> None:
        if len(params) != len(self._shadow):
            raise ValueError(f"EMA tracks {len(self._shadow)} parameters, got {len(params)}")


def ema_devices(
    ema_device: str, cpu_only: bool, training_device: str | torch.device
) -> tuple[torch.device, torch.device]:
    """``(where the shadow lives, where it is updated)`` for SimpleTuner's ``ema_device`` / ``ema_cpu_only``.

    - ``accelerator``: both on the training device (fastest; the shadow costs VRAM). ``ema_cpu_only``
      has no effect, as in SimpleTuner.
    - ``cpu``: the shadow lives on the CPU and is updated on the training device (each tensor moved
      there and back), unless ``ema_cpu_only``: then the update runs on the CPU too (no transfers).

    On a CPU-only machine the training device is the CPU, so every combination is ``(cpu, cpu)``.
    """
    train = torch.device(training_device)
    if ema_device == "accelerator":
        return train, train
    if ema_device != "cpu":
        raise ValueError(f"ema_device must be 'cpu' or 'accelerator', got {ema_device!r}")
    cpu = torch.device("cpu")
    return cpu, (cpu if cpu_only else train)


def build_ema(params: Sequence[torch.nn.Parameter], training: Any, training_device: str | torch.device) -> EMA:
    """The EMA a TrainSpec's ``training`` section asks for (``ema_decay``, ``ema_device``, ...)."""
    store, update = ema_devices(training.ema_device, training.ema_cpu_only, training_device)
    return EMA(
        params,
        training.ema_decay,
        store,
        update_interval=training.ema_update_interval,
        update_device=update,
    )
