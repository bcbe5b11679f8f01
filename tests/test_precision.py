"""Numeric precision: fp16 training with loss scaling for GPUs without bf16, and what each mode loads.

The engine trains in fp32 on a CPU; ``honour_precision_on_cpu`` makes it run the fp16 path here
(fp16 weights, fp16 autocast, ``torch.amp.GradScaler`` on the CPU) so the logic is tested without
a GPU. What only a GPU shows (fp16 overflow in real activations, speed) is not checked here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset

from trainer_core.events import ListSink
from trainer_core.spec import TrainingSpec, TrainSpec
from trainer_core.train import engine as engine_module
from trainer_core.train.engine import Trainer
from trainer_core.train.precision import plan_precision

FP16 = {
    "max_train_steps": 4,
    "mixed_precision": "fp16",
    "base_model_default_dtype": "bf16",  # SimpleTuner's default; fp16 training must not load bf16 weights
    "gradient_checkpointing": False,
    "seed": 7,
}


@pytest.fixture
def two_images(tmp_path) -> Path:
    return write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue square"})


def fp16_trainer(tiny_lumina2, data, out, training=None, optimizer=None) -> tuple[Trainer, ListSink]:
    spec = TrainSpec.model_validate(
        lumina_spec(
            tiny_lumina2,
            data,
            out,
            training={**FP16, **(training or {})},
            optimizer=optimizer or {"optimizer": "adamw", "learning_rate": 1e-3},
            checkpointing={"checkpoint_step_interval": None},
        )
    )
    sink = ListSink()
    return Trainer(spec, sink, device="cpu", honour_precision_on_cpu=True), sink


def test_each_mixed_precision_mode_picks_its_weight_dtype_autocast_and_loss_scaling(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda")

    def plan(**kw):
        p = plan_precision(TrainingSpec(**kw), gpu)
        return p.weight_dtype, p.autocast_dtype, p.loss_scaling

    assert plan(mixed_precision="fp16") == (torch.float16, torch.float16, True)
    assert plan(mixed_precision="fp16", base_model_default_dtype="fp32") == (torch.float32, torch.float16, True)
    assert plan(mixed_precision="bf16") == (torch.bfloat16, torch.bfloat16, False)
    assert plan(mixed_precision="no", base_model_default_dtype="fp32") == (torch.float32, None, False)
    cpu = plan_precision(TrainingSpec(mixed_precision="fp16"), torch.device("cpu"))
    assert (cpu.weight_dtype, cpu.loss_scaling) == (torch.float32, False) and "CPU" in cpu.note


def test_bf16_on_a_gpu_without_it_is_refused_with_fp16_as_the_fix(monkeypatch):
    from trainer_core.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError) as err:
        plan_precision(TrainingSpec(mixed_precision="bf16"), torch.device("cuda"))
    assert "fp16" in err.value.hint


def test_fp16_trains_fp32_lora_weights_on_fp16_frozen_weights(tiny_lumina2, two_images, tmp_path):
    trainer, sink = fp16_trainer(tiny_lumina2, two_images, tmp_path / "out")
    result = trainer.run()
    frozen = {p.dtype for n, p in trainer.transformer.named_parameters() if "lora_" not in n}
    lora = {p.dtype for n, p in trainer.transformer.named_parameters() if "lora_" in n}
    assert frozen == {torch.float16} and lora == {torch.float32}
    assert trainer.scaler.enabled and trainer.scaler.scale_value is not None
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.loss_history)
    assert sink.of("started")[0]["dtype"] == "float16"


def test_gradients_are_unscaled_before_clipping(tiny_lumina2, two_images, tmp_path, monkeypatch):
    """``max_grad_norm`` must clip the true gradients, not ones multiplied by the loss scale (65536)."""
    norms: list[float] = []
    real_clip = engine_module.clip_gradients

    def spy(params, spec):
        params = list(params)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        return real_clip(params, spec)

    monkeypatch.setattr(engine_module, "clip_gradients", spy)
    fp16, _ = fp16_trainer(tiny_lumina2, two_images, tmp_path / "fp16", training={"max_train_steps": 1})
    fp16.run()
    fp32, _ = fp16_trainer(
        tiny_lumina2, two_images, tmp_path / "fp32", training={"max_train_steps": 1, "mixed_precision": "no"}
    )
    fp32.run()
    scaled, reference = norms
    assert fp16.scaler.scale_value >= 2.0**10  # the loss really was scaled
    assert scaled == pytest.approx(reference, rel=0.1)


def test_a_step_with_overflowing_gradients_is_skipped_reported_and_training_goes_on(
    tiny_lumina2, two_images, tmp_path
):
    trainer, sink = fp16_trainer(
        tiny_lumina2, two_images, tmp_path / "out", training={"max_train_steps": 4, "use_ema": True}
    )
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    victim = trainer.params[0]
    snapshots: dict[int, torch.Tensor] = {}
    real_step = trainer.train_step

    def poisoned_step(step, accum):
        snapshots[step] = victim.detach().clone()
        handle = victim.register_hook(lambda g: torch.full_like(g, float("inf"))) if step == 1 else None
        try:
            return real_step(step, accum)
        finally:
            if handle is not None:
                handle.remove()

    trainer.train_step = poisoned_step
    ema_updates: list[int] = []
    real_ema_update = trainer.ema.update
    trainer.ema.update = lambda step: (ema_updates.append(step), real_ema_update(step))
    result = trainer.train()
    skipped = sink.of("step_skipped")
    assert [e["step"] for e in skipped] == [2]
    assert skipped[0]["next_loss_scale"] == skipped[0]["loss_scale"] / 2
    assert torch.equal(snapshots[1], snapshots[2])  # the poisoned update never reached the weights
    assert not torch.equal(snapshots[2], snapshots[3])  # the next one did
    assert result.steps == 4 and ema_updates == [0, 2, 3]  # nor did it reach the EMA
    assert trainer.lr_scheduler.last_epoch == 3  # a skipped update does not advance the LR schedule


def test_the_loss_scale_reached_is_checkpointed_and_restored_on_resume(tiny_lumina2, two_images, tmp_path):
    """After an overflow the scale is halved; a resumed run must continue at that scale, not at 65536."""
    out = tmp_path / "out"
    first, _ = fp16_trainer(tiny_lumina2, two_images, out, training={"max_train_steps": 2})
    first.prepare()
    first.fill_caches()
    first.build_model()
    victim, real_step = first.params[0], first.train_step

    def poisoned_step(step, accum):
        handle = victim.register_hook(lambda g: torch.full_like(g, float("inf"))) if step == 0 else None
        try:
            return real_step(step, accum)
        finally:
            if handle is not None:
                handle.remove()

    first.train_step = poisoned_step
    first.train()
    halved = first.scaler.scale_value
    assert halved == 2.0**15
    resumed, sink = fp16_trainer(tiny_lumina2, two_images, out, training={"max_train_steps": 4})
    resumed.run()
    assert sink.of("resumed") and resumed.scaler.scale_value == halved
