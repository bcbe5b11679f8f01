"""Low-memory optimizers (trainer_core/train/lowmem_optim.py): they train, resume exactly, keep less state.

Each optimizer that runs on the CPU trains a tiny MLP whose weight matrices are big enough (8192
elements) to get quantized state: the loss falls, a run stopped half-way whose optimizer and LR
schedule go through the checkpoint state files (safetensors + JSON, as the engine writes them)
continues bit-for-bit where the straight run went, and the state is smaller than AdamW's. The
missing-package and no-compiler refusals come from the spec checks, before any model loads.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from trainer_core.errors import ConfigError
from trainer_core.spec import OPTIMIZERS, OptimizerSpec
from trainer_core.train import lowmem_optim
from trainer_core.train.lowmem_optim import (
    AO_OPTIMIZERS,
    BNB_OPTIMIZERS,
    LOWMEM_OPTIMIZERS,
    OPTIMI_OPTIMIZERS,
    check_available,
    check_device,
    state_bytes,
)
from trainer_core.train.optim import build_lr_scheduler, build_optimizer
from trainer_core.train.state_files import load_state, save_state

STEPS, SPLIT, LR = 8, 4, 1e-2
# RAdam's first steps are an un-adapted warm-up: more steps and a larger lr, and a smaller drop asked
SLOW_STARTERS = {"optimi-radam": (16, 3e-2, 0.95), "optimi-ranger": (16, 3e-2, 0.95)}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _needs(name: str):
    module = "bitsandbytes" if name in BNB_OPTIMIZERS else "optimi" if name in OPTIMI_OPTIMIZERS else "torchao"
    return pytest.mark.skipif(not _installed(module), reason=f"{module} is not installed")


CPU_OPTIMIZERS = [pytest.param(n, marks=_needs(n)) for n in LOWMEM_OPTIMIZERS]


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(dtype)


def _batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 64, generator=g)
    return x.to(dtype), (x.flip(-1) * 0.5).to(dtype)


def _spec(name: str, lr: float = LR) -> OptimizerSpec:
    return OptimizerSpec(optimizer=name, learning_rate=lr, lr_scheduler="cosine", lr_warmup_steps=2)


def _train(model, opt, sched, steps: range, dtype) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(step, dtype)
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _eval(model, dtype) -> float:
    with torch.no_grad():
        return sum(torch.nn.functional.mse_loss(model(x).float(), y.float()).item() for x, y in map(
            lambda s: _batch(s, dtype), range(STEPS)
        )) / STEPS


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_trains_and_a_resumed_run_equals_the_straight_run(name, tmp_path):
    """bf16 weights where the optimizer keeps them (optimi: Kahan sums, torchao: stochastic rounding).

    torchao's rounding draws from torch's generator, so the split run saves and restores it as the
    engine's checkpoint does.
    """
    dtype = torch.bfloat16 if lowmem_optim.keeps_low_precision_weights(name) else torch.float32
    steps, lr, drop = SLOW_STARTERS.get(name, (STEPS, LR, 0.9))
    spec = _spec(name, lr)
    straight = _model(dtype)
    before = _eval(straight, dtype)
    opt = build_optimizer(list(straight.parameters()), spec, lr)
    sched = build_lr_scheduler(opt, spec, steps)
    losses = _train(straight, opt, sched, range(steps), dtype)
    assert _eval(straight, dtype) < drop * before, (name, losses)
    if name in OPTIMI_OPTIMIZERS:
        assert "kahan_comp" in opt.state[straight[0].weight]  # optimi turned Kahan summation on for bf16

    first = _model(dtype)
    opt = build_optimizer(list(first.parameters()), spec, lr)
    sched = build_lr_scheduler(opt, spec, steps)
    head = _train(first, opt, sched, range(SPLIT), dtype)
    save_state(tmp_path, "optimizer", opt.state_dict())  # what the checkpoint writes
    save_state(tmp_path, "scheduler", sched.state_dict())
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    rng = torch.get_rng_state()
    del first, opt, sched

    second = _model(dtype)
    second.load_state_dict(weights)
    opt = build_optimizer(list(second.parameters()), spec, lr)
    sched = build_lr_scheduler(opt, spec, steps)
    opt.load_state_dict(load_state(tmp_path, "optimizer"))
    sched.load_state_dict(load_state(tmp_path, "scheduler"))
    torch.set_rng_state(rng)
    tail = _train(second, opt, sched, range(SPLIT, steps), dtype)
    assert head + tail == losses
    for (k, a), b in zip(straight.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), (name, k)


@pytest.mark.parametrize("name", [n for n in CPU_OPTIMIZERS if n.values[0] not in OPTIMI_OPTIMIZERS])
def test_quantized_state_is_a_quarter_of_adamws_or_less(name):
    """torchao / bitsandbytes on fp32 weights: 8-bit and fp8 moments ~2 bytes/param, 4-bit ~1, AdamW 8.

    The 8-bit states also carry a 256-entry fp32 lookup table per moment per tensor (2 KiB), which is
    0.25 bytes/param on these 8192-element weights and nothing on a real model's.
    """
    sizes = {}
    for opt_name in ("adamw", name):
        model = _model()
        opt = build_optimizer(list(model.parameters()), _spec(opt_name), LR)
        sched = build_lr_scheduler(opt, _spec(opt_name), STEPS)
        _train(model, opt, sched, range(1), torch.float32)
        big = [p for p in model.parameters() if p.numel() >= 4096]
        sizes[opt_name] = state_bytes(opt, big) / sum(p.numel() for p in big)
    assert sizes["adamw"] == pytest.approx(8, rel=1e-3)  # + the step counters
    limit = {"ao-adamw4bit": 1.1, "bnb-lion8bit": 1.2, "ao-adamfp8": 2.1, "ao-adamwfp8": 2.1}.get(name, 2.3)
    assert sizes[name] <= limit, sizes


@pytest.mark.skipif(not _installed("optimi"), reason="torch-optimi is not installed")
def test_optimi_bf16_weights_and_state_take_less_than_fp32_master_weights_with_adamw():
    """bf16 weights + bf16 moments + Kahan buffer: 8 bytes/param; fp32 weights + AdamW: 12."""
    per_param = {}
    for opt_name, dtype in (("adamw", torch.float32), ("optimi-adamw", torch.bfloat16)):
        model = _model(dtype)
        opt = build_optimizer(list(model.parameters()), _spec(opt_name), LR)
        _train(model, opt, build_lr_scheduler(opt, _spec(opt_name), STEPS), range(1), dtype)
        n = sum(p.numel() for p in model.parameters())
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        per_param[opt_name] = (weights + state_bytes(opt)) / n
    assert per_param == pytest.approx({"adamw": 12, "optimi-adamw": 8}, rel=1e-3)  # + the step counters


@pytest.mark.skipif(not _installed("torchao"), reason="torchao is not installed")
def test_torchao_keeps_updates_smaller_than_bf16s_last_bit_by_stochastic_rounding():
    """Adam's first steps move each weight by about lr; at 1.0 bf16's spacing is 2**-7 = 0.0078, so
    steps of 1e-3 round back to 1.0 every time with round-to-nearest. Rounded stochastically, the
    weights still drift down by about lr per step on average: this is what lets a full fine-tune
    with ao-* keep bf16 weights (no fp32 master copy)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(64, 128, dtype=torch.bfloat16))
    lr, steps = 1e-3, 10
    spec = OptimizerSpec(optimizer="ao-adamw8bit", learning_rate=lr, adam_weight_decay=0.0)
    opt = build_optimizer([weight], spec, lr)
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        opt.step()
    drift = (1 - weight.float()).mean().item()
    assert weight.dtype == torch.bfloat16
    assert 0.5 * lr * steps < drift < 1.5 * lr * steps, drift
    assert lowmem_optim.keeps_low_precision_weights("ao-adamw8bit")
    assert not lowmem_optim.keeps_low_precision_weights("bnb-adamw8bit")  # no rounding: fp32 masters


def test_every_lowmem_name_is_a_spec_optimizer():
    assert set(LOWMEM_OPTIMIZERS) <= set(OPTIMIZERS)
    assert {"ao-adamw8bit", "ao-adamw4bit", "ao-adamfp8", "ao-adamwfp8"} == set(AO_OPTIMIZERS)
    assert {"optimi-adamw", "bnb-adamw8bit"} <= set(LOWMEM_OPTIMIZERS)


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [("optimi-adamw", "optimi", "torch-optimi"), ("bnb-adamw8bit", "bitsandbytes", "bitsandbytes"),
     ("ao-adamw8bit", "torchao.optim", "torchao")],
)
def test_a_missing_package_is_refused_with_the_install_command(name, module, package, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as err:
        check_available(name)
    assert f"pip install {package}" in str(err.value)
    with pytest.raises(ConfigError):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerSpec(optimizer=name), lr=1e-3)


def test_resolve_refuses_a_missing_optimizer_package_before_the_model_loads(tiny_lumina2, tmp_path, monkeypatch):
    from helpers.datasets import lumina_spec, write_dataset

    from trainer_core.spec import TrainSpec
    from trainer_core.train.resolve import resolve_spec

    data = write_dataset(tmp_path / "data", {"img": "a red circle"})
    raw = lumina_spec(tiny_lumina2, data, tmp_path / "out", optimizer={"optimizer": "bnb-adamw8bit"})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        resolve_spec(TrainSpec.model_validate(raw), "cpu")


def test_torchao_on_a_cpu_without_a_compiler_is_refused(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler") as err:
        check_device("ao-adamw8bit", "cpu")
    assert "optimi-adamw" in str(err.value)
    check_device("ao-adamw8bit", "cuda")  # CUDA builds with triton, no check here
    check_device("optimi-adamw", "cpu")
    assert lowmem_optim.keeps_low_precision_weights("optimi-adamw")


@pytest.mark.parametrize("name", LOWMEM_OPTIMIZERS)
def test_simpletuner_configs_name_them_the_same_both_ways(name):
    from trainer_core.simpletuner import export_simpletuner, import_simpletuner

    spec = import_simpletuner({"optimizer": name, "learning_rate": 1e-5}).spec
    assert spec.optimizer.optimizer == name
    config, backend = export_simpletuner(spec)
    assert config["optimizer"] == name
    assert import_simpletuner(config, backend).spec == spec


def test_a_simpletuner_optimizer_we_lack_is_refused_with_the_ones_we_have():
    from trainer_core.simpletuner import import_simpletuner

    with pytest.raises(ConfigError) as err:
        import_simpletuner({"optimizer": "bnb-adamw8bit-paged"})
    assert "ao-adamw8bit" in str(err.value) and "optimi-adamw" in str(err.value)


# ---------------------------------------------------------------------- through the engine's checkpoints
def _full_spec(tiny_lumina2, data, out, name: str):
    from helpers.datasets import lumina_spec

    from trainer_core.spec import TrainSpec

    raw = lumina_spec(
        tiny_lumina2,
        data,
        out,
        model={"model_family": "lumina2", "pretrained_model_name_or_path": str(tiny_lumina2), "model_type": "full"},
        optimizer={"optimizer": name, "learning_rate": 3e-3},
        training={"max_train_steps": 4, "train_batch_size": 1, "seed": 3},
        checkpointing={"checkpoint_step_interval": 2, "checkpoints_total_limit": 1},
    )
    return TrainSpec.model_validate(raw)


@pytest.mark.slow  # ~30 s on 2 CPU cores, most of it torch.compile building the 8-bit step
@pytest.mark.skipif(not _installed("torchao"), reason="torchao is not installed")
def test_a_full_finetune_with_ao_adamw8bit_resumes_from_its_checkpoint_exactly(tiny_lumina2, tmp_path):
    import threading

    from helpers.datasets import write_dataset
    from safetensors.torch import load_file

    from trainer_core.events import ListSink
    from trainer_core.train.engine import Trainer

    data = write_dataset(tmp_path / "data", {"img": "a red circle, tunertest style"})
    straight = Trainer(_full_spec(tiny_lumina2, data, tmp_path / "straight", "ao-adamw8bit"), ListSink())
    done = straight.run()
    kinds = {type(v).__name__ for s in straight.optimizer.state.values() for v in s.values()}
    assert "OptimState8bit" in kinds  # the tiny transformer has weights big enough for 8-bit state

    cancel = threading.Event()

    class CancelAtStep2(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 2:
                cancel.set()

    spec = _full_spec(tiny_lumina2, data, tmp_path / "split", "ao-adamw8bit")
    first = Trainer(spec, CancelAtStep2(), cancel=cancel).run()
    assert first.cancelled and first.steps == 2
    second = Trainer(spec, ListSink()).run()
    assert second.resumed_from.name == "step-2" and second.steps == 4
    assert [h[1] for h in second.loss_history] == [h[1] for h in done.loss_history]
    a, b = load_file(str(done.lora.comfyui)), load_file(str(second.lora.comfyui))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
