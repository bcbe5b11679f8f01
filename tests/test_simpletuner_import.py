"""SimpleTuner config import/export: real quick-start configs must mean the same run here.

Why these tests: users paste SimpleTuner configs; a key silently dropped or misread trains a
different LoRA than they asked for, so every unsupported key must be reported and every invalid
value must name the key they wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer_core.errors import ConfigError
from trainer_core.simpletuner import (
    DATASET_KEY_ALIASES,
    GLOBAL_DATASET_KEYS,
    KEY_ALIASES,
    SIMPLETUNER_DATASET_DEFAULTS,
    SIMPLETUNER_DEFAULTS,
    TUNER_BLOCK,
    TUNER_ONLY_KEYS,
    UNSUPPORTED_MESSAGE,
    config_keys,
    export_simpletuner,
    import_simpletuner,
    write_simpletuner,
)
from trainer_core.spec import DatasetSpec, TrainSpec

# Written like SimpleTuner's Lumina 2 quick start (documentation/quickstart/LUMINA2.md).
LUMINA2_CONFIG = """
{
    "model_family": "lumina2",
    "model_flavour": "2.0",
    "model_type": "lora",
    "lora_type": "standard",
    "lora_rank": 16,
    "lora_alpha": 16,
    "learning_rate": 1e-4,
    "optimizer": "adamw_bf16",
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "max_train_steps": 2000,
    "num_train_epochs": 0,
    "train_batch_size": 2,
    "gradient_checkpointing": true,
    "mixed_precision": "bf16",
    "flow_schedule_auto_shift": true,
    "flow_schedule_shift": 0.0,
    "disable_bucket_pruning": true,
    "aspect_bucket_alignment": 64,
    "validation_steps": 50,
    "validation_guidance": 4.0,
    "validation_guidance_rescale": 0.0,
    "validation_num_inference_steps": 40,
    "validation_resolution": "1024x1024",
    "validation_prompt": "A photo-realistic image of a cat",
    "validation_negative_prompt": "ugly, cropped, blurry, low-quality, mediocre average",
    "validation_seed": 42,
    "validation_disable_unconditional": true,
    "use_ema": true,
    "report_to": "wandb",
    "tracker_project_name": "lumina2-training",
    "push_to_hub": false,
    "hub_model_id": "lumina2-lora",
    "base_model_precision": "int8-quanto",
    "quantize_via": "cpu",
    "vae_batch_size": 1,
    "checkpointing_steps": 100,
    "checkpoints_total_limit": 3,
    "resume_from_checkpoint": "latest",
    "output_dir": "output/lumina2",
    "data_backend_config": "multidatabackend.json",
    "--seed": 42
}
"""

LUMINA2_BACKEND = """
[
  {
    "id": "lumina2-training",
    "type": "local",
    "crop": true,
    "crop_aspect": "square",
    "crop_style": "center",
    "resolution": 1024,
    "minimum_image_size": 512,
    "maximum_image_size": 2048,
    "target_downsample_size": 1024,
    "resolution_type": "pixel_area",
    "cache_dir_vae": "cache/vae/lumina2/training",
    "instance_data_dir": "/datasets/training",
    "caption_strategy": "textfile",
    "metadata_backend": "discovery",
    "repeats": 2,
    "vae_cache_clear_each_epoch": false
  },
  {
    "id": "text-embeds",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": true,
    "cache_dir": "cache/text/lumina2",
    "disabled": false,
    "write_batch_size": 128
  }
]
"""

# Keys of LUMINA2_CONFIG that the spec may support one day (memory/perf features): they must be either
# imported into the spec or reported, never both and never neither.
_MAYBE_SUPPORTED_LATER = {"base_model_precision", "quantize_via", "vae_batch_size"}
_NEVER_SUPPORTED: set[str] = set()  # report_to: test_tracking.py; push_to_hub: test_publish.py


def _image(id: str = "img", **extra) -> dict:
    return {"id": id, "instance_data_dir": "/data/" + id, "caption_strategy": "textfile", **extra}


def _write_config(folder: Path, config: dict | str, backend: list | str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    if backend is not None:
        (folder / "multidatabackend.json").write_text(backend if isinstance(backend, str) else json.dumps(backend))
    return path


# ----------------------------------------------------------------------------- the quick-start config
def test_lumina2_quickstart_config_imports(tmp_path):
    path = _write_config(tmp_path / "config" / "lumina2", LUMINA2_CONFIG, LUMINA2_BACKEND)
    result = import_simpletuner(path)
    spec = result.spec

    assert spec.model.model_family == "lumina2"
    assert spec.model.model_flavour == "2.0"
    assert spec.model.model_type == "lora"
    assert spec.lora.lora_rank == 16 and spec.lora.lora_alpha == 16
    assert spec.optimizer.learning_rate == pytest.approx(1e-4)
    assert spec.optimizer.optimizer == "adamw_bf16"
    assert spec.optimizer.lr_scheduler == "constant"
    assert spec.training.max_train_steps == 2000
    assert spec.training.num_train_epochs is None  # 0 means "unset" in SimpleTuner
    assert spec.training.train_batch_size == 2
    assert spec.training.flow_schedule_auto_shift is True
    assert spec.training.flow_schedule_shift == 0.0
    assert spec.training.use_ema is True
    assert spec.training.seed == 42  # "--seed": CLI-style prefix stripped
    assert spec.training.aspect_bucket_alignment == 64
    assert spec.training.disable_bucket_pruning is True
    assert spec.validation.validation_step_interval == 50  # legacy validation_steps
    assert spec.validation.validation_guidance == 4.0
    assert spec.validation.validation_resolution == "1024x1024"
    assert spec.validation.validation_num_inference_steps == 40
    assert spec.validation.validation_disable_unconditional is True
    assert spec.validation.validation_prompt == "A photo-realistic image of a cat"
    assert spec.checkpointing.checkpoint_step_interval == 100  # legacy checkpointing_steps
    assert spec.checkpointing.checkpoints_total_limit == 3
    assert spec.checkpointing.resume_from_checkpoint == "latest"
    assert spec.output_dir == "output/lumina2"

    image, embeds = spec.datasets
    assert image == DatasetSpec(
        id="lumina2-training",
        instance_data_dir="/datasets/training",
        crop=True,
        crop_aspect="square",
        crop_style="center",
        resolution=1024,
        resolution_type="pixel_area",
        minimum_image_size=512,
        maximum_image_size=2048,
        target_downsample_size=1024,
        cache_dir_vae="cache/vae/lumina2/training",
        caption_strategy="textfile",
        repeats=2,
    )
    assert embeds.dataset_type == "text_embeds" and embeds.default is True
    assert embeds.cache_dir == "cache/text/lumina2" and embeds.write_batch_size == 128

    known = set(config_keys())
    expected = sorted(
        _NEVER_SUPPORTED
        | {k for k in _MAYBE_SUPPORTED_LATER if k not in known}
        | {"lumina2-training.vae_cache_clear_each_epoch"}
    )
    assert result.unsupported_keys == expected
    listing = [w for w in result.warnings if w.startswith(UNSUPPORTED_MESSAGE)]
    assert listing == [UNSUPPORTED_MESSAGE + ", ".join(expected)]
    assert result.warnings == listing  # nothing else to say about this config
    if "vae_batch_size" in known:
        assert spec.training.vae_batch_size == 1
    # the trackers are imported (tests/test_tracking.py runs them)
    assert spec.tracking.report_to == "wandb" and spec.tracking.tracker_project_name == "lumina2-training"


def test_data_backend_config_relative_to_cwd_like_simpletuner(tmp_path, monkeypatch):
    # SimpleTuner runs from its checkout and writes paths like config/lumina2/multidatabackend.json.
    root = tmp_path / "simpletuner"
    folder = root / "config" / "lumina2"
    config = json.loads(LUMINA2_CONFIG) | {"data_backend_config": "config/lumina2/multidatabackend.json"}
    path = _write_config(folder, config, LUMINA2_BACKEND)
    monkeypatch.chdir(root)
    assert [d.id for d in import_simpletuner(path).spec.datasets] == ["lumina2-training", "text-embeds"]


def test_backend_argument_overrides_data_backend_config(tmp_path):
    config = {"model_family": "lumina2", "data_backend_config": "does/not/exist.json"}
    spec = import_simpletuner(config, [_image("a")]).spec
    assert [d.id for d in spec.datasets] == ["a"]
    backend_file = tmp_path / "mdb.json"
    backend_file.write_text(json.dumps([_image("b")]))
    assert [d.id for d in import_simpletuner(config, backend_file).spec.datasets] == ["b"]
    assert [d.id for d in import_simpletuner(config, str(backend_file)).spec.datasets] == ["b"]


# ----------------------------------------------------------------------------- value handling
def test_string_values_coerce_like_simpletuner_webui():
    config = {
        "lora_rank": "32",
        "lora_alpha": "16",
        "learning_rate": "1e-4",
        "use_ema": "true",
        "gradient_checkpointing": "false",
        "flow_schedule_auto_shift": "True",
        "max_train_steps": "1000",
        "num_train_epochs": "0",
        "seed": "7",
        "validation_resolution": 1024,  # a number for a string field
        "model_flavour": 2.0,
        "peft_lora_target_modules": '["to_q", "to_k"]',
    }
    backend = [_image("a", resolution="768", crop="true", repeats="3")]
    spec = import_simpletuner(config, backend).spec
    assert spec.lora.lora_rank == 32 and spec.lora.lora_alpha == 16.0
    assert spec.optimizer.learning_rate == pytest.approx(1e-4)
    assert spec.training.use_ema is True and spec.training.gradient_checkpointing is False
    assert spec.training.flow_schedule_auto_shift is True
    assert spec.training.max_train_steps == 1000 and spec.training.num_train_epochs is None
    assert spec.training.seed == 7
    assert spec.validation.validation_resolution == "1024"
    assert spec.model.model_flavour == "2.0"
    assert spec.lora.peft_lora_target_modules == ["to_q", "to_k"]
    ds = spec.datasets[0]
    assert ds.resolution == 768 and ds.crop is True and ds.repeats == 3


def test_comma_list_for_target_modules():
    spec = import_simpletuner({"peft_lora_target_modules": "to_q, to_k ,to_v"}).spec
    assert spec.lora.peft_lora_target_modules == ["to_q", "to_k", "to_v"]


def test_dash_prefixes_stripped_and_duplicates_checked():
    spec = import_simpletuner({"--lora_rank": 8, "--output_dir": "out", "--use_ema": True}).spec
    assert spec.lora.lora_rank == 8 and spec.output_dir == "out" and spec.training.use_ema is True
    # the same key twice with the same value is fine, with different values it is an error
    assert import_simpletuner({"--seed": 1, "seed": 1}).spec.training.seed == 1
    with pytest.raises(ConfigError, match="seed"):
        import_simpletuner({"--seed": 1, "seed": 2})
    with pytest.raises(ConfigError, match="validation_steps"):
        import_simpletuner({"validation_steps": 10, "validation_step_interval": 20})


def test_special_values():
    config = {
        "max_train_steps": 0,
        "num_train_epochs": 3,
        "lora_alpha": None,
        "resume_from_checkpoint": "",
        "report_to": "none",
        "mixed_precision": "no",
        "model_family": "kandinsky5_video",
    }
    result = import_simpletuner(config)
    spec = result.spec
    assert spec.training.max_train_steps is None and spec.training.num_train_epochs == 3
    assert spec.lora.lora_alpha is None
    assert spec.checkpointing.resume_from_checkpoint is None
    assert spec.training.mixed_precision == "no"
    assert spec.model.model_family == "kandinsky5-video"
    assert result.warnings == [] and result.unsupported_keys == []
    assert import_simpletuner({"model_family": "kandinsky5-image"}).spec.model.model_family == "kandinsky5-image"
    assert (
        import_simpletuner({"resume_from_checkpoint": "latest"}).spec.checkpointing.resume_from_checkpoint == "latest"
    )
    assert import_simpletuner({"report_to": None}).unsupported_keys == []


def test_older_key_spellings():
    config = {
        "flux_schedule_shift": 1.5,
        "flux_schedule_auto_shift": False,
        "flux_use_uniform_schedule": True,
        "flow_matching_sigmoid_scale": 2.0,
        "save_total_limit": 2,
        "checkpointing_steps": 25,
        "validation_steps": 75,
    }
    spec = import_simpletuner(config).spec
    assert spec.training.flow_schedule_shift == 1.5
    assert spec.training.flow_use_uniform_schedule is True
    assert spec.training.flow_sigmoid_scale == 2.0
    assert spec.checkpointing.checkpoints_total_limit == 2
    assert spec.checkpointing.checkpoint_step_interval == 25
    assert spec.validation.validation_step_interval == 75


def test_omitted_keys_take_simpletuner_defaults():
    # A config that omits these trains like SimpleTuner would, not with our own defaults.
    spec = import_simpletuner({"max_train_steps": 100}).spec
    assert spec.optimizer.lr_scheduler == "constant_with_warmup"
    assert spec.lora.lora_dropout == pytest.approx(0.1)
    assert spec.training.train_batch_size == 4
    assert spec.optimizer.max_grad_norm == 2.0 and spec.optimizer.grad_clip_method == "value"
    assert spec.training.num_train_epochs is None
    # neither length given: SimpleTuner trains one epoch
    assert import_simpletuner({}).spec.training.num_train_epochs == 1
    # null is "not given" for a field that cannot be None
    assert import_simpletuner({"lr_scheduler": None}).spec.optimizer.lr_scheduler == "constant_with_warmup"


def test_constant_scheduler_with_warmup_becomes_constant_with_warmup():
    result = import_simpletuner({"lr_scheduler": "constant", "lr_warmup_steps": "50"})
    assert result.spec.optimizer.lr_scheduler == "constant_with_warmup"
    assert any("constant_with_warmup" in w for w in result.warnings)
    assert import_simpletuner({"lr_scheduler": "cosine_with_warmup"}).spec.optimizer.lr_scheduler == "cosine"


def test_unsupported_keys_listed_once_including_dataset_keys():
    config = {
        "tread_config": {"routes": []},
        "enable_group_offload": True,
        "compress_disk_cache": True,
        "lora_format": "comfyui",
        "ignored_because_null": None,
    }
    backend = [
        _image("a", vae_cache_clear_each_epoch=True, video={"num_frames": 49}),
        {"id": "t", "dataset_type": "text_embeds", "text_encoder_batch_size": 4},
    ]
    result = import_simpletuner(config, backend)
    expected = sorted(
        [
            "tread_config",
            "enable_group_offload",
            "compress_disk_cache",
            "lora_format",
            "a.vae_cache_clear_each_epoch",
            "a.video",
            "t.text_encoder_batch_size",
        ]
    )
    known = set(config_keys())
    expected = [
        k for k in expected if (k.split(".", 1)[1] not in DatasetSpec.model_fields if "." in k else k not in known)
    ]
    assert result.unsupported_keys == expected
    assert [w for w in result.warnings if "not supported" in w] == [UNSUPPORTED_MESSAGE + ", ".join(expected)]


def test_global_dataset_keys_apply_where_missing():
    config = {
        "resolution": 768,
        "resolution_type": "pixel",
        "minimum_image_size": 256,
        "caption_strategy": "instance_prompt",  # the WebUI's spelling
        "instance_prompt": "a photo of sks",
    }
    backend = [
        {"id": "a", "instance_data_dir": "/a"},
        _image("b", resolution=1024, resolution_type="area"),
        {"id": "t", "dataset_type": "text_embeds", "default": True},
    ]
    result = import_simpletuner(config, backend)
    a, b, t = result.spec.datasets
    assert (a.resolution, a.resolution_type, a.minimum_image_size) == (768, "pixel", 256)
    assert a.caption_strategy == "instanceprompt" and a.instance_prompt == "a photo of sks"
    assert (b.resolution, b.resolution_type, b.caption_strategy) == (1024, "area", "textfile")
    assert b.minimum_image_size == 256
    assert t.resolution is None and t.resolution_type is None  # text embeds take no image settings
    assert result.unsupported_keys == []  # global keys are consumed, not ignored


def test_simpletuner_dataset_defaults_apply_to_image_datasets():
    spec = import_simpletuner({}, [{"id": "a", "instance_data_dir": "/a", "crop": True}]).spec
    assert spec.datasets[0].caption_strategy == "filename"
    assert spec.datasets[0].crop_style == "random"


def test_legacy_global_crop_keys():
    spec = import_simpletuner({"crop": True, "crop_style": "corner", "crop_aspect": "closest"}, [_image("a")]).spec
    ds = spec.datasets[0]
    assert (ds.crop, ds.crop_style, ds.crop_aspect) == (True, "corner", "closest")


def test_dataset_disable_alias():
    assert import_simpletuner({}, [_image("a", disable=True)]).spec.datasets[0].disabled is True


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("config", "backend", "needles"),
    [
        ({"optimizer": "sgd"}, [], ["optimizer", "'sgd'", "adamw_bf16", "prodigy"]),
        ({"lr_scheduler": "foo"}, [], ["lr_scheduler", "'foo'", "constant_with_warmup", "cosine"]),
        ({"mixed_precision": "fp8"}, [], ["mixed_precision", "'fp8'", "'bf16'"]),
        ({"validation_steps": 0}, [], ["validation_steps", "greater than or equal to 1"]),
        ({"lora_rank": "many"}, [], ["lora_rank"]),
        ({}, [_image("x", resolution_type="bad")], ["resolution_type", "'x'", "'pixel_area'", "'bad'"]),
        ({"resolution_type": "bad"}, [_image("x")], ["resolution_type", "top-level", "'x'", "'pixel_area'"]),
        ({}, [_image("x", disable="maybe")], ["disable", "'x'"]),
        ({}, [{"id": "x"}], ["'x'", "instance_data_dir"]),
    ],
)
def test_invalid_values_name_the_key(config, backend, needles):
    with pytest.raises(ConfigError) as info:
        import_simpletuner(config, backend)
    text = str(info.value)
    for needle in needles:
        assert needle in text, (needle, text)
    assert "optimizer.optimizer" not in text and "datasets.0" not in text  # not pydantic's nested path


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as info:
        import_simpletuner({"optimizer": "sgd", "lr_scheduler": "foo"}, [_image("x", crop_style="diagonal")])
    text = str(info.value)
    assert "optimizer" in text and "lr_scheduler" in text and "crop_style" in text


def test_missing_dataloader_file_names_paths_tried(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = _write_config(tmp_path / "cfg", {"data_backend_config": "mdb.json"})
    with pytest.raises(ConfigError) as info:
        import_simpletuner(path)
    text = str(info.value)
    assert "data_backend_config" in text
    assert str(tmp_path / "cfg" / "mdb.json") in text and str(elsewhere / "mdb.json") in text


def test_missing_backend_argument_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json"):
        import_simpletuner({}, tmp_path / "nope.json")


def test_no_dataloader_config_gives_no_datasets():
    assert import_simpletuner({"model_family": "lumina2"}).spec.datasets == []


def test_broken_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        import_simpletuner(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        import_simpletuner(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="JSON list"):
        import_simpletuner({}, {"id": "not-a-list"})


def test_user_prompt_library_path_resolved_next_to_config(tmp_path):
    folder = tmp_path / "cfg"
    path = _write_config(folder, {"user_prompt_library": "prompts.json"})
    (folder / "prompts.json").write_text(json.dumps({"cat": "a cat"}))
    spec = import_simpletuner(path).spec
    assert spec.validation.user_prompt_library == str(folder / "prompts.json")
    assert spec.validation_prompts() == {"cat": "a cat"}
    with pytest.raises(ConfigError, match="user_prompt_library"):
        import_simpletuner({"user_prompt_library": "missing-prompts.json"}, base_dir=folder)


# ----------------------------------------------------------------------------- mapping derived from the models
def test_every_spec_field_is_a_config_key():
    keys = config_keys()
    for section, info in TrainSpec.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and hasattr(model, "model_fields"):
            for name in model.model_fields:
                if name == "lycoris":  # a nested block: SimpleTuner reads it from the lycoris_config file
                    assert name not in keys
                    continue
                assert keys[name] == f"{section}.{name}"
    assert keys["output_dir"] == "output_dir"
    assert "datasets" not in keys


def test_tables_refer_to_existing_fields():
    keys = config_keys()
    assert set(KEY_ALIASES.values()) <= set(keys)
    assert set(SIMPLETUNER_DEFAULTS) <= set(keys)
    assert TUNER_ONLY_KEYS <= set(keys)
    assert set(DATASET_KEY_ALIASES.values()) <= set(DatasetSpec.model_fields)
    assert set(SIMPLETUNER_DATASET_DEFAULTS) <= set(DatasetSpec.model_fields)
    assert set(GLOBAL_DATASET_KEYS) <= set(DatasetSpec.model_fields)


# ----------------------------------------------------------------------------- export
def _rich_spec(tmp_path: Path) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {
                "model_family": "lumina2",
                "model_flavour": "neta-lumina",
                "pretrained_model_name_or_path": "/models/lumina",
                "system_prompt": "You are an assistant.",
                "tokenizer_max_length": 256,
            },
            "lora": {
                "lora_rank": 32,
                "lora_alpha": 8,
                "lora_dropout": 0.05,
                "peft_lora_target_modules": ["to_q", "to_k"],
                "lora_target_preset": "attention",
            },
            "optimizer": {
                "optimizer": "prodigy",
                "learning_rate": 1.0,
                "lr_scheduler": "cosine",
                "lr_warmup_steps": 10,
                "max_grad_norm": 0.5,
            },
            "training": {
                "train_batch_size": 2,
                "max_train_steps": 500,
                "seed": 3,
                "mixed_precision": "no",
                "flow_schedule_shift": 2.0,
                "use_ema": True,
                "caption_dropout_probability": 0.1,
                "dataloader_seed_offset": 5,
            },
            "checkpointing": {
                "checkpoint_step_interval": 50,
                "checkpoints_total_limit": None,
                "resume_from_checkpoint": None,
            },
            "validation": {
                "validation_prompt": "a cat",
                "user_prompt_library": {"dog": "a dog"},
                "validation_guidance": 4.0,
                "validation_resolution": "1024x1024,768x512",
                "validation_step_interval": 100,
            },
            "datasets": [
                {
                    "id": "photos",
                    "instance_data_dir": "/data/photos",
                    "caption_strategy": "instanceprompt",
                    "instance_prompt": "sks",
                    "resolution": 1024,
                    "resolution_type": "pixel_area",
                    "crop": True,
                    "crop_aspect": "closest",
                    "crop_aspect_buckets": [0.75, 1.0, 1.33],
                    "repeats": 3,
                },
                {"id": "off", "disabled": True},
                {"id": "embeds", "dataset_type": "text_embeds", "default": True, "cache_dir": "/cache/text"},
            ],
            "export": {"comfyui_lora_dir": "/comfy/models/loras/comfyui-tuner", "output_name": "my_lora"},
        }
    )


def test_export_import_round_trip(tmp_path):
    spec = _rich_spec(tmp_path)
    config, backend = export_simpletuner(spec)
    result = import_simpletuner(config, backend)
    assert result.spec == spec
    assert result.unsupported_keys == []
    assert import_simpletuner(*export_simpletuner(TrainSpec())).spec == TrainSpec()


def test_export_shape(tmp_path):
    spec = _rich_spec(tmp_path)
    config, backend = export_simpletuner(spec)
    for key in ("model_family", "model_flavour", "output_dir", "model_type", "data_backend_config"):
        assert key in config
    # SimpleTuner's argparse would refuse our own options: they travel in a block it ignores
    assert config[TUNER_BLOCK] == {
        "system_prompt": "You are an assistant.",
        "lora_target_preset": "attention",
        "dataloader_seed_offset": 5,
        "comfyui_lora_dir": "/comfy/models/loras/comfyui-tuner",
        "output_name": "my_lora",
    }
    assert not TUNER_ONLY_KEYS & set(config)
    # defaults stay out, except where SimpleTuner's default differs
    assert "adam_beta1" not in config and "gradient_checkpointing" not in config
    assert config["lr_scheduler"] == "cosine" and config["grad_clip_method"] == "norm"
    assert config["num_train_epochs"] == 0 and config["max_train_steps"] == 500
    assert config["resume_from_checkpoint"] == ""  # SimpleTuner's "start from scratch"
    assert config["checkpoints_total_limit"] is None
    assert all(None not in entry.values() for entry in backend)
    assert backend[2] == {
        "id": "embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "/cache/text",
    }
    json.dumps(config)
    json.dumps(backend)


def test_write_simpletuner_files_import_back(tmp_path):
    spec = _rich_spec(tmp_path)
    config_path, backend_path = write_simpletuner(spec, tmp_path / "st")
    config = json.loads(config_path.read_text())
    assert Path(config["data_backend_config"]) == backend_path
    assert Path(config["user_prompt_library"]).is_file()  # SimpleTuner only reads a library file
    assert json.loads(backend_path.read_text()) == export_simpletuner(spec)[1]
    back = import_simpletuner(config_path).spec
    assert back.validation_prompts() == spec.validation_prompts()
    assert back.model_copy(update={"validation": spec.validation}) == spec


def test_resume_with_changes_travels_in_our_block_and_resume_values_keep_simpletuners_meaning():
    spec = TrainSpec.model_validate(
        {"checkpointing": {"resume_with_changes": True, "resume_from_checkpoint": "checkpoint-500"}}
    )
    config, backend = export_simpletuner(spec)
    assert config[TUNER_BLOCK]["resume_with_changes"] is True and "resume_with_changes" not in config
    assert config["resume_from_checkpoint"] == "checkpoint-500"  # SimpleTuner's folder name, resolved at resume
    back = import_simpletuner(config, backend).spec.checkpointing
    assert back.resume_with_changes is True and back.resume_from_checkpoint == "checkpoint-500"
    assert import_simpletuner({"resume_from_checkpoint": "none"}).spec.checkpointing.resume_from_checkpoint is None


# ----------------------------------------------------------------------------- typos and refused adapters
def test_a_typo_is_an_error_that_names_the_intended_key():
    # learning_rat used to be listed as "not supported yet", and the run trained at the default rate.
    with pytest.raises(ConfigError) as err:
        import_simpletuner({"learning_rat": 1e-4, "lora_rnak": 8, "max_train_steps": 10})
    message = str(err.value)
    assert "learning_rat (did you mean learning_rate?)" in message
    assert "lora_rnak (did you mean lora_rank?)" in message
    assert UNSUPPORTED_MESSAGE not in message


def test_a_key_nobody_has_is_an_error_even_without_a_close_spelling():
    with pytest.raises(ConfigError, match=r"neither SimpleTuner nor comfyui-tuner knows:\n  totally_made_up\n"):
        import_simpletuner({"totally_made_up": 1})


def test_a_key_only_simpletuner_has_is_still_a_warning():
    result = import_simpletuner({"webhook_config": {}, "layersync_enabled": True, "validation_steps": 20})
    assert result.unsupported_keys == ["layersync_enabled", "webhook_config"]
    assert result.spec.validation.validation_step_interval == 20


def test_a_typo_inside_the_comfyui_tuner_block_is_an_error_too():
    with pytest.raises(ConfigError, match=r"output_nme \(did you mean output_name\?\)"):
        import_simpletuner({TUNER_BLOCK: {"output_nme": "x"}})


def test_a_dataset_key_typo_is_an_error_naming_the_dataset():
    backend = [_image("pics", captoin_strategy="filename", vae_cache_clear_each_epoch=True)]
    with pytest.raises(ConfigError) as err:
        import_simpletuner({"max_train_steps": 1}, backend)
    assert "dataset 'pics': captoin_strategy (did you mean caption_strategy?)" in str(err.value)
    assert "vae_cache_clear_each_epoch" not in str(err.value)  # SimpleTuner has that one: a warning


def test_a_typo_in_a_video_block_names_the_near_key():
    backend = [{"id": "clips", "dataset_type": "video", "instance_data_dir": "/v", "video": {"num_frame": 49}}]
    with pytest.raises(ConfigError) as err:
        import_simpletuner({"max_train_steps": 1}, backend)
    assert "dataset 'clips': video.num_frame: not a known option (did you mean num_frames?)" in str(err.value)


def test_every_key_we_export_outside_our_block_is_a_simpletuner_key():
    """simpletuner_keys must list what SimpleTuner reads: our own flat keys are the easy cross-check."""
    from trainer_core.simpletuner_keys import CONFIG_KEYS, DATASET_KEYS

    assert set(config_keys()) - TUNER_ONLY_KEYS <= CONFIG_KEYS
    assert set(DatasetSpec.model_fields) <= DATASET_KEYS
    # crepa_model: OPTIONS.md's name for crepa_encoder, read first by CrepaRegularizer, but no registry field
    assert set(KEY_ALIASES) - {k for k in KEY_ALIASES if k.startswith(("flux_", "flow_matching_"))} <= CONFIG_KEYS | {
        "save_total_limit",
        "crepa_model",
    }


@pytest.mark.parametrize(
    "key, value, what",
    [
        ("peft_lora_mode", "singlora", "SingLoRA"),
        ("lora_init_type", "pissa", "PiSSA"),
        ("slider_lora_target", True, "slider"),
    ],
)
def test_an_adapter_we_cannot_train_is_refused_not_trained_as_plain_lora(key, value, what):
    with pytest.raises(ConfigError) as err:
        import_simpletuner({key: value, "max_train_steps": 10})
    assert f"{key}: {json.dumps(value)} asks for" in err.value.message and what in err.value.message
    assert key in err.value.hint and "plain LoRA" in err.value.hint


def test_adapter_keys_at_simpletuners_defaults_mean_plain_lora_and_are_not_reported():
    config = {"use_dora": False, "lora_type": "standard", "peft_lora_mode": "standard", "lora_init_type": "default"}
    result = import_simpletuner({**config, "slider_lora_target": "false"})
    assert result.unsupported_keys == [] and result.spec.lora.lora_type == "standard"


def test_spec_json_typos_name_the_near_key_or_the_right_section():
    from trainer_core.spec import build_spec

    with pytest.raises(ConfigError, match=r"lora.lora_rnak: not a known option \(did you mean lora_rank\?\)"):
        build_spec({"lora": {"lora_rnak": 4}})
    with pytest.raises(ConfigError, match=r"training.learning_rate: .*belongs in the 'optimizer' section"):
        build_spec({"training": {"learning_rate": 1e-4}})


@pytest.mark.parametrize(
    ("family", "preset", "expected"),
    [
        ("kandinsky5-image", None, 10),  # the authors' attention+ffn set, not SimpleTuner's q/k/v default
        ("kandinsky5-video", None, 10),
        ("kandinsky5-image", "attention", 6),
        ("lumina2", None, 4),
    ],
)
def test_export_writes_the_family_default_lora_targets_so_simpletuner_trains_the_same_layers(family, preset, expected):
    from trainer_core.families import get_family_class

    lora = {"lora_target_preset": preset} if preset else {}
    spec = TrainSpec.model_validate({"model": {"model_family": family}, "lora": lora})
    config, backend = export_simpletuner(spec)
    targets = config["peft_lora_target_modules"]
    assert targets == get_family_class(family)(spec).lora_target_modules() and len(targets) == expected
    if family.startswith("kandinsky5") and not preset:
        assert "feed_forward.in_layer" in targets and "cross_attention.out_layer" in targets
    assert config[TUNER_BLOCK]["lora_targets_are_family_default"] is True
    assert import_simpletuner(config, backend).spec == spec  # back to "the family's default"
    # a list the user wrote stays theirs
    explicit = spec.model_copy(update={"lora": spec.lora.model_copy(update={"peft_lora_target_modules": ["to_q"]})})
    config, backend = export_simpletuner(explicit)
    assert config["peft_lora_target_modules"] == ["to_q"] and "lora_targets_are_family_default" not in config.get(
        TUNER_BLOCK, {}
    )
    assert import_simpletuner(config, backend).spec == explicit


# ------------------------------------------------------------------------- EMA keys and full fine-tunes
def test_ema_device_cpu_only_and_update_interval_import_export_and_round_trip():
    config = {
        "use_ema": True,
        "ema_decay": 0.999,
        "ema_device": "accelerator",
        "ema_cpu_only": True,
        "ema_update_interval": 10,
    }
    result = import_simpletuner(config)
    t = result.spec.training
    assert (t.use_ema, t.ema_decay, t.ema_device, t.ema_cpu_only, t.ema_update_interval) == (
        True,
        0.999,
        "accelerator",
        True,
        10,
    )
    assert result.unsupported_keys == []
    exported, _ = export_simpletuner(result.spec)
    assert {k: exported[k] for k in config} == config  # SimpleTuner's own keys, outside our block
    assert import_simpletuner(*export_simpletuner(result.spec)).spec == result.spec
    # SimpleTuner's defaults: EMA kept on the CPU, updated every step (its null interval)
    plain = import_simpletuner({"use_ema": True, "ema_update_interval": None}).spec.training
    assert (plain.ema_device, plain.ema_cpu_only, plain.ema_update_interval) == ("cpu", False, 1)
    assert not {"ema_device", "ema_cpu_only", "ema_update_interval"} & set(export_simpletuner(TrainSpec())[0])


def test_ema_options_we_do_not_have_are_warnings_not_errors():
    result = import_simpletuner({"use_ema": True, "ema_foreach_disable": True, "ema_validation": "comparison"})
    assert sorted(result.unsupported_keys) == ["ema_foreach_disable", "ema_validation"]
    with pytest.raises(ConfigError, match="ema_device"):
        import_simpletuner({"ema_device": "gpu"})


LUMINA2_FULL_QUICKSTART = {
    # SimpleTuner's Lumina 2 quick-start, full fine-tune variant: LR 1e-5 (its 1e-5 to 1e-6 range for full),
    # EMA on, clipping at 1.0 (its recommendation for full fine-tunes), adamw_bf16, auto shift
    "model_family": "lumina2",
    "model_flavour": "2.0",
    "model_type": "full",
    "learning_rate": 1e-5,
    "optimizer": "adamw_bf16",
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "max_grad_norm": 1.0,
    "grad_clip_method": "norm",
    "use_ema": True,
    "ema_decay": 0.999,
    "mixed_precision": "bf16",
    "gradient_checkpointing": True,
    "flow_schedule_auto_shift": True,
    "train_batch_size": 1,
    "max_train_steps": 3,
    "num_train_epochs": 0,
    "seed": 42,
}


def test_a_lumina2_full_quickstart_config_imports_and_round_trips():
    result = import_simpletuner({**LUMINA2_FULL_QUICKSTART, "output_dir": "out"})
    spec = result.spec
    assert result.unsupported_keys == []
    assert spec.model.model_type == "full" and spec.optimizer.learning_rate == 1e-5
    assert spec.optimizer.max_grad_norm == 1.0 and spec.optimizer.grad_clip_method == "norm"
    assert spec.training.use_ema and spec.training.ema_device == "cpu"
    config, backend = export_simpletuner(spec)
    assert config["model_type"] == "full" and config["max_grad_norm"] == 1.0 and config["use_ema"] is True
    assert import_simpletuner(config, backend).spec == spec
    # a full config that leaves clipping out gets SimpleTuner's own default (2.0, by value), as SimpleTuner would
    bare = import_simpletuner({"model_type": "full"}).spec.optimizer
    assert (bare.max_grad_norm, bare.grad_clip_method) == (2.0, "value")
