"""Scheduled Sampling (rollout): train on inputs the model generated itself.

Why: a flow model is trained on inputs that lie exactly on the noise path, ``(1 - sigma) * x0 +
sigma * noise``, but at inference it is fed its own previous steps, which drift off that path
("exposure bias"). Scheduled sampling sometimes replaces the training input by one the model made:
the micro-batch is denoised for a few steps by the *current* weights (the LoRA on, no gradient),
and the ordinary flow-matching loss against the true target is taken on the result. SimpleTuner's
keys and semantics (``documentation/experimental/SCHEDULED_SAMPLING.md``), with these definitions:

- **When.** Per micro-batch, with the probability of the step (:func:`probability_at`: the fixed
  ``scheduled_sampling_probability``, or SimpleTuner's ramp from ``prob_start`` to ``prob_end``
  over ``ramp_steps`` from ``start_step``, linear or cosine). SimpleTuner decides per sample; one
  decision per micro-batch is the same thing at ``train_batch_size`` 1 (the usual setting for these
  models) and keeps a rollout's cost at exactly ``k`` forward passes of the micro-batch.
- **How far.** ``k`` in ``1..scheduled_sampling_max_step_offset`` (``uniform``, ``biased_early``:
  ``1 + round(u^2 (max-1))``, ``biased_late``: ``1 + round((1-u^2)(max-1))``). SimpleTuner draws
  ``0..max``, so there a fired sample rolls out nothing one time in ``max + 1``; here the
  probability is the rollout rate.
- **From where.** One step is ``1 / ROLLOUT_GRID`` of the noise range: SimpleTuner's offsets count
  its 1000 training timesteps. The rollout starts at ``sigma' = min(sigma + k / 1000, 1 - SIGMA_MIN)``
  on the true noise path (the same ``x0`` and noise as the training input), and takes ``k`` Euler
  steps of equal size down to the training ``sigma``, which it reaches exactly. Euler is what
  SimpleTuner uses for flow-matching models whatever ``scheduled_sampling_sampler`` says.
- **Determinism.** The decision and ``k`` come from a generator seeded by the micro-batch's seed
  (the engine's ``_step_seed``) and a fixed salt, never from the shared streams: a run with rollout
  draws the same noise levels and noise as without it, and a resumed run draws what the straight
  run drew. The rollout passes themselves run in the engine's per-micro-batch seeded state.

Elements the family leaves out of the loss (weight 0: the clean conditioning frame of image-to-video)
are conditioning, not generated: they are put back after every step.

**ReflexFlow** (on by default while scheduled sampling is on, as SimpleTuner does for flow-matching
models; ``scheduled_sampling_reflexflow: false`` turns it off) changes the loss of every micro-batch
(:func:`reflexflow_loss`), in the velocity convention ``noise - x0`` whatever the family predicts:

- frequency compensation: for a rolled-out micro-batch, one more no-grad pass predicts on the true
  noisy input (``clean``); ``e = clean - biased`` (``biased``: the training pass's own prediction on
  the rolled-out input, detached, where SimpleTuner runs one more pass for it) re-weights the
  element-wise loss by ``1 + alpha * e / sum|e|`` per sample. Without a rollout ``e`` is 0 (weight 1);
- the flow loss is scaled by ``beta2``;
- anti-drift: ``beta1 * || pred / |pred| - (x_t - x0) / |x_t - x0| ||^2`` per sample is added, the
  prediction's direction against the direction from the data to the input it was given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..families.base import ModelFamily
from ..spec import ScheduledSamplingSpec
from .flow import SIGMA_MIN, flow_loss

ROLLOUT_GRID = 1000
"""Rollout steps per unit of sigma: SimpleTuner counts offsets in its 1000 training timesteps."""

_SALT = 0x5C4ED
"""Mixed into the micro-batch seed so the rollout's draws are a stream of their own."""

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict(noisy, sigma)`` -> the family's raw prediction (the engine binds the text and condition)."""


def probability_at(spec: ScheduledSamplingSpec, step: int) -> float:
    """The rollout probability of optimizer step ``step`` (0-based: the steps already taken).

    Without ``ramp_steps`` it is ``scheduled_sampling_probability``. With one, SimpleTuner's ramp:
    ``prob_start`` (None: the probability) until ``start_step``, then linear or cosine towards
    ``prob_end``, reached after ``ramp_steps`` and kept.
    """
    if spec.scheduled_sampling_ramp_steps <= 0:
        return float(spec.scheduled_sampling_probability)
    start = spec.scheduled_sampling_prob_start
    start = float(spec.scheduled_sampling_probability if start is None else start)
    end = float(spec.scheduled_sampling_prob_end)
    if step < spec.scheduled_sampling_start_step:
        return start
    progress = min(1.0, (step - spec.scheduled_sampling_start_step) / spec.scheduled_sampling_ramp_steps)
    if spec.scheduled_sampling_ramp_shape == "cosine":
        progress = 0.5 - 0.5 * math.cos(math.pi * progress)
    return start + (end - start) * progress


def draw_offset(spec: ScheduledSamplingSpec, step: int, seed: int) -> int:
    """How many rollout steps micro-batch ``seed`` of step ``step`` takes; 0: it trains as usual.

    Draws nothing when the probability is 0, so a run that never rolls out is today's run.
    """
    top = spec.scheduled_sampling_max_step_offset
    p = probability_at(spec, step) if top > 0 else 0.0
    if p <= 0.0:
        return 0
    generator = torch.Generator().manual_seed((seed ^ _SALT) % (2**63 - 1))
    fires, u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    if fires >= p:
        return 0
    if spec.scheduled_sampling_strategy == "biased_early":
        return 1 + round(u * u * (top - 1))
    if spec.scheduled_sampling_strategy == "biased_late":
        return 1 + round((1.0 - u * u) * (top - 1))
    return 1 + min(top - 1, int(u * top))


def rollout_sigmas(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k + 1`` noise levels of a rollout to ``sigma`` (shape ``(k + 1, B)``), noisiest first.

    Row 0 is ``sigma' = min(sigma + k / ROLLOUT_GRID, 1 - SIGMA_MIN)``, rows 1..k are ``k`` equal
    steps down, and row ``k`` is ``sigma`` itself (not a float approximation of it).
    """
    if k < 1:
        raise ValueError(f"a rollout takes at least one step, got {k}")
    sigma = sigma.float()
    start = (sigma + k / ROLLOUT_GRID).clamp(max=1.0 - SIGMA_MIN).maximum(sigma)
    fractions = torch.arange(k + 1, dtype=torch.float32).div(k).view(-1, 1)
    grid = start + (sigma - start) * fractions
    grid[-1] = sigma
    return grid


def velocity_sign(family: ModelFamily) -> float:
    """+1 if the family predicts ``noise - x0`` (dx/dsigma, Kandinsky 5), -1 for ``x0 - noise`` (Lumina 2).

    Read from the family's own ``target`` so a new family needs nothing here; a family whose target
    is not one of those two cannot be rolled out with Euler, and says so.
    """
    one, zero = torch.ones(1), torch.zeros(1)
    towards_noise = float(family.target(zero, one)[0])
    towards_data = float(family.target(one, zero)[0])
    if abs(towards_noise) == 1.0 and towards_data == -towards_noise:
        return towards_noise
    raise ConfigError(
        f"scheduled sampling cannot roll out {family.name}: its training target is not the flow velocity "
        "(noise - x0 or x0 - noise)",
        "set scheduled_sampling_max_step_offset to 0",
    )


@torch.no_grad()
def roll_out(
    family: ModelFamily,
    predict: Predict,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """The self-generated input at ``sigma``: ``k`` Euler steps of the current model from ``sigma'``.

    ``x0`` and ``noise`` are the training pair (on the compute device); the result has the dtype and
    device of ``family.prepare_noisy``'s output for them and carries no autograd history.
    """
    sign = velocity_sign(family)
    grid = rollout_sigmas(sigma.cpu(), k).to(x0.device)
    x, weights = family.prepare_noisy(x0, noise, grid[0])
    held = None if weights is None else (weights.to(x0.device) == 0)
    for j in range(k):
        here, there = grid[j], grid[j + 1]
        velocity = sign * predict(x, here).float()
        step = (there - here).view(-1, *[1] * (x.dim() - 1))
        x = (x.float() + step * velocity).to(x.dtype)
        if held is not None:  # conditioning (e.g. the clean I2V frame) is not generated: put it back
            reference, _ = family.prepare_noisy(x0, noise, there)
            x = torch.where(held, reference, x)
    return x


@dataclass
class Rollout:
    """What :meth:`ScheduledSampling.apply` did to one micro-batch."""

    noisy: torch.Tensor  # the input to train on: self-generated, or the usual one
    passes: int  # extra no-grad forward passes it cost (rollout steps, plus ReflexFlow's clean prediction)
    clean: torch.Tensor | None = None  # ReflexFlow: the prediction on the usual input (rolled out only)


def _per_sample_direction(v: torch.Tensor) -> torch.Tensor:
    flat = v.float().reshape(v.shape[0], -1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)


def reflexflow_loss(
    spec: ScheduledSamplingSpec,
    sign: float,
    pred: torch.Tensor,
    target: torch.Tensor,
    noisy: torch.Tensor,
    x0: torch.Tensor,
    clean: torch.Tensor | None,
    *,
    loss_type: str,
    huber_c: float,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """Per-sample loss with ReflexFlow's terms (see the module docstring); ``sign`` is :func:`velocity_sign`.

    The frequency-compensation weight multiplies the family's own loss weights (the I2V mask), and the
    weighted mean is normalised by the weights' sum as every weighted loss here (SimpleTuner divides
    by the element count; the two differ by at most ``alpha`` / elements).
    """
    fc = None
    if clean is not None and spec.scheduled_sampling_reflexflow_alpha > 0:
        exposure = sign * (clean.float() - pred.detach().float())
        norm = exposure.abs().reshape(exposure.shape[0], -1).sum(dim=1).clamp_min(1e-6)
        fc = 1.0 + spec.scheduled_sampling_reflexflow_alpha * exposure / norm.view(-1, *[1] * (exposure.dim() - 1))
    if fc is not None and weights is not None:
        fc = fc * weights.to(fc.device)
    combined = fc if fc is not None else weights
    loss = flow_loss(pred.float(), target.float(), loss_type, huber_c, weights=combined)
    loss = loss * spec.scheduled_sampling_reflexflow_beta2
    if spec.scheduled_sampling_reflexflow_beta1 > 0:
        drift = _per_sample_direction(sign * pred) - _per_sample_direction(noisy.to(pred.device) - x0.to(pred.device))
        loss = loss + spec.scheduled_sampling_reflexflow_beta1 * drift.pow(2).sum(dim=1)
    return loss


class ScheduledSampling:
    """The engine's handle: decides each micro-batch's rollout and counts the forward passes it cost."""

    def __init__(self, spec: ScheduledSamplingSpec, family: ModelFamily) -> None:
        self.spec = spec
        self.family = family
        self.sign = velocity_sign(family)  # refuses a family that cannot be rolled out, before the first step
        self.reflexflow = spec.reflexflow_enabled
        self.passes_total = 0

    @classmethod
    def build(cls, spec: ScheduledSamplingSpec, family: ModelFamily) -> ScheduledSampling | None:
        """None when the spec never rolls out, so the engine's step is exactly what it was without it."""
        return cls(spec, family) if spec.enabled else None

    def offset(self, step: int, seed: int) -> int:
        """This micro-batch's rollout length (0: none); :func:`draw_offset` of the spec."""
        return draw_offset(self.spec, step, seed)

    def apply(
        self,
        step: int,
        seed: int,
        noisy: torch.Tensor,
        predict: Predict,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        device: torch.device,
    ) -> Rollout:
        """The micro-batch's input to train on: ``noisy`` unchanged (no passes) when it does not fire.

        The rollout runs on ``device``; ``x0``, ``noise`` and ``sigma`` may be on the CPU.
        """
        k = self.offset(step, seed)
        if k == 0:
            return Rollout(noisy, 0)
        rolled = roll_out(self.family, predict, x0.to(device), noise.to(device), sigma, k)
        clean = None
        if self.reflexflow and self.spec.scheduled_sampling_reflexflow_alpha > 0:
            with torch.no_grad():
                clean = predict(noisy, sigma).detach()
            k += 1
        self.passes_total += k
        return Rollout(rolled, k, clean)

    def loss(
        self,
        rollout: Rollout,
        pred: torch.Tensor,
        target: torch.Tensor,
        x0: torch.Tensor,
        *,
        loss_type: str,
        huber_c: float,
        weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-sample loss of the training pass: ReflexFlow's when on, else the plain flow loss."""
        if not self.reflexflow:
            return flow_loss(pred.float(), target.float(), loss_type, huber_c, weights=weights)
        return reflexflow_loss(
            self.spec,
            self.sign,
            pred,
            target,
            rollout.noisy,
            x0,
            rollout.clean,
            loss_type=loss_type,
            huber_c=huber_c,
            weights=weights,
        )
