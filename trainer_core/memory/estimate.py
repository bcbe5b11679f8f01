"""What the trained weights cost besides themselves: gradients, optimizer state, EMA (data, not guesses in code).

A LoRA's training state is megabytes; a full fine-tune's is several times the model. The parts,
per trained parameter, are:

- the weight itself: in the dtype it trains in (a full fine-tune keeps bf16 weights with the
  optimizers that update them without losing small steps, ``adamw_bf16``, ``ao-*`` and ``optimi-*``,
  and makes fp32 master weights for the others, see :mod:`trainer_core.train.fullft`; LoRA weights
  are fp32);
- its gradient: the weight's dtype, for every trained weight;
- the optimizer state: :data:`OPTIMIZER_STATES` (state tensors per weight and their element size);
- the EMA shadow: fp32, 4 bytes, on the CPU or the accelerator (``ema_device``).

:data:`OPTIMIZER_STATES` is a table so that a new optimizer slots in with one line; a name that is
not in it is read by its spelling (``8bit``, ``4bit``, ``lion``) by :func:`optimizer_state`, and the
result says it was guessed. Activations are not here: they depend on the model and the step
(``bench/estimate_vram.py`` measures them on a fake-tensor run of the real step).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..train.lowmem_optim import keeps_low_precision_weights

FP32 = 4


@dataclass(frozen=True)
class OptimizerState:
    """Per trained element: ``tensors`` state tensors of ``element_bytes`` each (None: the weight's dtype)."""

    tensors: int
    element_bytes: float | None
    note: str
    known: bool = True
    kahan: bool = False  # one more buffer in the weight's dtype, for low-precision (bf16/fp16) weights only

    def bytes_per_param(self, weight_bytes: float) -> float:
        per_state = weight_bytes if self.element_bytes is None else self.element_bytes
        return self.tensors * per_state + (weight_bytes if self.kahan and weight_bytes < FP32 else 0)


OPTIMIZER_STATES: dict[str, OptimizerState] = {
    # torch AdamW keeps exp_avg and exp_avg_sq in the weight's dtype (fp32 master weights: 8 B/param)
    "adamw": OptimizerState(2, None, "exp_avg + exp_avg_sq in the weight's dtype"),
    # AdamWBF16 keeps its moments in the weight's dtype too: bf16 for a full fine-tune (4 B/param), fp32 for LoRA
    "adamw_bf16": OptimizerState(2, None, "exp_avg + exp_avg_sq in the weight's dtype (bf16 weights: 4 B/param)"),
    "lion": OptimizerState(1, None, "one momentum in the weight's dtype"),
    "optimi-lion": OptimizerState(1, None, "one momentum (+ Kahan buffer) in the weight's dtype", kahan=True),
    "optimi-stableadamw": OptimizerState(2, None, "exp_avg + exp_avg_sq (+ Kahan buffer)", kahan=True),
    "prodigy": OptimizerState(4, None, "exp_avg, exp_avg_sq, s and the initial weights p0"),
    # low-memory optimizers (block-quantised states; the per-block scales add about 1 %)
    "adamw8bit": OptimizerState(2, 1, "two 8-bit states (about 2 B/param)"),
    "adamw4bit": OptimizerState(2, 0.5, "two 4-bit states (about 1 B/param)"),
    "lion8bit": OptimizerState(1, 1, "one 8-bit momentum"),
    # the repository's own low-memory optimizers (trainer_core.train.lowmem_optim; bench/bench_optimizers.py
    # measured 2.06, 1.08 and 2.04 B/param on a tiny model: the block scales)
    "ao-adamw8bit": OptimizerState(2, 1, "two 8-bit states (torchao)"),
    "ao-adamw4bit": OptimizerState(2, 0.5, "two 4-bit states (torchao)"),
    "ao-adamfp8": OptimizerState(2, 1, "two fp8 states (torchao)"),
    "ao-adamwfp8": OptimizerState(2, 1, "two fp8 states (torchao)"),
    "bnb-adamw8bit": OptimizerState(2, 1, "two 8-bit states (bitsandbytes)"),
    "bnb-lion8bit": OptimizerState(1, 1, "one 8-bit momentum (bitsandbytes)"),
    # optimi: moments in the weight's dtype, plus a Kahan compensation buffer for bf16 weights (not fp32)
    "optimi-adamw": OptimizerState(2, None, "exp_avg + exp_avg_sq (+ Kahan buffer) in the weight's dtype", kahan=True),
    "optimi-adam": OptimizerState(2, None, "exp_avg + exp_avg_sq (+ Kahan buffer) in the weight's dtype", kahan=True),
    "optimi-radam": OptimizerState(2, None, "exp_avg + exp_avg_sq (+ Kahan buffer) in the weight's dtype", kahan=True),
    "optimi-ranger": OptimizerState(3, None, "exp_avg + exp_avg_sq + slow weights (+ Kahan buffer)", kahan=True),
}


def optimizer_state(name: str) -> OptimizerState:
    """The table's entry for ``name``, or one read from its spelling (``known=False``) for a new optimizer.

    Names of other tools (``paged_adamw_8bit``, ``adamw4bit_foreach``) match by their
    bits and family: ``4bit`` -> 0.5 B per state, ``8bit`` -> 1 B, else the weight's dtype; ``lion``
    -> one state, anything else Adam-like (two).
    """
    if name in OPTIMIZER_STATES:
        return OPTIMIZER_STATES[name]
    low = name.lower().replace("_", "").replace("-", "")
    tensors = 1 if "lion" in low else 2
    element = 0.5 if "4bit" in low else 1 if "8bit" in low else None
    return OptimizerState(tensors, element, f"not in the table: {tensors} state(s) assumed from the name", known=False)


def full_finetune_weight_bytes(optimizer: str, load_bytes: int) -> int:
    """Bytes per weight of a full fine-tune: the loaded dtype if the optimizer keeps bf16 weights, else fp32 masters."""
    return load_bytes if keeps_low_precision_weights(optimizer) else FP32


@dataclass(frozen=True)
class TrainingState:
    """Bytes of the training state of ``params`` trained parameters (see the module docstring)."""

    params: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    ema_on_device: bool
    optimizer_known: bool

    @property
    def device_bytes(self) -> int:
        """Weights + gradients + optimizer state, + the EMA when it lives on the accelerator."""
        ema = self.ema_bytes if self.ema_on_device else 0
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + ema

    def as_report(self) -> dict[str, int | bool]:
        return {
            "trained_weight_bytes": self.weight_bytes,
            "gradient_bytes": self.gradient_bytes,
            "optimizer_state_bytes": self.optimizer_bytes,
            "optimizer_state_from_table": self.optimizer_known,
            "ema_bytes": self.ema_bytes,
            "training_state_device_bytes": self.device_bytes,
        }


def training_state(
    params: int, weight_bytes: float, optimizer: str, *, ema: bool = False, ema_on_device: bool = False
) -> TrainingState:
    """The training state of ``params`` parameters of ``weight_bytes`` each (a formula: nothing is built)."""
    state = optimizer_state(optimizer)
    return TrainingState(
        params=params,
        weight_bytes=int(params * weight_bytes),
        gradient_bytes=int(params * weight_bytes),
        optimizer_bytes=int(params * state.bytes_per_param(weight_bytes)),
        ema_bytes=params * FP32 if ema else 0,
        ema_on_device=ema and ema_on_device,
        optimizer_known=state.known,
    )


def measured_training_state(
    params: Iterable[torch.Tensor],
    optimizer: str,
    *,
    ema_bytes: int = 0,
    ema_on_device: bool = False,
) -> TrainingState:
    """:func:`training_state` of the live trained parameters: their real dtypes (fp32 masters or not)."""
    params = list(params)
    state = optimizer_state(optimizer)
    n = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    return TrainingState(
        params=n,
        weight_bytes=weights,
        gradient_bytes=weights,
        optimizer_bytes=int(sum(p.numel() * state.bytes_per_param(p.element_size()) for p in params)),
        ema_bytes=ema_bytes,
        ema_on_device=bool(ema_bytes) and ema_on_device,
        optimizer_known=state.known,
    )
