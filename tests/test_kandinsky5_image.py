"""Kandinsky 5 image: the authors' conventions pinned, padding-free batches, engine end to end.

Conventions: ../shared/reference/kandinsky5_conventions.md. One tiny T2I model is built per module
and one training run (two captions of different lengths per batch, lora_alpha != rank) is shared
by the learning, LoRA-format and validation tests.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from helpers.measure import train_and_measure
from helpers.recorders import TransformerRecorder
from safetensors.torch import load_file

from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.families import get_family_class
from trainer_core.families import kandinsky5 as k5
from trainer_core.families.kandinsky5 import TEMPLATES
from trainer_core.families.kandinsky5_image import Kandinsky5ImageFamily
from trainer_core.lora.adapters import add_lora, lora_config
from trainer_core.simpletuner import UNSUPPORTED_MESSAGE, import_simpletuner
from trainer_core.spec import LoraSpec, TrainSpec
from trainer_core.train.engine import Trainer

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8.0
SHORT, LONG = "a red circle", "a large red circle drawn in tunertest style on a plain background"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    return build_tiny_kandinsky5_image(tmp_path_factory.mktemp("k5"))


def family_for(model_path, **model) -> Kandinsky5ImageFamily:
    spec = TrainSpec.model_validate(
        {"model": {"model_family": "kandinsky5-image", "pretrained_model_name_or_path": str(model_path), **model}}
    )
    return get_family_class("kandinsky5_image")(spec)


@pytest.fixture(scope="module")
def fam(tiny) -> Kandinsky5ImageFamily:
    return family_for(tiny)


@pytest.fixture(scope="module")
def encoders(fam):
    return fam.load_text_encoders(CPU, torch.float32)


def k5_spec(tiny: Path, data: Path, out: Path, **overrides) -> dict:
    overrides.setdefault("model", {"model_family": "kandinsky5-image", "pretrained_model_name_or_path": str(tiny)})
    return lumina_spec(tiny, data, out, **overrides)


# ---------------------------------------------------------------------- conventions
def test_templates_and_crops_are_the_authors():
    image = TEMPLATES["image"]
    assert image.crop == 41
    assert image.format("a cat") == (
        "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, size, "
        "texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
        "<|im_start|>user\na cat<|im_end|>"
    )
    edit = TEMPLATES["image_edit"]
    assert edit.crop == 55
    assert edit.format("make it blue", n_images=1) == (
        "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) and "
        "target image (second image), create an interesting text prompt that can be used together with the "
        "source image to create the target image:<|im_end|>\n"
        "<|im_start|>user\nmake it blue<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
    )
    video = TEMPLATES["video"]
    assert video.crop == 129
    assert video.format("x") == "\n".join(
        [
            "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
            "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the "
            "objects.",
            "Describe the location of the video, main characters or objects and their action.",
            "Describe the dynamism of the video and presented actions.",
            "Name the visual style of the video: whether it is a professional footage, user generated content, "
            "some kind of animation, video game or scren content.",
            "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
            "Pay attention to the order of key actions shown in the scene.<|im_end|>",
            "<|im_start|>user\nx<|im_end|>",
        ]
    )
    assert family_for("x").template is image
    assert family_for("x", model_flavour="i2i-lite-sft").template is edit


def test_flavours_defaults_and_alignment():
    cls = get_family_class("kandinsky5-image")
    assert cls is Kandinsky5ImageFamily and cls.default_flavour == "t2i-lite-sft"
    assert {n: f.repo_id for n, f in cls.flavours.items()} == {
        "t2i-lite-sft": "kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers",
        "t2i-lite-pretrain": "kandinskylab/Kandinsky-5.0-T2I-Lite-pretrain-Diffusers",
        "i2i-lite-sft": "kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers",
        "i2i-lite-pretrain": "kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain-Diffusers",
    }
    d = cls.defaults
    assert (d.learning_rate, d.resolution, d.resolution_type) == (1e-4, 1024, "pixel_area")
    assert (d.validation_guidance, d.validation_resolution, d.validation_negative_prompt) == (5.0, "1024x1024", "")
    assert (d.train_shift, d.auto_shift, d.tokenizer_max_length) == (1.0, False, 256)
    assert cls.bucket_alignment == 16  # 2x2 patches on an 8x VAE
    assert family_for("x").sampling_shift == 3.0 and family_for("x").scale_factor == (1.0, 1.0, 1.0)


def test_text_cache_identity_changes_with_template_crop_and_max_length(tiny, monkeypatch):
    base = family_for(tiny).text_cache_identity()
    assert base == family_for(tiny).text_cache_identity()
    assert family_for(tiny, tokenizer_max_length=128).text_cache_identity() != base
    assert family_for(tiny, model_flavour="i2i-lite-sft").text_cache_identity() != base
    monkeypatch.setitem(TEMPLATES, "image", dataclasses.replace(TEMPLATES["image"], crop=40))
    assert family_for(tiny).text_cache_identity() != base
    monkeypatch.setitem(TEMPLATES, "image", dataclasses.replace(TEMPLATES["image"], text="{}"))
    assert family_for(tiny).text_cache_identity() != base


def test_text_is_qwen_last_layer_after_the_crop_and_clip_pooled(tiny, fam, encoders):
    """Same numbers as diffusers' own encoder when it is given the authors' template and crop."""
    from diffusers import Kandinsky5T2IPipeline
    from transformers import Qwen2Tokenizer

    pipe = Kandinsky5T2IPipeline.from_pretrained(tiny, tokenizer=None)  # real repos: Qwen2VLProcessor
    pipe.tokenizer = Qwen2Tokenizer.from_pretrained(tiny, subfolder="tokenizer")
    pipe.prompt_template, pipe.prompt_template_encode_start_idx = TEMPLATES["image"].text, 41
    ref_qwen, cu = pipe._encode_prompt_qwen([SHORT], device=CPU, max_sequence_length=256)
    ref_clip = pipe._encode_prompt_clip([SHORT], device=CPU)

    alone, in_batch, _ = fam.encode_text(encoders, [SHORT, SHORT, LONG])
    assert encoders.qwen.model.visual is None  # text-only: the vision tower is dropped, with the same numbers
    assert alone.tensors["prompt_embeds"].shape[0] == int(cu[-1])
    torch.testing.assert_close(alone.tensors["prompt_embeds"], ref_qwen[0])
    torch.testing.assert_close(alone.tensors["pooled_prompt_embeds"], ref_clip[0])
    # right padding in a batch leaves a caption's embeddings untouched
    (single,) = fam.encode_text(encoders, [SHORT])
    torch.testing.assert_close(single.tensors["prompt_embeds"], alone.tensors["prompt_embeds"])


def test_long_captions_are_cut_at_max_length_plus_crop_and_reported(tiny, encoders):
    fam = family_for(tiny, tokenizer_max_length=160)
    short, long = fam.encode_text(encoders, ["x", "word " * 80])
    assert not short.truncated and long.truncated
    assert long.tensors["prompt_embeds"].shape[0] == 160


def test_latents_are_scaled_without_shift_and_channels_last(fam):
    vae = fam.load_vae(CPU, torch.float32)
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    first, _ = fam.encode_pixels(vae, pixels)
    dist = vae.encode(pixels).latent_dist
    assert vae.config.shift_factor == pytest.approx(0.1159)  # there, but the authors never use it
    assert first["mean"].shape == (1, 8, 6, 16)  # (F, H/8, W/8, C)
    torch.testing.assert_close(first["mean"], (dist.mean[0] * 0.3611).permute(1, 2, 0)[None])
    torch.testing.assert_close(first["std"], (dist.std[0] * 0.3611).permute(1, 2, 0)[None])
    assert fam.image_seq_len(torch.zeros(2, 1, 8, 6, 16)) == 4 * 3


Recorder = TransformerRecorder


def _text(lengths: list[int], dim: int = 32) -> dict[str, torch.Tensor]:
    fam = family_for("x")
    return fam.collate_text(
        [{"prompt_embeds": torch.randn(n, dim), "pooled_prompt_embeds": torch.randn(dim)} for n in lengths]
    )


def test_transformer_gets_1000_sigma_in_fp32_rope_positions_and_target_is_noise_minus_x0():
    fam = family_for("x")
    rec = Recorder()
    fam.predict(rec, torch.zeros(1, 1, 8, 6, 16), torch.tensor([0.25]), _text([5]))
    (call,) = rec.calls
    assert call["timestep"].dtype == torch.float32 and call["timestep"].item() == pytest.approx(250.0)
    assert [p.tolist() for p in call["visual_rope_pos"]] == [[0], [0, 1, 2, 3], [0, 1, 2]]
    assert call["text_rope_pos"].tolist() == [0, 1, 2, 3, 4]
    assert tuple(call["scale_factor"]) == (1.0, 1.0, 1.0)
    x0, noise = torch.ones(2), torch.full((2,), 3.0)
    assert torch.equal(fam.target(x0, noise), noise - x0)


def test_visual_cond_checkpoints_get_33_channels_with_zero_condition_and_mask():
    fam = family_for("x")
    rec = Recorder(visual_cond=True)
    noisy = torch.randn(1, 1, 4, 4, 16)
    fam.predict(rec, noisy, torch.tensor([0.5]), _text([3]))
    x = rec.calls[0]["hidden_states"]
    assert x.shape[-1] == 33
    assert torch.equal(x[..., :16], noisy) and not x[..., 16:].any()
    ref = torch.randn_like(noisy)
    x = fam.model_input(rec, noisy, ref)
    assert torch.equal(x[..., 16:32], ref) and torch.equal(x[..., 32], torch.ones(1, 1, 4, 4))


def test_a_real_visual_cond_transformer_runs_with_the_zero_condition():
    from diffusers import Kandinsky5Transformer3DModel

    tr = Kandinsky5Transformer3DModel(
        in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=32, time_dim=32, model_dim=48,
        ff_dim=96, num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 8, 8), visual_cond=True,
    )  # fmt: skip
    with torch.no_grad():
        out = family_for("x").predict(tr, torch.randn(2, 1, 4, 4, 16), torch.tensor([0.2, 0.9]), _text([3, 5]))
    assert out.shape == (2, 1, 4, 4, 16)


def test_padded_batch_gives_the_same_prediction_and_loss_as_its_items_one_at_a_time(fam, encoders):
    encs = fam.encode_text(encoders, [SHORT, LONG, SHORT])
    assert len({e.tensors["prompt_embeds"].shape[0] for e in encs}) == 2
    tr = fam.load_transformer(CPU, torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 8, 8, 16, generator=g), torch.randn(3, 1, 8, 8, 16, generator=g)
    sigma = torch.tensor([0.3, 0.7, 0.5])
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    target = fam.target(x0, noise)
    batch = fam.collate_text([e.tensors for e in encs])
    with torch.no_grad():
        batched = fam.predict(tr, noisy, sigma, batch)
        singles = torch.cat(
            [fam.predict(tr, noisy[i : i + 1], sigma[i : i + 1], fam.collate_text([encs[i].tensors])) for i in range(3)]
        )
        # what a plain padded forward would give: the short captions attend their padding
        n = batch["prompt_embeds"].shape[1]
        naive = tr(
            hidden_states=noisy,
            encoder_hidden_states=batch["prompt_embeds"],
            pooled_projections=batch["pooled_prompt_embeds"],
            timestep=sigma * 1000,
            visual_rope_pos=fam.visual_rope_pos(tr, noisy),
            text_rope_pos=torch.arange(n),
            return_dict=False,
        )
    torch.testing.assert_close(batched, singles, atol=1e-6, rtol=1e-5)
    loss_batched = torch.mean((batched - target) ** 2)
    loss_singles = torch.mean((singles - target) ** 2)
    assert loss_batched.item() == pytest.approx(loss_singles.item(), rel=1e-5)
    assert (naive[0] - singles[0]).abs().max() > 1e-3  # so the test above is not vacuous
    torch.testing.assert_close(naive[1], singles[1], atol=1e-6, rtol=1e-5)  # the longest has no padding


AUTHORS_LORA_TARGETS = [  # kandinsky-5-lora-train configs/trainer/lora_image.yaml (and lora_video.yaml)
    "self_attention.to_query",
    "self_attention.to_key",
    "self_attention.to_value",
    "self_attention.out_layer",
    "cross_attention.to_query",
    "cross_attention.to_key",
    "cross_attention.to_value",
    "cross_attention.out_layer",
    "feed_forward.in_layer",
    "feed_forward.out_layer",
]


def test_default_lora_targets_are_the_authors_attention_and_ffn_set_for_image_and_video():
    """Not SimpleTuner's q/k/v-only default, which its issue #2204 reports training K5 poorly."""
    image = family_for("x")
    video = get_family_class("kandinsky5-video")(
        TrainSpec.model_validate({"model": {"model_family": "kandinsky5-video"}})
    )
    assert image.lora_target_modules() == AUTHORS_LORA_TARGETS == video.lora_target_modules()
    assert family_for("x", model_flavour="i2i-lite-sft").lora_target_modules() == AUTHORS_LORA_TARGETS
    assert "lora_image.yaml" in sys.modules[Kandinsky5ImageFamily.__module__].__doc__  # the evidence is stated
    qkv = TrainSpec.model_validate(
        {"model": {"model_family": "kandinsky5-image"}, "lora": {"lora_target_preset": "attention"}}
    )
    assert Kandinsky5ImageFamily(qkv).lora_target_modules() == [t for t in AUTHORS_LORA_TARGETS if "to_" in t]


@pytest.mark.parametrize(("preset", "count"), [("attention", 1 * 3 + 2 * 6), ("attention+ffn", 1 * 6 + 2 * 10)])
def test_lora_presets_target_attention_and_ffn_only(fam, preset, count):
    from peft.tuners.lora import LoraLayer

    tr = fam.load_transformer(CPU, torch.float32)
    add_lora(tr, lora_config(LoraSpec(lora_rank=2), Kandinsky5ImageFamily.lora_presets[preset]))
    wrapped = [n for n, m in tr.named_modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == count  # 1 text block (self-attn, ffn), 2 visual blocks (self, cross, ffn)
    allowed = ("self_attention.", "cross_attention.", "feed_forward.")
    assert all(n.split(".", 2)[2].startswith(allowed) for n in wrapped), wrapped
    assert not any("modulation" in n or n in ("out_layer.out_layer", "time_embeddings.out_layer") for n in wrapped)


# ---------------------------------------------------------------------- i2i
def test_i2i_without_reference_pairs_is_refused_before_any_model_loads(tiny, tmp_path, monkeypatch):
    for name in ("load_text_encoders", "load_vae", "load_transformer"):
        monkeypatch.setattr(Kandinsky5ImageFamily, name, lambda *a, **k: pytest.fail("a model was loaded"))
    data = write_dataset(tmp_path / "data", {"img": SHORT})
    model = {"model_family": "kandinsky5-image", "pretrained_model_name_or_path": str(tiny)}
    spec = TrainSpec.model_validate(
        k5_spec(tiny, data, tmp_path / "out", model={**model, "model_flavour": "i2i-lite-sft"})
    )
    with pytest.raises(ConfigError, match="have no conditioning_data") as err:
        Trainer(spec).run()
    assert "dataset_type 'conditioning'" in str(err.value)


def test_a_t2i_flavour_refuses_an_i2i_checkpoint():
    fam = family_for("x")
    with pytest.raises(ConfigError, match="i2i"):
        fam._check_transformer(Recorder(visual_cond=True))


# ---------------------------------------------------------------------- engine end to end
@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One run: two images whose captions differ in length, batch 2, rank 4 / alpha 8, validation on."""
    root = tmp_path_factory.mktemp("run")
    data = write_dataset(root / "data", {"a": SHORT, "b": LONG})
    spec = TrainSpec.model_validate(
        k5_spec(
            tiny,
            data,
            root / "out",
            training={
                "max_train_steps": 40,
                "train_batch_size": 2,
                "mixed_precision": "no",
                "base_model_default_dtype": "fp32",
                "gradient_checkpointing": False,
                "seed": 0,
            },
            optimizer={"optimizer": "adamw", "learning_rate": 1e-2},
            lora={"lora_rank": RANK, "lora_alpha": ALPHA, "lora_target_preset": "attention+ffn"},
            checkpointing={"checkpoint_step_interval": None},
            validation={
                "validation_disable": False,
                "validation_prompt": SHORT,
                "validation_resolution": "64x64,48x32",
                "validation_num_inference_steps": 2,
                "validation_disable_unconditional": True,
            },
        )
    )
    return train_and_measure(spec, draws=8)


def test_training_lowers_the_loss_clearly(trained):
    trainer, result, before, after = trained
    assert trainer.spec.training.flow_schedule_shift == 1.0 and not trainer.spec.training.flow_schedule_auto_shift
    assert trainer.batches.build([0, 1], torch.Generator()).text["prompt_lengths"].unique().numel() == 2
    assert after < 0.85 * before, (before, after)
    assert result.steps == 40 and len(result.loss_history) == 40


def test_validation_renders_the_requested_sizes(trained):
    from PIL import Image

    trainer, result, _, _ = trained
    assert trainer._val_scheduler.config.shift == 3.0  # the authors' sampling shift
    sizes = sorted({Image.open(f).size for f in result.validation_files})
    assert sizes == [(48, 32), (64, 64)]
    assert len(result.validation_files) == 2 * 2  # steps 0 and 40, two sizes each


def _inputs(fam) -> dict:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1, 8, 8, 16, generator=g)
    return {
        "hidden_states": x,
        "encoder_hidden_states": torch.randn(1, 9, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([400.0]),
        "visual_rope_pos": [torch.arange(1), torch.arange(4), torch.arange(4)],
        "text_rope_pos": torch.arange(9),
        "return_dict": False,
    }


def test_diffusers_file_loads_into_a_plain_pipeline_and_reproduces_the_trained_transformer(tiny, trained):
    from diffusers import Kandinsky5T2IPipeline
    from transformers import Qwen2Tokenizer

    trainer, result, _, _ = trained
    pipe = Kandinsky5T2IPipeline.from_pretrained(tiny, tokenizer=None)
    pipe.tokenizer = Qwen2Tokenizer.from_pretrained(tiny, subfolder="tokenizer")
    inputs = _inputs(trainer.family)
    with torch.no_grad():
        base = pipe.transformer(**inputs)
        pipe.load_lora_weights(result.lora.diffusers.parent)
        (cfg,) = pipe.transformer.peft_config.values()
        assert (cfg.r, cfg.lora_alpha) == (RANK, ALPHA)
        loaded, trained_out = pipe.transformer(**inputs), trainer.transformer(**inputs)
    assert (loaded - trained_out).abs().max() < 1e-5
    assert (trained_out - base).abs().max() > 1e-2


def test_comfyui_file_merged_by_comfyuis_rule_equals_diffusers_fused_weights(trained):
    trainer, result, _, _ = trained
    comfy = load_file(str(result.lora.comfyui))
    prefixes = {k.removesuffix(".lora_A.weight") for k in comfy if k.endswith(".lora_A.weight")}
    assert len(prefixes) == 1 * 6 + 2 * 10
    assert all(p.startswith("diffusion_model.") for p in prefixes)
    assert "diffusion_model.visual_transformer_blocks.0.cross_attention.to_key" in prefixes
    assert set(comfy) == {p + s for p in prefixes for s in (".lora_A.weight", ".lora_B.weight", ".alpha")}

    tr = trainer.transformer
    base = {k.replace(".base_layer.", "."): v.clone() for k, v in tr.state_dict().items() if "lora_" not in k}
    fused = copy.deepcopy(tr)
    fused.fuse_lora()
    fused.unload_lora()
    expected = fused.state_dict()
    for prefix in prefixes:
        a, b, alpha = comfy[prefix + ".lora_A.weight"], comfy[prefix + ".lora_B.weight"], comfy[prefix + ".alpha"]
        assert alpha.item() == ALPHA and a.shape[0] == RANK
        key = prefix.removeprefix("diffusion_model.") + ".weight"
        merged = base[key] + alpha.item() / a.shape[0] * (b @ a)
        torch.testing.assert_close(merged, expected[key], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- SimpleTuner config
def test_a_simpletuner_kandinsky5_image_config_imports_and_trains(tiny, tmp_path):
    data = write_dataset(tmp_path / "data", {"a": SHORT, "b": LONG})
    config = {
        "model_family": "kandinsky5-image",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(tiny),
        "output_dir": str(tmp_path / "out"),
        "base_model_precision": "no_change",
        "vae_cache_ondemand": True,
        "flow_schedule_shift": 3,
        "grad_clip_method": "value",
        "gradient_checkpointing": True,
        "lora_type": "standard",
        "lora_rank": 4,
        "lora_alpha": 4,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "optimizer": "adamw_bf16",
        "max_train_steps": 2,
        "num_train_epochs": 0,
        "train_batch_size": 2,
        "mixed_precision": "bf16",
        "report_to": "none",
        "push_to_hub": False,
        "seed": 42,
        "resolution": 64,
        "resolution_type": "pixel_area",
        "validation_steps": 2,
        "validation_guidance": 5.0,
        "validation_resolution": "32x32",
        "validation_num_inference_steps": 2,
        "validation_prompt": "a circle",
        "validation_negative_prompt": "ugly, cropped, blurry, low-quality, mediocre average",
        "validation_disable_unconditional": True,
        "disable_benchmark": True,
    }
    backend = [
        {"id": "k5", "type": "local", "dataset_type": "image", "instance_data_dir": str(data),
         "caption_strategy": "textfile", "crop": True, "crop_aspect": "square"},
        {"id": "te", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "text")},
    ]  # fmt: skip
    result = import_simpletuner(config, backend)
    # push_to_hub (publishing), base_model_precision and vae_cache_ondemand (memory) are all supported
    assert result.unsupported_keys == []
    assert not [w for w in result.warnings if w.startswith(UNSUPPORTED_MESSAGE)]
    spec = result.spec
    assert spec.model.model_family == "kandinsky5-image" and spec.training.flow_schedule_shift == 3.0
    assert spec.validation.validation_step_interval == 2 and spec.optimizer.grad_clip_method == "value"
    assert spec.memory.vae_cache_ondemand  # the example's latents are encoded as training draws them
    sink = ListSink()
    run = Trainer(spec, sink).run()
    assert run.steps == 2 and all(torch.isfinite(torch.tensor(h[1])) for h in run.loss_history)
    assert [v["step"] for v in sink.of("validation")] == [2]
    assert run.lora.diffusers.is_file() and run.lora.comfyui.is_file()


def test_module_docstring_states_the_padding_decision():
    assert "never pad" in (k5.__doc__ or "")
