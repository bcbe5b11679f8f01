"""A SimpleTuner user's Lumina 2 config runs unchanged through ``python -m trainer_core train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.datasets import write_dataset
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_core", *args, "--events", "jsonl", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, events, proc.stderr


def test_simpletuner_lumina2_config_and_dataloader_import_and_train(tiny_lumina2, tmp_path):
    data = write_dataset(tmp_path / "datasets" / "pixel-art", {"a": "pixel art of a red circle", "b": "a blue one"})
    backend = [
        {
            "id": "pixel-art",
            "type": "local",
            "dataset_type": "image",
            "instance_data_dir": str(data),
            "caption_strategy": "textfile",
            "resolution": 64,
            "resolution_type": "pixel_area",
            "crop": False,
            "repeats": 1,
            "cache_dir_vae": str(tmp_path / "cache" / "vae" / "pixel-art"),
            "vae_cache_clear_each_epoch": False,
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(tmp_path / "cache" / "text"),
            "write_batch_size": 128,
        },
    ]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(backend))
    config = {
        "--model_family": "lumina2",
        "model_flavour": "2.0",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(tiny_lumina2),
        "output_dir": str(tmp_path / "output"),
        "data_backend_config": "multidatabackend.json",
        "lora_rank": 4,
        "lora_alpha": 8,
        "learning_rate": "1e-3",
        "optimizer": "adamw_bf16",
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "max_train_steps": 4,
        "num_train_epochs": 0,
        "train_batch_size": 1,
        "mixed_precision": "bf16",
        "flow_schedule_auto_shift": True,
        "flow_schedule_shift": 0.0,
        "checkpointing_steps": 2,
        "validation_steps": 2,
        "validation_prompt": "pixel art of a red circle",
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 2,
        "validation_guidance": 4.0,
        "use_ema": True,
        "seed": 42,
        "disable_tf32": True,
        "push_to_hub": False,
        "base_model_precision": "int8-quanto",  # supported: the run trains on an int8 base
        "lora_format": "comfyui",
    }
    (tmp_path / "config" / "config.json").write_text(json.dumps(config))

    code, events, stderr = run_cli("train", "--config", str(tmp_path / "config" / "config.json"))
    assert code == 0, stderr[-3000:]
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    unsupported = [w for w in warnings if "not supported yet" in w]
    assert len(unsupported) == 1
    for key in ("disable_tf32", "lora_format", "pixel-art.vae_cache_clear_each_epoch"):
        assert key in unsupported[0]
    assert "push_to_hub" not in unsupported[0]  # publishing is supported (off here)
    done = events[-1]
    assert done["type"] == "done" and done["steps"] == 4
    with safe_open(done["lora"]["comfyui"], "pt") as f:
        meta = f.metadata()
        assert meta["comfyui_tuner.family"] == "lumina2" and meta["comfyui_tuner.steps"] == "4"
        assert any(k.endswith("attention.qkv.lora_A.weight") for k in f.keys())
    assert [e["step"] for e in events if e["type"] == "validation"] == [0, 2, 4]
    assert (tmp_path / "cache" / "vae" / "pixel-art").is_dir()  # the dataloader's cache dirs are honoured


def test_the_seed_config_with_clip_evaluation_trackers_and_hub_publishing_trains_through_the_cli(
    tiny_lumina2, tmp_path
):
    """The seed Lumina 2 config's evaluation, tracking and publishing keys, as written (issue 18): none is
    "not supported"; CLIP scores the base model at step 0 and then on schedule, TensorBoard and an offline
    wandb run both record the run, and an unreachable Hub is a warning after which the run still finishes."""
    from trainer_core.testing.tiny import build_tiny_clip

    data = write_dataset(tmp_path / "datasets" / "cats", {"a": "a photo of a cat", "b": "a cat on a mat"})
    backend = [
        {
            "id": "cats",
            "type": "local",
            "dataset_type": "image",
            "instance_data_dir": str(data),
            "caption_strategy": "textfile",
            "resolution": 64,
            "resolution_type": "pixel_area",
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(tmp_path / "cache" / "text"),
        },
    ]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(backend))
    config = {
        "model_family": "lumina2",
        "model_flavour": "2.0",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(tiny_lumina2),
        "output_dir": str(tmp_path / "output"),
        "data_backend_config": "multidatabackend.json",
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "max_train_steps": 4,
        "train_batch_size": 1,
        "checkpointing_steps": 2,
        "validation_steps": 2,
        "validation_prompt": "a photo of a cat",
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 2,
        "evaluation_type": "clip",
        "eval_steps_interval": 2,
        "pretrained_evaluation_model_name_or_path": str(build_tiny_clip(tmp_path / "clip")),
        "report_to": "all",
        "tracker_project_name": "lumina2-training",
        "tracker_run_name": "seed",
        "push_to_hub": True,
        "push_checkpoints_to_hub": True,
        "hub_model_id": "me/lumina2-lora",
    }
    (tmp_path / "config" / "config.json").write_text(json.dumps(config))
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_CONSOLE": "off",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_TOKEN": "hf_test_token_not_real",
    }
    code, events, stderr = run_cli("train", "--config", str(tmp_path / "config" / "config.json"), env=env)
    assert code == 0, stderr[-3000:]
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    for key in ("evaluation_type", "eval_steps_interval", "report_to", "tracker_", "push_to_hub", "hub_model_id"):
        assert not any(key in w and "not supported" in w for w in warnings), (key, warnings)
    assert [e["step"] for e in events if e["type"] == "evaluation"] == [0, 2, 4]
    assert any(w.startswith("Hub upload of the checkpoint step-2") for w in warnings)  # it failed, and said so
    done = [e for e in events if e["type"] == "done"]  # the final upload's warning may come after it
    assert len(done) == 1 and done[0]["steps"] == 4
    assert list((tmp_path / "output" / "logs" / "lumina2-training").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").rglob("*.wandb"))  # the offline run, for `wandb sync`


def test_cli_reports_a_bad_config_value_with_the_key_and_exit_code_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_family": "lumina2", "optimizer": "sgd"}))
    code, events, _ = run_cli("train", "--config", str(tmp_path / "config.json"))
    assert code == 2
    assert events[-1]["type"] == "error" and "optimizer" in events[-1]["message"]


def test_import_and_export_config_commands_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_family": "lumina2", "lora_rank": 8, "seed": 1}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "trainer_core"]
    subprocess.run(
        [*cmd, "import-config", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "spec.json")],
        env=env,
        check=True,
        capture_output=True,
    )
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["lora"]["lora_rank"] == 8 and spec["training"]["seed"] == 1
    subprocess.run(
        [*cmd, "export-config", str(tmp_path / "spec.json"), "--out", str(tmp_path / "st")],
        env=env,
        check=True,
        capture_output=True,
    )
    exported = json.loads((tmp_path / "st" / "config.json").read_text())
    assert exported["lora_rank"] == 8 and exported["model_family"] == "lumina2"


def test_cache_command_fills_both_caches_without_training(tiny_lumina2, tmp_path):
    from helpers.datasets import lumina_spec

    from trainer_core.spec import TrainSpec

    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle"})
    spec = TrainSpec.model_validate(lumina_spec(tiny_lumina2, data, tmp_path / "out"))
    spec.save(tmp_path / "spec.json")
    code, events, stderr = run_cli("cache", str(tmp_path / "spec.json"))
    assert code == 0, stderr[-2000:]
    cached = events[-1]
    assert cached["type"] == "cached"
    assert cached["latents"] == {"total": 2, "encoded": 2, "skipped": False}
    assert cached["text"]["encoded"] == cached["text"]["total"] >= 3  # captions, "" and the negative
    assert not any(e["type"] == "progress" for e in events)
    code, events, _ = run_cli("cache", str(tmp_path / "spec.json"))
    assert events[-1]["latents"]["encoded"] == 0 and events[-1]["text"]["encoded"] == 0


def test_simpletuners_kandinsky5_lokr_example_trains_with_only_the_model_path_added(tmp_path):
    """SimpleTuner's K5 image LoKr example (its config, dataloader and lycoris_config.json) trains as shipped.

    The only edit is where the model lives (the example names the Hub's, which cannot be fetched
    here); its relative data and cache paths resolve against the working directory, as in SimpleTuner.
    """
    import shutil

    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    example = tmp_path / "example"
    shutil.copytree(REPO / "tests" / "data" / "simpletuner" / "kandinsky5-image-t2i.lycoris-lokr", example)
    config = json.loads((example / "config.json").read_text())
    config["pretrained_model_name_or_path"] = str(build_tiny_kandinsky5_image(tmp_path / "model"))
    (example / "config.json").write_text(json.dumps(config))
    write_dataset(example / "data" / "dreambooth", {"a": "ignored: the instance prompt is used", "b": "also"})

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_core", "train", "--config", "config.json", "--events", "jsonl", "--quiet"],
        cwd=example,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = events[-1]
    assert done["type"] == "done" and done["steps"] == 4
    with safe_open(str(example / done["lora"]["comfyui"]), "pt") as f:  # output_dir is relative, as shipped
        meta = f.metadata()
        assert meta["comfyui_tuner.adapter"] == "lokr"
        assert json.loads(meta["comfyui_tuner.lycoris_config"])["factor"] == 4
        keys = list(f.keys())
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.endswith(".lokr_w1") for k in keys)  # full_matrix: both factors written whole
    assert (example / "cache" / "vae" / "dreambooth-1024").is_dir()


def test_a_lumina2_full_finetune_quickstart_config_trains_through_the_cli(tiny_lumina2, tmp_path):
    """model_type full, LR 1e-5, EMA, max_grad_norm 1.0, adamw_bf16 in bf16: 3 steps of the tiny model."""
    from test_simpletuner_import import LUMINA2_FULL_QUICKSTART

    data = write_dataset(tmp_path / "datasets" / "pixel-art", {"a": "pixel art of a red circle", "b": "a blue one"})
    backend = [
        {
            "id": "pixel-art",
            "type": "local",
            "instance_data_dir": str(data),
            "caption_strategy": "textfile",
            "resolution": 64,
            "resolution_type": "pixel_area",
        },
        {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "te")},
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    config = {
        **LUMINA2_FULL_QUICKSTART,
        "pretrained_model_name_or_path": str(tiny_lumina2),
        "output_dir": str(tmp_path / "output"),
        "data_backend_config": str(tmp_path / "multidatabackend.json"),
        "ema_update_interval": 2,
        "checkpointing_steps": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, events, stderr = run_cli("train", "--config", str(tmp_path / "config.json"))
    assert code == 0, stderr[-3000:]
    assert not [e for e in events if e["type"] == "warning" and "not supported" in e["message"]]
    memory = next(e for e in events if e["type"] == "memory" and e.get("stage") == "training")
    assert memory["model_type"] == "full" and memory["trainable_parameters"] == memory["parameters"]
    assert memory["ema_device"] == "cpu" and memory["ema_bytes"] == 4 * memory["trainable_parameters"]
    done = events[-1]
    assert done["type"] == "done" and done["steps"] == 3 and done["ema_lora"] is not None
    with safe_open(done["lora"]["comfyui"], "pt") as f:  # the whole transformer, in ComfyUI's naming
        assert f.metadata()["comfyui_tuner.steps"] == "3"
        assert any(k.endswith("attention.qkv.weight") for k in f.keys())
    assert (Path(done["lora"]["diffusers"]) / "transformer").is_dir()
