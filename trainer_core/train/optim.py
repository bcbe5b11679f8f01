"""Optimizers, learning-rate schedules and gradient clipping, built from an :class:`OptimizerSpec`.

Two optimizers are our own: :class:`AdamWBF16` (AdamW for bf16 weights, with stochastic rounding so
small updates are not lost to bf16's 8-bit mantissa) and :class:`Lion`. The optional ones
(``optimi-*``, ``prodigy``, and the low-memory ``ao-*`` / ``bnb-*`` of :mod:`.lowmem_optim`) come
from their packages and fail with an install hint when missing, because they are not dependencies
of the trainer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

from ..errors import ConfigError
from ..spec import OptimizerSpec
from .lowmem_optim import LOWMEM_OPTIMIZERS, build_lowmem_optimizer

log = logging.getLogger(__name__)

ParamsT = Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]

_LION_DEFAULT_BETA2 = 0.99


# --------------------------------------------------------------------------- stochastic rounding


def stochastic_round_to_bf16(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round an fp32 tensor to bf16, up or down at random in proportion to the distance.

    bf16 is fp32 with the low 16 mantissa bits dropped. Adding uniform random bits below the cut
    before truncating rounds up with probability equal to the discarded fraction, so the rounding
    is unbiased: an update far smaller than one bf16 ulp still moves the weight *on average*,
    where round-to-nearest would discard it every single step. Works on the sign-magnitude bit
    pattern, so negative values round symmetrically and carries into the exponent are correct.
    """
    value = value.to(torch.float32).contiguous()
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    bits = value.view(torch.int32) + noise
    bits.bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent and the 7 bf16 mantissa bits
    return bits.view(torch.float32).to(torch.bfloat16)


def _step_generator(device: torch.device, seed: int, step: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, step, parameter index): resumed runs replay exactly."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step * 7919 + index) % (2**63 - 1))
    return gen


# --------------------------------------------------------------------------- AdamW with bf16 weights


class AdamWBF16(torch.optim.Optimizer):
    """AdamW whose math runs in fp32 but whose bf16 weights and moments stay bf16.

    Why: training bf16 weights with plain AdamW loses most small updates (a LoRA step is often below
    one bf16 ulp of the weight), and fp32 master weights plus fp32 moments cost 10 bytes per
    parameter. Here a bf16 parameter keeps ``exp_avg`` / ``exp_avg_sq`` in bf16 (4 bytes of state)
    and both the weight and the moments are written back with :func:`stochastic_round_to_bf16`;
    the moments need it too, or ``exp_avg_sq`` could never decay by 0.1 % per step in bf16.
    The random bits come from a generator seeded by ``(seed, step, parameter index)``, so a run
    (and a resumed run) is reproducible. Parameters of any other dtype get fp32 moments and the
    exact update of ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "seed": seed}
        super().__init__(params, defaults)

    def _state_for(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            moment_dtype = torch.bfloat16 if p.dtype == torch.bfloat16 else torch.float32
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd, seed = group["eps"], group["weight_decay"], group["seed"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16 does not support sparse gradients")
                state = self._state_for(p)
                state["step"] += 1
                step = state["step"]
                grad = p.grad.float()
                bias_correction1 = 1.0 - beta1**step
                bias_correction2 = 1.0 - beta2**step
                step_size = lr / bias_correction1
                if p.dtype == torch.bfloat16:
                    gen = _step_generator(p.device, seed, step, index)
                    exp_avg = state["exp_avg"].float().lerp_(grad, 1.0 - beta1)
                    exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                    weight = p.float().mul_(1.0 - lr * wd).addcdiv_(exp_avg, denom, value=-step_size)
                    p.copy_(stochastic_round_to_bf16(weight, gen))
                    state["exp_avg"].copy_(stochastic_round_to_bf16(exp_avg, gen))
                    state["exp_avg_sq"].copy_(stochastic_round_to_bf16(exp_avg_sq, gen))
                elif p.dtype == torch.float32:
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    p.mul_(1.0 - lr * wd)
                    exp_avg.lerp_(grad, 1.0 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                else:  # fp16 and friends: fp32 math, round-to-nearest write-back
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    exp_avg.lerp_(grad, 1.0 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                    p.copy_(p.float().mul_(1.0 - lr * wd).addcdiv_(exp_avg, denom, value=-step_size))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping the moments in the dtype this optimizer keeps them in.

        ``Optimizer.load_state_dict`` casts floating state to the parameter's dtype, which would
        squeeze the fp32 moments of an fp16 parameter into fp16; they are re-read from the saved
        tensors instead.
        """
        saved_state = dict(state_dict["state"])
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            moment_dtype = torch.bfloat16 if p.dtype == torch.bfloat16 else torch.float32
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = saved_state[pid][key].to(device=p.device, dtype=moment_dtype)
            state["step"] = int(state["step"])


# --------------------------------------------------------------------------- Lion


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    The update is the *sign* of an interpolation between momentum and gradient, so every weight
    moves by exactly ``lr`` per step; that needs one state tensor instead of Adam's two, and a
    learning rate 3-10x smaller than AdamW's. Weight decay is decoupled (scaled by lr, as AdamW).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, _LION_DEFAULT_BETA2),
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                grad = p.grad
                p.mul_(1.0 - lr * wd)
                update = exp_avg.lerp(grad, 1.0 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.lerp_(grad, 1.0 - beta2)
        return loss


# --------------------------------------------------------------------------- factory


def _missing(package: str, optimizer: str) -> ConfigError:
    return ConfigError(
        f"optimizer {optimizer!r} needs the {package} package, which is not installed",
        f"pip install {package} (in the Python environment that runs the trainer), or choose another optimizer",
    )


def build_optimizer(
    params: list[torch.nn.Parameter] | list[dict], spec: OptimizerSpec, lr: float, seed: int = 0
) -> torch.optim.Optimizer:
    """The optimizer ``spec.optimizer`` names, over ``params`` (tensors or param-group dicts).

    ``lr`` is passed separately because the spec's learning rate may be None until the family
    fills it in. ``seed`` only feeds AdamWBF16's stochastic rounding. For Lion, beta2 defaults to
    its paper's 0.99 unless ``adam_beta2`` was set explicitly (0.999 is Adam's default, not Lion's).
    """
    name = spec.optimizer
    betas = (spec.adam_beta1, spec.adam_beta2)
    wd = spec.adam_weight_decay
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=spec.adam_epsilon, weight_decay=wd)
    if name == "adamw_bf16":
        return AdamWBF16(params, lr=lr, betas=betas, eps=spec.adam_epsilon, weight_decay=wd, seed=seed)
    if name in ("lion", "optimi-lion"):
        if "adam_beta2" not in spec.model_fields_set:
            betas = (spec.adam_beta1, _LION_DEFAULT_BETA2)
        if name == "lion":
            return Lion(params, lr=lr, betas=betas, weight_decay=wd)
        try:
            import optimi
        except ImportError:
            raise _missing("torch-optimi", name) from None
        return optimi.Lion(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "optimi-stableadamw":
        try:
            import optimi
        except ImportError:
            raise _missing("torch-optimi", name) from None
        return optimi.StableAdamW(params, lr=lr, betas=betas, weight_decay=wd, eps=spec.adam_epsilon)
    if name in LOWMEM_OPTIMIZERS:
        return build_lowmem_optimizer(name, params, lr, betas, spec.adam_epsilon, wd)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise _missing("prodigyopt", name) from None
        return Prodigy(params, lr=lr, betas=betas, eps=spec.adam_epsilon, weight_decay=wd)
    raise ConfigError(f"unknown optimizer {name!r}")  # the spec validates names; kept for safety


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, spec: OptimizerSpec, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``spec.lr_scheduler`` names, as a multiplier of each group's initial lr.

    Schedules come from diffusers so curves match SimpleTuner's. Two adjustments: ``constant`` with
    warm-up steps becomes ``constant_with_warmup`` (plain ``constant`` would ignore them), and
    ``polynomial`` is built directly because ``get_scheduler`` does not pass ``lr_end``.
    """
    name = spec.lr_scheduler
    warmup = spec.lr_warmup_steps
    if name == "constant" and warmup > 0:
        log.info("lr_scheduler 'constant' with lr_warmup_steps=%d: using constant_with_warmup", warmup)
        name = "constant_with_warmup"
    if warmup > total_steps and name not in ("constant", "constant_with_warmup"):
        log.warning("lr_warmup_steps (%d) is longer than the run (%d steps)", warmup, total_steps)
    if name == "polynomial":
        lr_init = optimizer.defaults["lr"]
        if not lr_init > spec.lr_end:
            raise ConfigError(
                f"lr_end ({spec.lr_end}) must be smaller than the learning rate ({lr_init}) for the polynomial schedule"
            )
        return get_polynomial_decay_schedule_with_warmup(
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            lr_end=spec.lr_end,
            power=spec.lr_power,
        )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        num_cycles=spec.lr_num_cycles,
        power=spec.lr_power,
    )


def clip_gradients(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> float | None:
    """Clip gradients as the spec says; returns the total gradient norm (before clipping) or None.

    ``max_grad_norm == 0`` disables clipping. ``norm`` rescales all gradients together so their
    global L2 norm is at most ``max_grad_norm`` (and reports that norm for logging); ``value``
    clamps each element into ``[-max_grad_norm, max_grad_norm]``, SimpleTuner's ``value`` method.
    """
    if spec.max_grad_norm <= 0:
        return None
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    if spec.grad_clip_method == "value":
        torch.nn.utils.clip_grad_value_(params, spec.max_grad_norm)
        return None
    return float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm))
