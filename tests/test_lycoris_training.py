"""Training LyCORIS adapters (LoKr, LoHa, LoCon, full) and DoRA on every family's tiny model.

What the engine must do with any adapter kind: train it (the loss falls), resume exactly, keep an
EMA of its weights, start from its own files (init_lora), write both files with the adapter's type
and settings in their metadata, and run beside quantised or offloaded bases. Refusals come before
any model loads.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from helpers.measure import train_and_measure
from safetensors import safe_open
from safetensors.torch import load_file

from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.spec import TrainSpec, build_spec
from trainer_core.train.engine import Trainer
from trainer_core.train.resolve import resolve_spec

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FAMILIES = ("lumina2", "kandinsky5-image", "kandinsky5-video")
ADAPTERS = {
    "lokr": {"lora_type": "lycoris", "lycoris": {"algo": "lokr", "factor": 4}},
    "loha": {"lora_type": "lycoris", "lycoris": {"algo": "loha"}},
    "locon": {"lora_type": "lycoris", "lycoris": {"algo": "locon"}},
    "full": {"lora_type": "lycoris", "lycoris": {"algo": "full"}},
    "dora": {"use_dora": True},
}
# LoKr starts from a zero factor and moves slowly at a LoRA's rate: it is trained at a higher one
# (SimpleTuner's LoKr examples use about ten times their LoRA rate).
LEARNING_RATE = {"lokr": 5e-2}


@pytest.fixture(scope="module")
def models(tiny_lumina2, tmp_path_factory) -> dict[str, Path]:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image, build_tiny_kandinsky5_video

    root = tmp_path_factory.mktemp("lyco-models")
    return {
        "lumina2": tiny_lumina2,
        "kandinsky5-image": build_tiny_kandinsky5_image(root / "k5i"),
        "kandinsky5-video": build_tiny_kandinsky5_video(root / "k5v"),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("lyco-data"), {"a": "a red square", "b": "a blue circle on a table"})


def spec_dict(family: str, model: Path, data: Path, out: Path, lora: dict, **sections) -> dict:
    spec = lumina_spec(
        model,
        data,
        out,
        lora={"lora_rank": 4, "lora_alpha": 4, **lora},
        training={
            "max_train_steps": 12,
            "train_batch_size": 2,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": False,
            "seed": 0,
        },
        optimizer={"optimizer": "adamw", "learning_rate": 2e-2},
        checkpointing={"checkpoint_step_interval": None},
    )
    spec["model"] = {"model_family": family, "pretrained_model_name_or_path": str(model)}
    if family == "kandinsky5-video":
        spec["model"]["model_flavour"] = "t2v-lite-sft-5s"
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return spec


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_adapter_trains_on_each_family_and_the_loss_falls(models, images, tmp_path, family, adapter):
    spec = spec_dict(family, models[family], images, tmp_path / "out", ADAPTERS[adapter])
    spec["optimizer"]["learning_rate"] = LEARNING_RATE.get(adapter, 2e-2)
    trainer, result, before, after = train_and_measure(spec)
    assert after < 0.97 * before, (before, after)
    assert trainer.adapter.kind == adapter
    for path in (result.lora.diffusers, result.lora.comfyui):  # both files say what they hold
        meta = file_metadata(path)
        assert meta["comfyui_tuner.adapter"] == adapter, path
        if adapter != "dora":
            assert json.loads(meta["comfyui_tuner.lycoris_config"])["algo"] == adapter


# ---------------------------------------------------------------------- resume, EMA, init_lora
LOKR_RESUME = dict(
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
    lora={
        "lora_type": "lycoris",
        "lora_rank": 4,
        "lycoris": {"algo": "lokr", "factor": 4, "decompose_both": True, "dropout": 0.1, "rank_dropout": 0.1},
    },
    checkpointing={"checkpoint_step_interval": 2},
)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_a_lokr_run_cancelled_and_resumed_equals_the_uninterrupted_run_ema_included(models, images, tmp_path):
    def spec(out: str) -> TrainSpec:
        return TrainSpec.model_validate(lumina_spec(models["lumina2"], images, tmp_path / out, **LOKR_RESUME))

    straight = Trainer(spec("straight")).run()
    cancel = threading.Event()

    class CancelAtStep3(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 3:
                cancel.set()

    first = Trainer(spec("split"), CancelAtStep3(), cancel=cancel).run()
    assert first.cancelled and first.steps == 3
    second = Trainer(spec("split"), ListSink()).run()
    assert second.resumed_from.name == "step-3" and second.steps == 6
    raw = load_file(str(straight.lora.diffusers))
    assert raw and all(k.startswith("lycoris_") for k in raw)  # LyCORIS's own key format
    assert_same_tensors(raw, load_file(str(second.lora.diffusers)))
    assert [h[1] for h in second.loss_history] == pytest.approx([h[1] for h in straight.loss_history], rel=1e-5)
    ema = load_file(str(straight.ema_lora.diffusers))
    assert_same_tensors(ema, load_file(str(second.ema_lora.diffusers)))
    assert ema.keys() == raw.keys()  # the EMA covers every LyCORIS weight ...
    trained = [k for k in raw if not k.endswith(".alpha")]
    assert any(not torch.equal(ema[k], raw[k]) for k in trained)  # ... and is an average, not a copy


@pytest.mark.parametrize("algo", ["lokr", "full"])  # full's files hold the difference to the base weight
@pytest.mark.parametrize("which", ["diffusers", "comfyui"])
def test_init_lora_starts_from_our_lycoris_files(models, images, tmp_path, which, algo):
    lokr = {"lora_type": "lycoris", "lycoris": {"algo": algo, "factor": 4}}
    model = models["kandinsky5-image"]
    first = Trainer(TrainSpec.model_validate(spec_dict("kandinsky5-image", model, images, tmp_path / "a", lokr))).run()
    start = getattr(first.lora, which)
    spec = spec_dict(
        "kandinsky5-image",
        models["kandinsky5-image"],
        images,
        tmp_path / "b",
        {**lokr, "init_lora": str(start)},
        training={"max_train_steps": 1},
    )
    trainer = Trainer(TrainSpec.model_validate(spec), ListSink())
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    assert_same_tensors(trainer.adapter.file_state_dict(), load_file(str(first.lora.diffusers)))


# ---------------------------------------------------------------------- memory options
@pytest.mark.parametrize("adapter", ["loha", "dora"])
@pytest.mark.parametrize(
    "memory",
    [{"base_model_precision": "int8-quanto"}, {"base_model_precision": "int8-torchao"}, {"enable_group_offload": True}],
    ids=["quanto", "torchao", "group-offload"],
)
def test_lycoris_and_dora_train_beside_quantised_and_offloaded_bases(models, images, tmp_path, memory, adapter):
    spec = spec_dict("kandinsky5-image", models["kandinsky5-image"], images, tmp_path / "out", ADAPTERS[adapter])
    spec["memory"] = memory
    trainer, _, before, after = train_and_measure(spec)
    assert after < 0.97 * before, (before, after)
    if adapter != "dora":  # bypass turns on by itself on quantised bases
        assert trainer.adapter.settings["bypass_mode"] is ("base_model_precision" in memory)


@pytest.mark.parametrize(
    "lora, memory, message",  # each of these trains something else than asked, or fails in lycoris
    [
        ({"lycoris": {"algo": "lokr", "bypass_mode": False}}, {"base_model_precision": "int8-quanto"}, "bypass_mode"),
        ({"lycoris": {"algo": "full"}}, {"base_model_precision": "int8-torchao"}, "full"),
        ({"lycoris": {"algo": "full", "dora_wd": True}}, {}, "weight decomposition"),
        ({"lycoris": {"algo": "full"}, "use_dora": True}, {}, "weight decomposition"),
        ({"lycoris": {"algo": "full", "bypass_mode": True}}, {}, "bypass_mode"),
        ({"lycoris": {"algo": "lokr", "dora_wd": True}}, {"base_model_precision": "int8-quanto"}, "PEFT DoRA"),
        ({"lycoris": {"algo": "locon", "dora_wd": True, "bypass_mode": True}}, {}, "magnitude would never train"),
    ],
)
def test_combinations_that_cannot_work_are_refused_by_name_before_any_model_loads(tmp_path, lora, memory, message):
    spec = build_spec(
        {
            "model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(tmp_path / "no-model")},
            "lora": {"lora_type": "lycoris", **lora},
            "memory": memory,
            "training": {"max_train_steps": 1},
            "datasets": [{"id": "d", "instance_data_dir": str(tmp_path)}],
        }
    )
    with pytest.raises(ConfigError, match=message):
        resolve_spec(spec, "cpu")


def test_a_preset_that_matches_nothing_names_what_it_looked_for(models, images, tmp_path):
    spec = spec_dict(
        "kandinsky5-image",
        models["kandinsky5-image"],
        images,
        tmp_path / "out",
        {"lora_type": "lycoris", "lycoris": {"algo": "lokr", "apply_preset": {"target_module": ["FluxAttention"]}}},
    )
    trainer = Trainer(TrainSpec.model_validate(spec), ListSink())
    trainer.prepare()
    trainer.fill_caches()
    with pytest.raises(ConfigError, match="FluxAttention"):
        trainer.build_model()


def test_lycoris_settings_need_lora_type_lycoris_and_the_other_way_round():
    with pytest.raises(ConfigError, match="lycoris_config"):
        build_spec({"lora": {"lora_type": "lycoris"}})
    with pytest.raises(ConfigError, match="set lora_type 'lycoris'"):
        build_spec({"lora": {"lycoris": {"algo": "lokr"}}})
    with pytest.raises(ConfigError, match="lokx"):
        build_spec({"lora": {"lora_type": "lycoris", "lycoris": {"algo": "lokx"}}})
    with pytest.raises(ConfigError, match="facto"):
        build_spec({"lora": {"lora_type": "lycoris", "lycoris": {"algo": "lokr", "facto": 4}}})


def test_a_missing_or_broken_lycoris_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"lycoris_config file .*nope\.json does not exist"):
        build_spec({"lora": {"lora_type": "lycoris", "lycoris_config": str(tmp_path / "nope.json")}})
    bad = tmp_path / "bad.json"
    bad.write_text("{algo: lokr")
    with pytest.raises(ConfigError, match=r"bad\.json is not readable JSON"):
        build_spec({"lora": {"lora_type": "lycoris", "lycoris_config": str(bad)}})
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"algo": "loha", "linear_dim": 8}))
    spec = build_spec({"lora": {"lora_type": "lycoris", "lycoris_config": str(good)}})
    assert spec.lora.lycoris.algo == "loha" and spec.lora.lycoris.linear_dim == 8


def test_validation_lycoris_strength_scales_the_adapter_and_is_restored_after():
    from trainer_core.lora.lycoris import LycorisAdapter
    from trainer_core.testing.tiny import build_kandinsky5_transformer

    transformer = build_kandinsky5_transformer().eval()
    layer = transformer.visual_transformer_blocks[0].self_attention.to_query
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base = layer(x)
    spec = build_spec({"lora": {"lora_type": "lycoris", "lycoris": {"algo": "loha"}}}).lora
    adapter = LycorisAdapter(transformer, spec, ["to_query"], quantised=False, family="kandinsky5-image")
    with torch.no_grad():
        for p in adapter.params:
            p.normal_(0, 0.3)
        full = layer(x)
        with adapter.at_strength(0.0):
            torch.testing.assert_close(layer(x), base)
        with adapter.at_strength(0.5):
            torch.testing.assert_close(layer(x), base + 0.5 * (full - base), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x), full)
    assert not torch.allclose(full, base)


@pytest.mark.parametrize("algo", ["lokr", "loha", "locon"])
def test_lycoris_weight_decomposition_trains_the_magnitude(algo):
    """dora_wd must reach the magnitude (dora_scale) through the gradient; in bypass_mode lycoris drops it (refused)."""
    from trainer_core.lora.lycoris import LycorisAdapter
    from trainer_core.testing.tiny import build_kandinsky5_transformer

    transformer = build_kandinsky5_transformer()
    layer = transformer.visual_transformer_blocks[0].self_attention.to_query
    spec = build_spec({"lora": {"lora_type": "lycoris", "lycoris": {"algo": algo, "dora_wd": True}}}).lora
    adapter = LycorisAdapter(transformer, spec, ["to_query"], quantised=False, family="kandinsky5-image")
    with torch.no_grad():
        for p in adapter.params:
            p.add_(torch.randn_like(p) * 0.1)
    layer(torch.randn(3, layer.in_features)).pow(2).mean().backward()
    scales = [p for n, p in adapter.network.named_parameters() if n.endswith("dora_scale") and "visual" in n]
    assert scales and all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales[:1])
