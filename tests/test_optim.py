"""Optimizers, LR schedules and clipping (``trainer_core.train.optim``)."""

from __future__ import annotations

import io
import itertools
import sys
import types

import pytest
import torch

from trainer_core.errors import ConfigError
from trainer_core.spec import OptimizerSpec
from trainer_core.train.optim import (
    AdamWBF16,
    Lion,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    stochastic_round_to_bf16,
)


def _toy_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(8, 4, generator=g).to(dtype)),
        torch.nn.Parameter(torch.randn(4, generator=g).to(dtype)),
    ]


def _toy_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], step: int) -> None:
    """One step on a least-squares problem whose data depends only on the step number."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=g)
    y = torch.randn(16, 4, generator=g)
    w, b = params
    loss = ((x @ w.float() + b.float() - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _clone(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _roundtrip(state: dict) -> dict:
    """What a checkpoint does: serialise and read back (no tensors shared with the live optimizer)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ----------------------------------------------------------------------------- factory


def test_adamw_gets_the_spec_hyperparameters() -> None:
    spec = OptimizerSpec(optimizer="adamw", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, adam_weight_decay=0.1)
    opt = build_optimizer(_toy_params(), spec, lr=3e-4)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.1)


def test_param_groups_are_accepted() -> None:
    a, b = _toy_params()
    opt = build_optimizer([{"params": [a]}, {"params": [b], "lr": 1e-2}], OptimizerSpec(), lr=1e-4)
    assert isinstance(opt, AdamWBF16)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-2]


def test_lion_uses_its_own_beta2_unless_set() -> None:
    opt = build_optimizer(_toy_params(), OptimizerSpec(optimizer="lion"), lr=1e-4)
    assert isinstance(opt, Lion) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    opt = build_optimizer(_toy_params(), OptimizerSpec(optimizer="lion", adam_beta2=0.999), lr=1e-4)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize(
    ("name", "module", "pip_name"),
    [
        ("optimi-stableadamw", "optimi", "torch-optimi"),
        ("optimi-lion", "optimi", "torch-optimi"),
        ("prodigy", "prodigyopt", "prodigyopt"),
    ],
)
def test_optional_optimizers_say_how_to_install(monkeypatch, name: str, module: str, pip_name: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError) as err:
        build_optimizer(_toy_params(), OptimizerSpec(optimizer=name), lr=1.0)
    assert f"pip install {pip_name}" in str(err.value)


def test_optional_optimizers_are_built_from_their_packages(monkeypatch) -> None:
    calls: dict[str, dict] = {}

    def recorder(label: str):
        def make(params, **kwargs):
            calls[label] = kwargs
            return torch.optim.SGD(params, lr=kwargs["lr"])

        return make

    optimi = types.SimpleNamespace(StableAdamW=recorder("stableadamw"), Lion=recorder("optimi-lion"))
    prodigyopt = types.SimpleNamespace(Prodigy=recorder("prodigy"))
    monkeypatch.setitem(sys.modules, "optimi", optimi)
    monkeypatch.setitem(sys.modules, "prodigyopt", prodigyopt)
    build_optimizer(_toy_params(), OptimizerSpec(optimizer="optimi-stableadamw"), lr=1e-4)
    build_optimizer(_toy_params(), OptimizerSpec(optimizer="optimi-lion"), lr=1e-5)
    build_optimizer(_toy_params(), OptimizerSpec(optimizer="prodigy"), lr=1.0)
    assert calls["stableadamw"] == {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
    assert calls["optimi-lion"] == {"lr": 1e-5, "betas": (0.9, 0.99), "weight_decay": 1e-2}
    assert calls["prodigy"]["lr"] == 1.0  # Prodigy estimates the step size; lr is a multiplier


# ----------------------------------------------------------------------------- AdamWBF16


def test_adamw_bf16_equals_torch_adamw_on_fp32_params() -> None:
    ours_p, ref_p = _toy_params(), _toy_params()
    ours = AdamWBF16(ours_p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(20):
        _toy_step(ours, ours_p, step)
        _toy_step(ref, ref_p, step)
    for a, b in zip(ours_p, ref_p):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert ours.state[ours_p[0]]["exp_avg"].dtype == torch.float32


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours() -> None:
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    for base in (1.0, -1.0):
        value = torch.full((20_000,), base + (0.25 * ulp if base > 0 else -0.25 * ulp))
        rounded = stochastic_round_to_bf16(value, torch.Generator().manual_seed(0))
        assert rounded.dtype == torch.bfloat16
        assert set(rounded.float().unique().tolist()) == {base, base + (ulp if base > 0 else -ulp)}
        assert rounded.float().mean().item() == pytest.approx(value[0].item(), abs=ulp * 0.02)
    exact = torch.tensor([1.5, -3.0, 0.0])
    assert torch.equal(stochastic_round_to_bf16(exact, torch.Generator()).float(), exact)


def test_bf16_updates_below_one_ulp_still_move_the_weights() -> None:
    """Each step moves the weight by lr = 1e-4, a 78th of a bf16 ulp at 1.0.

    torch's AdamW on bf16 weights rounds every such update away; AdamWBF16 accumulates them
    on average (200 steps of -1e-4 ~ -0.02).
    """

    def run(opt_cls) -> float:
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = opt_cls([p], lr=1e-4, weight_decay=0.0)
        for _ in range(200):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.float().mean().item()

    assert run(torch.optim.AdamW) == 1.0
    assert run(AdamWBF16) == pytest.approx(1.0 - 200 * 1e-4, abs=2e-3)


def test_bf16_state_is_bf16_and_runs_are_reproducible() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        params = _toy_params(torch.bfloat16)
        opt = AdamWBF16(params, lr=1e-2, seed=seed)
        for step in range(5):
            _toy_step(opt, params, step)
        state = opt.state[params[0]]
        assert params[0].dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        return [p.detach().clone() for p in params]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adamw_bf16_state_dict_round_trip(dtype: torch.dtype) -> None:
    params = _toy_params(dtype)
    opt = AdamWBF16(params, lr=1e-2, seed=7)
    for step in range(5):
        _toy_step(opt, params, step)
    saved_params, saved_state = _clone(params), _roundtrip(opt.state_dict())
    for step in range(5, 10):
        _toy_step(opt, params, step)

    resumed_params = saved_params
    resumed = AdamWBF16(resumed_params, lr=123.0)  # hyperparameters come from the state dict
    resumed.load_state_dict(saved_state)
    assert resumed.param_groups[0]["lr"] == 1e-2 and resumed.param_groups[0]["seed"] == 7
    moment = resumed.state[resumed_params[0]]["exp_avg"]
    assert moment.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    for step in range(5, 10):
        _toy_step(resumed, resumed_params, step)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- Lion


def test_lion_minimises_a_quadratic() -> None:
    target = torch.tensor([3.0, -2.0, 0.5])
    x = torch.nn.Parameter(torch.zeros(3))
    opt = Lion([x], lr=0.01)
    for _ in range(600):
        opt.zero_grad()
        ((x - target) ** 2).sum().backward()
        opt.step()
    assert torch.allclose(x.detach(), target, atol=0.05)


def test_lion_moves_each_weight_by_exactly_lr() -> None:
    x = torch.nn.Parameter(torch.zeros(3))
    opt = Lion([x], lr=0.1, weight_decay=0.0)
    x.grad = torch.tensor([5.0, -1e-6, 0.0])
    opt.step()
    assert x.detach().tolist() == pytest.approx([-0.1, 0.1, 0.0])  # sign of the update, not its size


# ----------------------------------------------------------------------------- schedules


def _lrs(name: str, total: int = 100, warmup: int = 10, **spec_kwargs) -> list[float]:
    """The learning rate in effect at each of ``total`` optimizer steps, with base lr 1."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    spec = OptimizerSpec(lr_scheduler=name, lr_warmup_steps=warmup, **spec_kwargs)
    sched = build_lr_scheduler(opt, spec, total_steps=total)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_schedule() -> None:
    lrs = _lrs("constant", warmup=0)
    assert set(lrs) == {1.0}


def test_constant_with_warmup_steps_warms_up() -> None:
    for name in ("constant", "constant_with_warmup"):  # plain constant would ignore the warm-up
        lrs = _lrs(name, warmup=10)
        assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == 1.0 and lrs[100] == 1.0


def test_linear_schedule() -> None:
    lrs = _lrs("linear")
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)  # halfway through the decay
    assert lrs[100] == 0.0


def test_cosine_schedule_is_a_half_cosine_to_zero() -> None:
    lrs = _lrs("cosine")
    assert lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)
    assert lrs[99] < 1e-3 and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])), "cosine never goes back up"


def test_cosine_with_restarts_restarts_num_cycles_times() -> None:
    lrs = _lrs("cosine_with_restarts", total=90, warmup=10, lr_num_cycles=2)
    # Two cycles of 40 steps each after warm-up: peaks at 10 and 50, half-way down at 30 and 70.
    assert lrs[10] == pytest.approx(1.0) and lrs[30] == pytest.approx(0.5)
    assert lrs[49] < 0.01 and lrs[50] == pytest.approx(1.0) and lrs[70] == pytest.approx(0.5)


def test_polynomial_schedule_decays_to_lr_end() -> None:
    lrs = _lrs("polynomial", lr_power=2.0, lr_end=0.1)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.9 * 0.5**2 + 0.1)
    assert lrs[100] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="lr_end"):
        _lrs("polynomial", lr_end=1.0)


def test_scheduler_state_dict_round_trip() -> None:
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_lr_scheduler(opt, OptimizerSpec(lr_scheduler="cosine", lr_warmup_steps=5), total_steps=50)

    opt, sched = make()
    for _ in range(20):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    sched2.load_state_dict(_roundtrip(sched.state_dict()))
    for _ in range(10):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.last_epoch == sched.last_epoch == 30


# ----------------------------------------------------------------------------- clipping


def _with_grads(*grads: list[float]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


def test_clip_by_norm_returns_the_norm_before_clipping() -> None:
    params = _with_grads([3.0], [4.0])  # global norm 5
    norm = clip_gradients(params, OptimizerSpec(max_grad_norm=1.0))
    assert norm == pytest.approx(5.0)
    assert [p.grad.item() for p in params] == pytest.approx([0.6, 0.8], rel=1e-5)


def test_clip_by_value_clamps_each_element() -> None:
    params = _with_grads([3.0, -0.2], [-4.0])
    assert clip_gradients(params, OptimizerSpec(max_grad_norm=0.5, grad_clip_method="value")) is None
    assert params[0].grad.tolist() == pytest.approx([0.5, -0.2]) and params[1].grad.tolist() == [-0.5]


def test_max_grad_norm_zero_disables_clipping() -> None:
    params = _with_grads([30.0, 40.0])
    assert clip_gradients(params, OptimizerSpec(max_grad_norm=0)) is None
    assert params[0].grad.tolist() == [30.0, 40.0]
