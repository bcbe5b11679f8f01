"""Memory of a full fine-tune: the data table of training-state bytes, the trainer's memory event, and
``bench/estimate_vram.py``'s fake-tensor run of the full step checked against the same step run for real."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trainer_core.memory.estimate import (
    OPTIMIZER_STATES,
    full_finetune_weight_bytes,
    optimizer_state,
    training_state,
)
from trainer_core.spec import OPTIMIZERS

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(
    ("optimizer", "weight_bytes", "per_param"),
    [
        ("adamw", 4, 8),  # fp32 master weights, two fp32 moments
        ("adamw_bf16", 2, 4),  # bf16 weights, two bf16 moments
        ("adamw_bf16", 4, 8),  # fp32 weights (a LoRA): its moments are fp32 too
        ("adamw8bit", 2, 2),
        ("bnb-adamw8bit", 2, 2),
        ("ao-adamw4bit", 2, 1),
        ("bnb-lion8bit", 2, 1),
        ("optimi-adamw", 2, 6),  # bf16 moments + a bf16 Kahan buffer
        ("optimi-adamw", 4, 8),  # fp32 weights (a LoRA): no Kahan buffer
        ("paged_adamw_8bit", 2, 2),  # another tool's spelling, read from the name
        ("lion", 4, 4),
        ("prodigy", 4, 16),
    ],
)
def test_optimizer_state_bytes_per_parameter(optimizer, weight_bytes, per_param):
    assert optimizer_state(optimizer).bytes_per_param(weight_bytes) == per_param


def test_every_optimizer_we_offer_is_in_the_table_and_unknown_names_say_so():
    assert set(OPTIMIZERS) <= set(OPTIMIZER_STATES)
    assert optimizer_state("adamw").known and not optimizer_state("paged_adamw_8bit").known


@pytest.mark.parametrize(
    ("optimizer", "weight_bytes"),
    [("adamw_bf16", 2), ("ao-adamw8bit", 2), ("optimi-adamw", 2), ("adamw", 4), ("bnb-adamw8bit", 4)],
)
def test_a_full_finetune_keeps_bf16_weights_only_with_optimizers_that_keep_small_updates(optimizer, weight_bytes):
    assert full_finetune_weight_bytes(optimizer, 2) == weight_bytes


def test_the_training_state_of_a_full_fine_tune_by_the_table():
    n = 2_600_000_000
    bf16 = training_state(n, full_finetune_weight_bytes("adamw_bf16", 2), "adamw_bf16", ema=True)
    parts = (bf16.weight_bytes, bf16.gradient_bytes, bf16.optimizer_bytes, bf16.ema_bytes)
    assert parts == (2 * n, 2 * n, 4 * n, 4 * n)
    assert bf16.device_bytes == 8 * n  # the EMA on the CPU (SimpleTuner's default) costs no VRAM
    on_device = training_state(n, 2, "adamw_bf16", ema=True, ema_on_device=True)
    assert on_device.device_bytes == 12 * n
    fp32 = training_state(n, full_finetune_weight_bytes("adamw", 2), "adamw")
    assert fp32.device_bytes == 16 * n


def test_the_memory_event_of_a_full_run_matches_the_optimizer_state_it_really_holds(tiny_lumina2, tmp_path):
    from helpers.datasets import lumina_spec, write_dataset

    from trainer_core.events import ListSink
    from trainer_core.spec import TrainSpec
    from trainer_core.train.engine import Trainer

    data = write_dataset(tmp_path / "data", {"a": "a red circle"})
    raw = lumina_spec(
        tiny_lumina2,
        data,
        tmp_path / "out",
        model={"model_type": "full"},
        training={"max_train_steps": 1, "use_ema": True, "ema_device": "accelerator"},
    )
    sink = ListSink()
    trainer = Trainer(TrainSpec.model_validate(raw), sink, device="cpu")
    trainer.run()
    report = next(e for e in sink.events if e["type"] == "memory" and e.get("stage") == "training")
    n = report["trainable_parameters"]
    assert report["model_type"] == "full" and n == report["parameters"]
    assert report["trained_weight_bytes"] == report["gradient_bytes"] == 4 * n  # fp32 (adamw: fp32 masters)
    held = sum(
        t.numel() * t.element_size()
        for state in trainer.optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    assert report["optimizer_state_bytes"] == held == 8 * n
    assert report["ema_bytes"] == trainer.ema.nbytes() == 4 * n and report["ema_shadow_device"] == "cpu"
    assert report["training_state_device_bytes"] == (4 + 4 + 8 + 4) * n  # the EMA on the "accelerator"


@pytest.fixture(scope="module")
def estimate_vram():
    sys.path.insert(0, str(BENCH))
    try:
        import estimate_vram
    finally:
        sys.path.remove(str(BENCH))
    return estimate_vram


@pytest.mark.parametrize("mode", ["full-adamw_bf16+ema_accelerator", "full-adamw"])
def test_the_fake_full_step_peak_matches_the_real_run(estimate_vram, mode):
    dims = {
        **estimate_vram.LUMINA2_TINY_VALIDATION,
        "hidden_size": 128,
        "num_layers": 2,
        "num_attention_heads": 4,
        "axes_dim_rope": (8, 12, 12),
        "cap_feat_dim": 64,
    }
    common = {"mode_name": mode, "dims": dims, "latent": (16, 16, 16), "text_len": 16, "bf16": False}
    fake = estimate_vram.run_full_case(fake=True, **common)
    real = estimate_vram.run_full_case(fake=False, profile=True, **common)
    assert fake["trainable_parameters"] == fake["parameters"]
    assert fake["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.01)
    allocator = real["resident_bytes"] + real["allocator_step_peak"]
    assert fake["peak_bytes"] == pytest.approx(allocator, rel=0.03)
    # what sits between steps is the training state the table predicts (weights, grads none, states, EMA)
    f = estimate_vram.full_formula(fake["trainable_parameters"], mode, load_bytes=4)  # fp32 here
    k = fake["resident_by_kind"]
    assert k["lora"] == f["trained_weight_bytes"]
    assert k["ema"] == (f["ema_bytes"] if "accelerator" in mode else 0)
    assert k["optimizer"] == pytest.approx(f["optimizer_state_bytes"], rel=0.01)
