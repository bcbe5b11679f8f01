"""Flow-matching noise levels and loss.

One convention holds everywhere in the core: ``sigma`` in (0, 1) is the *noise fraction*,

    noisy = (1 - sigma) * x0 + sigma * noise,

so sigma near 1 is almost pure noise. Each family maps sigma onto its own transformer timestep
(Lumina 2 feeds ``1 - sigma``); nothing here knows about that. Keeping one convention matters
because the shift below is only meaningful in this direction: a shift > 1 must push samples towards
*more* noise, which is what the model authors train with. Getting the direction wrong silently
trains on mostly-clean inputs (see ``tests/test_flow.py``).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..spec import TrainingSpec

log = logging.getLogger(__name__)

SIGMA_MIN = 1e-5
"""Sampled sigmas are kept inside [SIGMA_MIN, 1 - SIGMA_MIN]: exactly 0 or 1 make the velocity target
degenerate for some families and break timestep embeddings that take a logarithm."""

LOSS_TYPES = ("l2", "huber", "smooth_l1")


def sample_sigmas(
    batch_size: int,
    generator: torch.Generator,
    *,
    sigmoid_scale: float = 1.0,
    uniform: bool = False,
    shift: float = 1.0,
) -> torch.Tensor:
    """Draw one noise level per sample, fp32 on the generator's device (CPU in the trainer).

    Logit-normal (``sigmoid(scale * N(0, 1))``) by default, as in SD3 / Lumina 2: it spends most
    steps on middle noise levels where the model learns the most. ``uniform`` gives U(0, 1). The
    draw is then shifted with :func:`apply_shift` and kept strictly inside (0, 1).

    Sampling on a dedicated CPU generator keeps the sequence of noise levels reproducible and
    independent of whatever else consumes random numbers on the accelerator.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = generator.device
    if uniform:
        sigma = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)
    else:
        normal = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
        sigma = torch.sigmoid(sigmoid_scale * normal)
    sigma = apply_shift(sigma, shift)
    return sigma.clamp(SIGMA_MIN, 1.0 - SIGMA_MIN)


def apply_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution-dependent timestep shift: ``s*sigma / (1 + (s-1)*sigma)``.

    Monotone, fixes 0 and 1, and moves mass towards high noise for ``s > 1``: larger images keep
    more of their structure at a given sigma, so they need noisier inputs to learn composition.
    ``shift == 1`` is the identity.
    """
    if shift <= 0:
        raise ConfigError(f"flow shift must be > 0, got {shift}")
    if shift == 1.0:
        return sigma
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def auto_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Shift for a given number of image tokens: ``exp(mu)``, mu linear in the sequence length.

    The line goes through ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)`` and is
    extrapolated (not clamped) outside, matching diffusers' ``calculate_shift`` used at inference,
    so training sees the same noise levels the sampler will use.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


def resolve_shift(training: TrainingSpec, family_default_shift: float, image_seq_len: int) -> float:
    """The shift a run uses, from the spec, the family's default and the image size.

    ``flow_schedule_auto_shift`` picks :func:`auto_shift`; a static ``flow_schedule_shift`` > 0 next
    to it is a contradiction (SimpleTuner users set the shift to 0 to mean "auto"), so it is an
    error rather than a silent choice. Without auto shift the static value wins, else the family's.
    """
    static = training.flow_schedule_shift
    if training.flow_schedule_auto_shift:
        if static:
            raise ConfigError(
                f"flow_schedule_auto_shift is on and flow_schedule_shift is {static}; they contradict each other",
                "set flow_schedule_shift to 0 (or remove it) to use the automatic shift, "
                "or turn flow_schedule_auto_shift off to use the static shift",
            )
        shift = auto_shift(image_seq_len)
        log.debug("auto shift %.4f for %d image tokens", shift, image_seq_len)
        return shift
    if static is not None:
        if static <= 0:
            raise ConfigError(
                "flow_schedule_shift is 0, which would train on clean images only",
                "use a shift > 0 (1 = no shift), or set flow_schedule_auto_shift",
            )
        return float(static)
    return float(family_default_shift)


def flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_c: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss, shape ``(B,)``, computed in fp32.

    Returned unreduced over the batch so the caller can weight or log samples individually.
    ``weights`` (broadcastable to ``pred``) turns the mean into ``sum(w*l) / sum(w)`` per sample,
    so masked-out elements (e.g. frames left out of the loss) neither count nor dilute the rest.
    ``huber`` is SimpleTuner's pseudo-Huber ``2c(sqrt(d^2 + c^2) - c)``: quadratic for small errors,
    linear for outliers. ``smooth_l1`` is torch's with ``beta = huber_c``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p = pred.float()
    t = target.float()
    if loss_type == "l2":
        elem = (p - t) ** 2
    elif loss_type == "huber":
        elem = 2.0 * huber_c * (torch.sqrt((p - t) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1":
        elem = F.smooth_l1_loss(p, t, reduction="none", beta=huber_c)
    else:
        raise ConfigError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")

    batch = elem.shape[0]
    if weights is None:
        return elem.reshape(batch, -1).mean(dim=1)
    w = weights.to(device=elem.device, dtype=torch.float32).expand_as(elem).reshape(batch, -1)
    weighted = (elem.reshape(batch, -1) * w).sum(dim=1)
    # A sample whose weights are all zero contributes 0 rather than NaN.
    return weighted / w.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
