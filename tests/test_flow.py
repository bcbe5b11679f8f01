"""Noise levels and loss of flow matching (``trainer_core.train.flow``).

Convention under test: sigma is the noise fraction, noisy = (1 - sigma) * x0 + sigma * noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer_core.errors import ConfigError
from trainer_core.spec import TrainingSpec
from trainer_core.train.flow import apply_shift, auto_shift, flow_loss, resolve_shift, sample_sigmas


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- sampling


def test_sample_sigmas_shape_dtype_and_range() -> None:
    s = sample_sigmas(4096, _gen(), shift=5.0)
    assert s.shape == (4096,) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert bool(((s > 0) & (s < 1)).all()), "sigma must stay strictly inside (0, 1)"


def test_sample_sigmas_is_reproducible_from_the_generator() -> None:
    assert torch.equal(sample_sigmas(8, _gen(3)), sample_sigmas(8, _gen(3)))
    assert not torch.equal(sample_sigmas(8, _gen(3)), sample_sigmas(8, _gen(4)))


def test_logit_normal_is_centred_on_half_and_scale_widens_it() -> None:
    narrow = sample_sigmas(10_000, _gen(), sigmoid_scale=0.5)
    wide = sample_sigmas(10_000, _gen(), sigmoid_scale=2.0)
    assert narrow.median().item() == pytest.approx(0.5, abs=0.02)
    assert wide.std() > narrow.std()


def test_uniform_schedule_covers_unit_interval_evenly() -> None:
    s = sample_sigmas(10_000, _gen(), uniform=True)
    assert s.mean().item() == pytest.approx(0.5, abs=0.02)
    assert (s < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.02)


def test_extreme_shift_is_clamped_inside_open_interval() -> None:
    s = sample_sigmas(1000, _gen(), shift=1e9)
    assert s.max().item() <= 1 - 1e-5 and s.min().item() > 0


# ----------------------------------------------------------------------------- shift


def test_apply_shift_identity_fixed_points_and_direction() -> None:
    sigma = torch.linspace(0, 1, 11)
    assert torch.equal(apply_shift(sigma, 1.0), sigma)
    shifted = apply_shift(sigma, 3.0)
    assert shifted[0].item() == 0.0 and shifted[-1].item() == pytest.approx(1.0)
    assert bool((shifted[1:-1] > sigma[1:-1]).all()), "shift > 1 moves samples towards more noise"
    assert apply_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / 2


def test_auto_shift_pinned_values() -> None:
    # 1024x1024 image -> 64x64 latent patches = 4096 tokens: the top of the line.
    assert auto_shift(4096) == pytest.approx(math.exp(1.15))
    assert auto_shift(4096) == pytest.approx(3.158, abs=1e-3)
    # 512x512 -> 1024 tokens: mu = 0.5 + 0.65 * 768 / 3840 = 0.63.
    assert auto_shift(1024) == pytest.approx(math.exp(0.63))
    assert auto_shift(1024) == pytest.approx(1.878, abs=1e-3)
    assert auto_shift(256) == pytest.approx(math.exp(0.5))


def test_auto_shift_extrapolates_linearly_in_mu() -> None:
    slope = 0.65 / 3840
    assert math.log(auto_shift(8192)) == pytest.approx(1.15 + slope * 4096)
    assert math.log(auto_shift(64)) == pytest.approx(0.5 - slope * 192)


def test_shifted_median_matches_lumina2_convention() -> None:
    """At 1024px the authors' Lumina 2 schedule trains mostly on *noisy* inputs.

    The median of the logit-normal is 0.5; shifted by e^1.15 it is 3.158*0.5 / (1 + 2.158*0.5) ~ 0.76.
    diffusers' DreamBooth Lumina 2 script effectively samples 1 - sigma, whose median would be ~0.24:
    mostly-clean inputs. This test pins our direction.
    """
    s = sample_sigmas(10_000, _gen(), shift=auto_shift(4096))
    median = s.median().item()
    assert median == pytest.approx(0.76, abs=0.02)
    assert (1 - median) == pytest.approx(0.24, abs=0.02)  # what the flipped convention would give


def test_resolve_shift_precedence() -> None:
    assert resolve_shift(TrainingSpec(), family_default_shift=6.0, image_seq_len=4096) == 6.0
    assert resolve_shift(TrainingSpec(flow_schedule_shift=2.5), 6.0, 4096) == 2.5
    auto = TrainingSpec(flow_schedule_auto_shift=True)
    assert resolve_shift(auto, 6.0, 1024) == pytest.approx(auto_shift(1024))
    # SimpleTuner configs write shift 0 to mean "use the automatic shift".
    auto_zero = TrainingSpec(flow_schedule_auto_shift=True, flow_schedule_shift=0)
    assert resolve_shift(auto_zero, 6.0, 4096) == pytest.approx(auto_shift(4096))


def test_resolve_shift_rejects_contradictions() -> None:
    both = TrainingSpec(flow_schedule_auto_shift=True, flow_schedule_shift=3.0)
    with pytest.raises(ConfigError, match="flow_schedule_auto_shift.*flow_schedule_shift"):
        resolve_shift(both, 6.0, 4096)
    with pytest.raises(ConfigError, match="flow_schedule_shift"):
        resolve_shift(TrainingSpec(flow_schedule_shift=0), 6.0, 4096)


# ----------------------------------------------------------------------------- loss


def test_l2_loss_is_per_sample_mean_squared_error() -> None:
    pred = torch.zeros(2, 3, 4)
    target = torch.stack([torch.ones(3, 4), 2 * torch.ones(3, 4)])
    loss = flow_loss(pred, target)
    assert loss.shape == (2,)
    assert loss.tolist() == [1.0, 4.0]


def test_loss_is_computed_in_fp32() -> None:
    pred = torch.randn(2, 8, generator=_gen()).bfloat16()
    loss = flow_loss(pred, torch.zeros_like(pred))
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, (pred.float() ** 2).mean(dim=1))


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away() -> None:
    c = 0.1
    small, large = torch.tensor([[1e-3]]), torch.tensor([[10.0]])
    # Near zero: 2c(sqrt(d^2 + c^2) - c) ~ d^2, like l2.
    assert flow_loss(small, torch.zeros(1, 1), "huber", c).item() == pytest.approx(1e-6, rel=1e-3)
    # Far away: ~ 2c|d|, growing linearly, so outliers do not dominate.
    assert flow_loss(large, torch.zeros(1, 1), "huber", c).item() == pytest.approx(2 * c * (math.hypot(10, c) - c))
    assert flow_loss(large, torch.zeros(1, 1), "huber", c).item() == pytest.approx(2 * c * 10, rel=0.02)


def test_smooth_l1_uses_huber_c_as_beta() -> None:
    pred, target = torch.tensor([[0.05, 1.0]]), torch.zeros(1, 2)
    # beta = 0.1: 0.5 * 0.05^2 / 0.1 for the small error, 1.0 - 0.05 for the large one.
    expected = (0.5 * 0.05**2 / 0.1 + 0.95) / 2
    assert flow_loss(pred, target, "smooth_l1", huber_c=0.1).item() == pytest.approx(expected)


def test_weights_leave_elements_out_of_the_mean() -> None:
    pred = torch.zeros(2, 4)
    target = torch.tensor([[1.0, 1.0, 9.0, 9.0], [3.0, 3.0, 3.0, 3.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # broadcast over the batch
    loss = flow_loss(pred, target, weights=weights)
    assert loss.tolist() == [1.0, 9.0]  # masked elements neither count nor dilute the mean


def test_weights_broadcast_over_frames_and_all_zero_gives_zero() -> None:
    pred = torch.zeros(2, 3, 2, 4, 4)  # (B, C, F, H, W)
    target = torch.ones_like(pred)
    target[:, :, 1] = 5.0
    frame_mask = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1, 1)
    assert flow_loss(pred, target, weights=frame_mask).tolist() == [1.0, 1.0]
    zero = torch.zeros(2, 1, 1, 1, 1)
    assert flow_loss(pred, target, weights=zero).tolist() == [0.0, 0.0]


def test_unknown_loss_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="loss_type"):
        flow_loss(torch.zeros(1, 2), torch.zeros(1, 2), loss_type="l1")
