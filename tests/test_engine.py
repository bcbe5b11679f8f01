"""The training engine end to end on a tiny Lumina 2: learning, exact resume, crash safety, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from safetensors.torch import load_file

from trainer_core.errors import CheckpointError, ConfigError, DatasetError, UnknownFlavourError
from trainer_core.events import ListSink
from trainer_core.spec import TrainSpec
from trainer_core.train.engine import Trainer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_image(tmp_path) -> Path:
    return write_dataset(tmp_path / "data", {"img": "a red circle, tunertest style"})


def spec_for(tiny_lumina2, data, out, **overrides) -> TrainSpec:
    return TrainSpec.model_validate(lumina_spec(tiny_lumina2, data, out, **overrides))


def eval_loss(trainer: Trainer, draws: int = 8) -> float:
    """Mean loss over fixed noise levels and noise, so before/after compare like with like."""
    gen = torch.Generator().manual_seed(1234)
    sample = trainer.index.samples[0]
    text = trainer.family.collate_text([trainer.batches.text(sample.captions[0])])
    x0 = trainer.latent_cache.load(sample)["mean"][None]
    losses = []
    with torch.no_grad():
        for i in range(draws):
            sigma = torch.tensor([(i + 0.5) / draws])
            noise = torch.randn(x0.shape, generator=gen)
            noisy = (1 - sigma) * x0 + sigma * noise
            pred = trainer.family.predict(trainer.transformer, noisy, sigma, text)
            losses.append(torch.mean((pred - trainer.family.target(x0, noise)) ** 2).item())
    return sum(losses) / len(losses)


def test_overfitting_one_image_lowers_the_loss_clearly(tiny_lumina2, one_image, tmp_path):
    spec = spec_for(
        tiny_lumina2,
        one_image,
        tmp_path / "out",
        training={
            "max_train_steps": 50,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": False,
            "seed": 0,
        },
        optimizer={"optimizer": "adamw", "learning_rate": 1e-2},
        lora={"lora_rank": 8, "lora_alpha": 8, "lora_target_preset": "attention+ffn"},
        checkpointing={"checkpoint_step_interval": None},
    )
    trainer = Trainer(spec, ListSink())
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    trainer.transformer.eval()
    before = eval_loss(trainer)
    trainer.transformer.train()
    result = trainer.train()
    trainer.transformer.eval()
    after = eval_loss(trainer)
    assert after < 0.85 * before, (before, after)
    assert result.steps == 50 and len(result.loss_history) == 50


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


RESUME_OVERRIDES = dict(
    training={
        "max_train_steps": 6,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "mixed_precision": "no",
        "base_model_default_dtype": "fp32",
        "gradient_checkpointing": False,
        "seed": 5,
        "use_ema": True,
        "caption_dropout_probability": 0.3,
    },
    optimizer={"optimizer": "adamw_bf16", "learning_rate": 3e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 2},
    lora={"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1},
    checkpointing={"checkpoint_step_interval": 2},
)


@pytest.fixture
def three_images(tmp_path) -> Path:
    return write_dataset(tmp_path / "data3", {"a": "a red circle", "b": "a blue circle", "c": "a green circle"})


def test_resume_after_cancel_equals_the_uninterrupted_run(tiny_lumina2, three_images, tmp_path):
    straight = Trainer(spec_for(tiny_lumina2, three_images, tmp_path / "straight", **RESUME_OVERRIDES)).run()

    cancel = threading.Event()

    class CancelAtStep3(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 3:
                cancel.set()

    spec = spec_for(tiny_lumina2, three_images, tmp_path / "split", **RESUME_OVERRIDES)
    sink = CancelAtStep3()
    first = Trainer(spec, sink, cancel=cancel).run()
    assert first.cancelled and first.steps == 3
    assert sink.of("cancelled")[0]["checkpoint"].endswith("step-3")
    second = Trainer(spec, ListSink()).run()
    assert second.resumed_from.name == "step-3" and second.steps == 6
    assert_same_adapter(final_adapter(tmp_path / "straight"), final_adapter(tmp_path / "split"))
    assert [h[1] for h in second.loss_history] == pytest.approx([h[1] for h in straight.loss_history], rel=1e-5)
    ema_a = load_file(str(straight.ema_lora.diffusers))
    ema_b = load_file(str(second.ema_lora.diffusers))
    assert_same_adapter(ema_a, ema_b)


def test_a_run_killed_mid_checkpoint_resumes_from_the_last_complete_one(tiny_lumina2, three_images, tmp_path):
    spec = spec_for(tiny_lumina2, three_images, tmp_path / "killed", **RESUME_OVERRIDES)
    spec_path = tmp_path / "spec.json"
    spec.save(spec_path)
    env = {**os.environ, "COMFYUI_TUNER_FAULT": "kill-during-checkpoint:4", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_core", "run", str(spec_path), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "step-2").is_dir() and not (ckpts / "step-4").exists()
    assert any(p.name.startswith(".tmp-step-4") for p in ckpts.iterdir())  # the half-written save

    sink = ListSink()
    resumed = Trainer(spec, sink).run()
    assert resumed.resumed_from.name == "step-2" and resumed.steps == 6
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())
    straight = Trainer(spec_for(tiny_lumina2, three_images, tmp_path / "straight", **RESUME_OVERRIDES)).run()
    assert_same_adapter(final_adapter(tmp_path / "straight"), final_adapter(tmp_path / "killed"))
    assert [h[1] for h in resumed.loss_history] == pytest.approx([h[1] for h in straight.loss_history], rel=1e-5)


def test_outputs_events_and_checkpoint_retention(tiny_lumina2, one_image, tmp_path):
    comfy_loras = tmp_path / "comfy" / "loras" / "comfyui-tuner"
    spec = spec_for(
        tiny_lumina2,
        one_image,
        tmp_path / "out",
        checkpointing={"checkpoint_step_interval": 1, "checkpoints_total_limit": 2},
        validation={
            "validation_disable": False,
            "validation_prompt": "a red circle",
            "validation_resolution": "64x64,128x64",
            "validation_num_inference_steps": 2,
            "validation_step_interval": 3,
        },
        export={"comfyui_lora_dir": str(comfy_loras), "output_name": "my_lora"},
    )
    sink = ListSink()
    result = Trainer(spec, sink).run()
    kinds = [e["type"] for e in sink.events]
    assert kinds[0] == "started" and kinds[-1] == "done"
    assert [e["step"] for e in sink.of("progress")] == [1, 2, 3, 4, 5, 6]
    assert all(e["total"] == 6 and e["loss"] > 0 for e in sink.of("progress"))
    # validation at step 0 (base model benchmark), at the interval and at the end; two sizes each
    val = sink.of("validation")
    assert [v["step"] for v in val] == [0, 3, 6]
    assert all(len(v["files"]) == 4 for v in val)  # prompt + unconditional, two resolutions
    from PIL import Image

    assert Image.open(val[-1]["files"][1]).size == (128, 64)
    # only the newest two checkpoints stay, each with its LoRA files
    kept = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert kept == ["step-5", "step-6"]
    assert (tmp_path / "out" / "checkpoints" / "step-6" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (comfy_loras / result.lora.comfyui.name).is_file()
    assert result.loss_plot.is_file() and Image.open(result.loss_plot).size == (640, 360)


def test_re_running_a_finished_run_retrains_nothing_and_more_steps_continue(tiny_lumina2, one_image, tmp_path):
    spec = spec_for(tiny_lumina2, one_image, tmp_path / "out")
    first = Trainer(spec).run()
    again = Trainer(spec, sink := ListSink()).run()
    assert again.steps == 6 and not sink.of("progress") and again.resumed_from.name == "step-6"
    assert_same_adapter(load_file(str(first.lora.diffusers)), load_file(str(again.lora.diffusers)))
    longer = Trainer(
        spec_for(
            tiny_lumina2, one_image, tmp_path / "out", training={**spec.training.model_dump(), "max_train_steps": 8}
        ),
        sink := ListSink(),
    ).run()
    assert [e["step"] for e in sink.of("progress")] == [7, 8] and longer.steps == 8


class ExplodingLoads:
    """Fails the test if any model component is loaded."""

    @staticmethod
    def install(monkeypatch):
        from trainer_core.families.lumina2 import Lumina2Family

        def boom(*a, **k):
            raise AssertionError("a model was loaded before the input was checked")

        for name in ("load_text_encoders", "load_vae", "load_transformer"):
            monkeypatch.setattr(Lumina2Family, name, boom)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"model": {"model_family": "lumina2", "model_flavour": "9.9"}}, UnknownFlavourError, "neta-lumina"),
        ({"model": {"model_family": "sdxl"}}, ConfigError, "lumina2"),
        ({"training": {"max_train_steps": None}}, ConfigError, "max_train_steps or num_train_epochs"),
        ({"datasets": []}, ConfigError, "no image dataset"),
        (
            {"datasets": [{"id": "v", "dataset_type": "video", "instance_data_dir": "x"}]},
            ConfigError,
            "kandinsky5-video",
        ),
    ],
)
def test_bad_options_fail_before_any_model_loads(
    tiny_lumina2, one_image, tmp_path, monkeypatch, overrides, error, match
):
    ExplodingLoads.install(monkeypatch)
    with pytest.raises(error, match=match):
        Trainer(spec_for(tiny_lumina2, one_image, tmp_path / "out", **overrides)).run()


def test_a_broken_dataset_fails_before_any_model_loads_naming_the_file(tiny_lumina2, one_image, tmp_path, monkeypatch):
    ExplodingLoads.install(monkeypatch)
    (one_image / "img.txt").unlink()
    with pytest.raises(DatasetError, match="img"):
        Trainer(spec_for(tiny_lumina2, one_image, tmp_path / "out")).run()


def test_cli_demo_writes_both_lora_formats_previews_and_a_loss_plot(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer_core",
            "demo",
            "--output",
            str(tmp_path / "demo"),
            "--steps",
            "6",
            "--events",
            "jsonl",
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = events[-1]
    assert done["type"] == "done"
    assert Path(done["lora"]["diffusers"]).is_file() and Path(done["lora"]["comfyui"]).is_file()
    assert Path(done["loss_plot"]).is_file()
    assert any(e["type"] == "validation" for e in events)
    assert {e["type"] for e in events} >= {"started", "cache", "memory", "progress", "checkpoint", "done"}


def test_gradient_checkpointing_trains_the_same_adapter(tiny_lumina2, three_images, tmp_path):
    results = {}
    for gc in (False, True):
        overrides = {**RESUME_OVERRIDES, "training": {**RESUME_OVERRIDES["training"], "gradient_checkpointing": gc}}
        Trainer(spec_for(tiny_lumina2, three_images, tmp_path / f"gc-{gc}", **overrides)).run()
        results[gc] = final_adapter(tmp_path / f"gc-{gc}")
    assert_same_adapter(results[False], results[True])


def test_epochs_set_the_length_when_no_step_count_is_given(tiny_lumina2, three_images, tmp_path):
    spec = spec_for(
        tiny_lumina2,
        three_images,
        tmp_path / "out",
        training={
            "max_train_steps": None,
            "num_train_epochs": 2,
            "train_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": False,
        },
    )
    spec.datasets[0].repeats = 1  # each image twice per epoch
    sink = ListSink()
    result = Trainer(spec, sink).run()
    assert sink.of("started")[0]["total_steps"] == 12 and result.steps == 12
    assert sink.of("progress")[-1]["epoch"] == 1


def test_user_prompt_library_prompts_are_rendered_by_name(tiny_lumina2, one_image, tmp_path):
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"cat": "a cat", "dog": "a dog"}))
    spec = spec_for(
        tiny_lumina2,
        one_image,
        tmp_path / "out",
        training={
            "max_train_steps": 1,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": False,
        },
        validation={
            "validation_disable": False,
            "user_prompt_library": str(library),
            "disable_benchmark": True,
            "validation_disable_unconditional": True,
            "validation_resolution": "64x64",
            "validation_num_inference_steps": 1,
        },
    )
    sink = ListSink()
    Trainer(spec, sink).run()
    (val,) = sink.of("validation")
    assert sorted(Path(f).name for f in val["files"]) == ["cat-64x64.png", "dog-64x64.png"]


# ----------------------------------------------------------------------------- resuming with care
def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resuming_with_changed_settings_stops_before_any_model_loads_and_lists_each_change(
    tiny_lumina2, one_image, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    Trainer(spec_for(tiny_lumina2, one_image, out)).run()  # lr 5e-3, rank 4, alpha 8, 6 steps
    changed = spec_for(
        tiny_lumina2,
        one_image,
        out,
        optimizer={"learning_rate": 1e-3},
        lora={"lora_rank": 4, "lora_alpha": 4},
        memory={"vae_enable_tiling": True},  # where weights sit: not a change of the run
    )
    with monkeypatch.context() as m:
        ExplodingLoads.install(m)
        with pytest.raises(ConfigError) as err:
            Trainer(changed).run()
        text = str(err.value)
        assert "checkpoint step-6 differs in:\n  learning_rate: 0.005 -> 0.001\n  lora_alpha: 8.0 -> 4.0\n" in text
        assert "vae_enable_tiling" not in text
        assert "another output_dir" in text and "resume_from_checkpoint ''" in text and "resume_with_changes" in text
        # the adapter's shape cannot be continued, even on purpose
        reshaped = spec_for(
            tiny_lumina2, one_image, out, lora={"lora_rank": 8}, checkpointing={"resume_with_changes": True}
        )
        with pytest.raises(ConfigError, match="lora_rank: 4 -> 8"):
            Trainer(reshaped).run()

    # on purpose: the new learning rate applies from the checkpoint on
    sink = ListSink()
    longer = spec_for(
        tiny_lumina2,
        one_image,
        out,
        optimizer={"learning_rate": 1e-3},
        training={**changed.training.model_dump(), "max_train_steps": 8},
        checkpointing={"resume_with_changes": True},
    )
    result = Trainer(longer, sink).run()
    assert result.resumed_from.name == "step-6"
    assert [(e["step"], e["lr"]) for e in sink.of("progress")] == [(7, 1e-3), (8, 1e-3)]
    assert any("learning_rate: 0.005 -> 0.001" in w["message"] for w in sink.of("warning"))


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_the_resume_stays_exact(
    tiny_lumina2, three_images, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    spec = spec_for(tiny_lumina2, three_images, out, **RESUME_OVERRIDES)  # checkpoints at steps 2, 4, 6
    straight = Trainer(spec).run()
    straight_adapter = final_adapter(out)
    flip_a_byte(out / "checkpoints" / "step-6" / "optimizer.safetensors")
    flip_a_byte(out / "checkpoints" / "step-4" / "adapter.safetensors")

    sink = ListSink()
    again = Trainer(spec, sink).run()
    assert again.resumed_from.name == "step-2" and again.steps == 6
    damaged = [w["message"] for w in sink.of("warning") if "damaged" in w["message"]]
    assert len(damaged) == 2 and "step-6" in damaged[0] and "optimizer.safetensors" in damaged[0]
    assert_same_adapter(straight_adapter, final_adapter(out))
    assert [h[1] for h in again.loss_history] == pytest.approx([h[1] for h in straight.loss_history], rel=1e-5)

    for folder in (out / "checkpoints").glob("step-*"):
        flip_a_byte(folder / "adapter.safetensors")
    with monkeypatch.context() as m:
        ExplodingLoads.install(m)
        with pytest.raises(CheckpointError, match="no intact checkpoint"):
            Trainer(spec).run()


def test_resume_from_checkpoint_names_a_folder_and_a_bad_value_fails_before_any_model_loads(
    tiny_lumina2, one_image, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    spec = spec_for(tiny_lumina2, one_image, out)  # checkpoints at steps 3 and 6
    Trainer(spec).run()
    six_steps = final_adapter(out)
    sink = ListSink()
    named = spec_for(tiny_lumina2, one_image, out, checkpointing={"resume_from_checkpoint": "step-3"})
    result = Trainer(named, sink).run()
    assert result.resumed_from.name == "step-3"
    assert [e["step"] for e in sink.of("progress")] == [4, 5, 6]
    assert_same_adapter(six_steps, final_adapter(out))

    ExplodingLoads.install(monkeypatch)
    for bad in ("step-99", "the newest one please", str(tmp_path / "nowhere")):
        wrong = spec_for(tiny_lumina2, one_image, out, checkpointing={"resume_from_checkpoint": bad})
        with pytest.raises(CheckpointError, match="names no folder") as err:
            Trainer(wrong).run()
        assert "step-3, step-6" in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_loss_stops_the_run_keeping_the_last_good_checkpoint(
    tiny_lumina2, one_image, tmp_path, monkeypatch, bad
):
    import trainer_core.train.engine as engine

    real, calls = engine.flow_loss, []

    def poisoned_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * bad if len(calls) == 3 else loss

    monkeypatch.setattr(engine, "flow_loss", poisoned_at_step_3)
    out = tmp_path / "out"
    spec = spec_for(tiny_lumina2, one_image, out, checkpointing={"checkpoint_step_interval": 1})
    with pytest.raises(ConfigError, match=f"the loss became {bad} at step 3") as err:
        Trainer(spec).run()
    assert "checkpoint step-2 is the last one saved" in str(err.value) and "learning_rate" in err.value.hint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]


def test_weights_made_nan_by_an_infinite_learning_rate_are_never_checkpointed(tiny_lumina2, one_image, tmp_path):
    out = tmp_path / "out"
    spec = spec_for(
        tiny_lumina2,
        one_image,
        out,
        optimizer={"learning_rate": float("inf")},
        checkpointing={"checkpoint_step_interval": 1},
    )
    with pytest.raises(ConfigError, match="LoRA weights became NaN or infinite at step 1"):
        Trainer(spec).run()
    assert not list((out / "checkpoints").glob("step-*"))
