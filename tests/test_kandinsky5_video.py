"""Kandinsky 5 video: frame rules, the I2V training input, patch convolution, engine end to end.

Conventions: ../shared/reference/kandinsky5_conventions.md §5-6. One tiny T2V model and one tiny
I2V model (both ``visual_cond``, as every published K5 video checkpoint) are built per module; clips
are encoded with PyAV into tmp_path by the tests. One T2V run (two clips and one image, lora_alpha
!= rank, validation on) is shared by the learning, LoRA-format and video-output tests.
"""

from __future__ import annotations

import copy
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from helpers.datasets import write_moving_square_clip
from helpers.recorders import TransformerRecorder
from PIL import Image
from safetensors.torch import load_file

from trainer_core.data import discover, first_frame
from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.families import get_family_class
from trainer_core.families.kandinsky5 import TEMPLATES
from trainer_core.families.kandinsky5_video import (
    NEGATIVE_VIDEO,
    Kandinsky5VideoFamily,
    diffusers_scale_factor,
    fp32_timesteps,
)
from trainer_core.memory.patch_conv import disable_patch_conv, enable_patch_conv, patch_conv_enabled
from trainer_core.simpletuner import UNSUPPORTED_MESSAGE, import_simpletuner
from trainer_core.spec import TrainSpec
from trainer_core.train.engine import Trainer
from trainer_core.train.flow import auto_shift, flow_loss, resolve_shift, sample_sigmas
from trainer_core.train.resolve import resolve_spec

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8.0
SIZE = (48, 32)  # (width, height): 6x4 latents, 3x2 patches
BALL, RED = "a white ball rolls to the right", "a red square in tunertest style"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_video

    return build_tiny_kandinsky5_video(tmp_path_factory.mktemp("k5v"))


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_video

    return build_tiny_kandinsky5_video(tmp_path_factory.mktemp("k5v-i2v"), seed=1, i2v=True)


# ---------------------------------------------------------------------- data written by the tests
def write_clip(path: Path, frames: int, seed: int, size: tuple[int, int] = SIZE, fps: int = 24) -> Path:
    """A square moving right over a coloured background, encoded (near-)losslessly with PyAV."""
    return write_moving_square_clip(path, frames, seed, size, fps)


def write_clips(folder: Path, captions: dict[str, str], frames: int = 17) -> Path:
    for i, (name, caption) in enumerate(sorted(captions.items())):
        write_clip(folder / f"{name}.mp4", frames, seed=i)
        (folder / f"{name}.txt").write_text(caption + "\n")
    return folder


def write_image(folder: Path, name: str, caption: str, colour=(220, 30, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", SIZE, colour).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(caption + "\n")
    return folder


def video_spec(model: Path, out: Path, datasets: list[dict], flavour: str = "t2v-lite-sft-5s", **sections) -> dict:
    """A small, fast K5 video spec (fp32 on CPU, no validation unless asked) as a plain dict."""
    spec = {
        "output_dir": str(out),
        "model": {
            "model_family": "kandinsky5-video",
            "model_flavour": flavour,
            "pretrained_model_name_or_path": str(model),
        },
        "lora": {"lora_rank": RANK, "lora_alpha": ALPHA},
        "optimizer": {"optimizer": "adamw", "learning_rate": 1e-2},
        "training": {
            "max_train_steps": 4,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": False,
            "seed": 0,
        },
        "checkpointing": {"checkpoint_step_interval": None},
        "validation": {"validation_disable": True},
        "datasets": [
            *datasets,
            {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(out / "text-cache")},
        ],
    }  # fmt: skip
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return spec


def clips(folder: Path, id: str = "clips", **video) -> dict:
    return {
        "id": id,
        "dataset_type": "video",
        "instance_data_dir": str(folder),
        "resolution": 32,
        "resolution_type": "pixel",
        "video": video or {"num_frames": 17},
    }


def family_for(model: str | Path = "x", flavour: str | None = None, **validation) -> Kandinsky5VideoFamily:
    spec = TrainSpec.model_validate(
        {
            "model": {
                "model_family": "kandinsky5-video",
                "model_flavour": flavour,
                "pretrained_model_name_or_path": str(model),
            },
            "validation": validation,
        }
    )  # fmt: skip
    return get_family_class("kandinsky5_video")(spec)


def resolved(model: Path, tmp_path: Path, datasets: list[dict], flavour: str = "t2v-lite-sft-5s", **validation):
    raw = TrainSpec.model_validate(video_spec(model, tmp_path / "out", datasets, flavour, validation=validation))
    return resolve_spec(raw)


# ---------------------------------------------------------------------- flavours, defaults, spec checks
def test_flavours_repo_ids_and_defaults():
    cls = get_family_class("kandinsky5_video")
    assert cls is Kandinsky5VideoFamily and cls.supports_video and cls.default_flavour == "t2v-lite-sft-5s"
    repos = {n: f.repo_id.removeprefix("kandinskylab/Kandinsky-5.0-") for n, f in cls.flavours.items()}
    assert repos == {
        "t2v-lite-sft-5s": "T2V-Lite-sft-5s-Diffusers",
        "t2v-lite-pretrain-5s": "T2V-Lite-pretrain-5s-Diffusers",
        "t2v-lite-sft-10s": "T2V-Lite-sft-10s-Diffusers",
        "t2v-lite-pretrain-10s": "T2V-Lite-pretrain-10s-Diffusers",
        "t2v-pro-sft-5s-hd": "T2V-Pro-sft-5s-Diffusers",
        "t2v-pro-sft-10s-hd": "T2V-Pro-sft-10s-Diffusers",
        "t2v-pro-pretrain-5s-hd": "T2V-Pro-pretrain-5s-Diffusers",
        "t2v-pro-pretrain-10s-hd": "T2V-Pro-pretrain-10s-Diffusers",
        "i2v-lite-5s": "I2V-Lite-5s-Diffusers",
        "i2v-pro-sft-5s": "I2V-Pro-sft-5s-Diffusers",
    }
    d = cls.defaults
    assert (d.learning_rate, d.resolution, d.resolution_type, d.train_shift, d.auto_shift) == (
        1e-4, 512, "pixel_area", 5.0, False,
    )  # fmt: skip
    assert (d.validation_guidance, d.validation_resolution, d.tokenizer_max_length) == (5.0, "768x512", 256)
    assert d.validation_negative_prompt == NEGATIVE_VIDEO and cls.default_lora_preset == "attention+ffn"
    lite, pro_hd, pro_i2v = family_for(), family_for(flavour="t2v-pro-sft-5s-hd"), family_for(flavour="i2v-pro-sft-5s")
    assert lite.scale_factor == (1.0, 2.0, 2.0) and pro_hd.scale_factor == (1.0, 3.16, 3.16)
    assert pro_i2v.scale_factor == (1.0, 2.0, 2.0)  # the authors' SD config for these weights
    assert {f.sampling_shift for f in (lite, pro_hd, pro_i2v)} == {10.0}
    assert lite.template is TEMPLATES["video"] and lite.template.crop == 129 and "scren content" in lite.template.text
    assert not lite.is_i2v and pro_i2v.is_i2v
    assert [lite.frame_rule(n) for n in (1, 4, 5, 20, 61, 64)] == [1, 1, 5, 17, 61, 61]
    assert [pro_i2v.frame_rule(n) for n in (1, 4, 5, 20)] == [0, 0, 5, 17]  # I2V needs a frame after the condition
    assert (lite.validation_frames, lite.framerate) == (61, 24.0)
    assert diffusers_scale_factor(768, 512) == (1, 2, 2) and diffusers_scale_factor(1024, 512) == (1, 3.16, 3.16)


def test_frame_counts_must_be_4k_plus_1_and_the_error_names_the_nearest_valid_values(tmp_path):
    data = str(tmp_path / "clips")
    with pytest.raises(ConfigError) as err:
        resolved(tmp_path, tmp_path, [clips(data, num_frames=60), clips(data, "b", num_frames=33)],
                 validation_num_video_frames=30)  # fmt: skip
    message = str(err.value)
    assert "dataset 'clips': video.num_frames 60 is not 4k+1" in message and "nearest valid: 57 or 61" in message
    assert "'b'" not in message  # 33 is fine
    assert "validation_num_video_frames 30 is not 4k+1; nearest valid: 29 or 33" in message
    for n in (1, 5, 9, 13):
        with pytest.raises(ConfigError, match=f"validation_num_video_frames {n} is below 17.*NaN"):
            resolved(tmp_path, tmp_path, [clips(data)], validation_num_video_frames=n)
    with pytest.raises(ConfigError, match="nearest valid: 17"):
        resolved(tmp_path, tmp_path, [clips(data)], validation_num_video_frames=7)
    spec, fam, _ = resolved(tmp_path, tmp_path, [clips(data, num_frames=61)], validation_num_video_frames=17)
    assert fam.validation_frames == 17 and spec.optimizer.learning_rate == 1e-2
    assert spec.training.flow_schedule_shift == 5.0 and spec.validation.validation_negative_prompt == NEGATIVE_VIDEO


def test_auto_shift_is_refused_for_video_and_512x768x61_trains_at_shift_5_median_noise_0_83(tmp_path):
    """The image rule over every frame's tokens would train on almost pure noise; the authors use a static 5."""
    data = [clips(str(tmp_path / "clips"), num_frames=61)]
    auto = TrainSpec.model_validate(
        video_spec(tmp_path, tmp_path / "out", data, training={"flow_schedule_auto_shift": True})
    )
    with pytest.raises(ConfigError) as err:
        resolve_spec(auto)
    assert "flow_schedule_auto_shift is not supported for Kandinsky 5 video" in str(err.value)
    assert "default static shift 5" in err.value.hint and "flow_schedule_shift" in err.value.hint

    spec, fam, _ = resolved(tmp_path, tmp_path, data)
    x0 = torch.zeros(1, 16, 64, 96, 16)  # 512x768 px, 61 frames: 16 latent frames of 64x96, channels-last
    tokens = fam.image_seq_len(x0)
    assert tokens == 16 * 32 * 48 == 24_576
    shift = resolve_shift(spec.training, fam.defaults.train_shift, tokens)
    median = sample_sigmas(10_000, torch.Generator().manual_seed(0), shift=shift).median().item()
    assert shift == 5.0 and median == pytest.approx(5 / 6, abs=0.01)  # 0.833: the authors' video scheduler_scale
    # what the image rule gave before issue 14 (and gives in SimpleTuner): shift ~101, median noise 0.99
    assert auto_shift(tokens) == pytest.approx(101.2, abs=0.1)
    assert sample_sigmas(10_000, torch.Generator().manual_seed(0), shift=auto_shift(tokens)).median() > 0.985


def test_i2v_refuses_image_datasets_and_clips_without_frames_after_the_first(tmp_path):
    image = {"id": "stills", "instance_data_dir": str(tmp_path)}
    with pytest.raises(ConfigError) as err:
        resolved(tmp_path, tmp_path, [clips(str(tmp_path), num_frames=1), image], flavour="i2v-lite-5s")
    assert "video.num_frames 1 leaves I2V nothing to predict" in str(err.value)
    assert "'stills' is an image dataset" in str(err.value)
    _, fam, _ = resolved(tmp_path, tmp_path, [clips(str(tmp_path)), image])  # T2V trains on images as 1-frame clips
    assert not fam.is_i2v
    with pytest.raises(ConfigError, match="eval_dataset_id 'nope'"):
        resolved(tmp_path, tmp_path, [clips(str(tmp_path))], flavour="i2v-lite-5s",
                 validation_using_datasets=True, eval_dataset_id="nope")  # fmt: skip


def test_rope_scale_differences_with_diffusers_are_warned_and_nabla_sizes_checked(tmp_path):
    data = str(tmp_path)
    sd = {**clips(data), "resolution": 512, "resolution_type": "pixel_area"}
    assert resolved(tmp_path, tmp_path, [sd])[2] == []  # the authors' SD size: diffusers agrees
    big = {**clips(data), "resolution": 1024, "resolution_type": "pixel_area"}
    (warning,) = resolved(tmp_path, tmp_path, [big])[2]
    assert "dataset 'clips' (about 1024x1024 px)" in warning and "picks (1.0, 3.16, 3.16)" in warning
    warnings = resolved(tmp_path, tmp_path, [sd], flavour="t2v-pro-sft-5s-hd", validation_resolution="768x512")[2]
    assert len(warnings) == 2 and all("diffusers' pipeline picks (1.0, 2.0, 2.0)" in w for w in warnings)
    with pytest.raises(ConfigError, match="NABLA sparse attention .* multiples of 128"):
        resolved(tmp_path, tmp_path, [clips(data)], flavour="t2v-lite-sft-10s", validation_resolution="720x480")


# ---------------------------------------------------------------------- latents
def test_latents_are_scaled_without_shift_channels_last_and_images_are_one_frame(tiny):
    fam = family_for(tiny)
    vae = fam.load_vae(CPU, torch.float32)
    clip = torch.rand(2, 17, 3, 32, 48) * 2 - 1  # (B, F, 3, H, W), as the latent cache stacks load_pixels
    first, _ = fam.encode_pixels(vae, clip)
    dist = vae.encode(clip.permute(0, 2, 1, 3, 4)).latent_dist
    assert vae.config.scaling_factor == pytest.approx(0.476986) and "first_mean" not in first
    assert first["mean"].shape == (5, 4, 6, 16)  # ((17-1)/4+1, H/8, W/8, C)
    torch.testing.assert_close(first["mean"], (dist.mean[0] * 0.476986).permute(1, 2, 3, 0))
    torch.testing.assert_close(first["std"], (dist.std[0] * 0.476986).permute(1, 2, 3, 0))
    (image,) = fam.encode_pixels(vae, clip[:1, 0])  # (B, 3, H, W): an image dataset sample
    assert image["mean"].shape == (1, 4, 6, 16)
    with pytest.raises(ValueError, match="4k\\+1"):
        fam.encode_pixels(vae, clip[:, :16])


def test_i2v_caches_frame_0_encoded_alone_and_draws_it_into_latent_frame_0(tiny):
    fam = family_for(tiny, "i2v-lite-5s")
    assert fam.latent_cache_identity() != family_for(tiny).latent_cache_identity()
    vae = fam.load_vae(CPU, torch.float32)
    clip = torch.rand(1, 17, 3, 32, 48) * 2 - 1
    (entry,) = fam.encode_pixels(vae, clip)
    alone = vae.encode(clip[:, :1].permute(0, 2, 1, 3, 4)).latent_dist.mean * 0.476986
    torch.testing.assert_close(entry["first_mean"], alone[0].permute(1, 2, 3, 0))
    assert (entry["first_mean"] - entry["mean"][:1]).abs().max() > 1e-3  # GroupNorm sees the whole clip
    exact = {k: v if "mean" in k else torch.zeros_like(v) for k, v in entry.items()}
    x0 = fam.sample_latents([exact], torch.Generator().manual_seed(0))
    assert torch.equal(x0[0, :1], entry["first_mean"]) and torch.equal(x0[0, 1:], entry["mean"][1:])


def test_vae_memory_options_are_applied_on_load(tiny):
    fam = family_for(tiny)
    fam.spec.memory.vae_enable_tiling = fam.spec.memory.vae_enable_slicing = True
    fam.spec.memory.vae_enable_patch_conv = True
    vae = fam.load_vae(CPU, torch.float32)
    assert vae.use_tiling and vae.use_slicing and patch_conv_enabled(vae)
    assert not patch_conv_enabled(family_for(tiny).load_vae(CPU, torch.float32))


# ---------------------------------------------------------------------- patch convolution
def _peak_bytes(fn) -> int:
    """Peak CPU memory held by torch tensors (and kernel workspaces) while ``fn`` runs, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return peak


def _largest_conv_input(vae: torch.nn.Module, fn) -> int:
    sizes = [0]
    hooks = [
        m.register_forward_pre_hook(lambda _, args: sizes.append(args[0].numel()))
        for m in vae.modules()
        if isinstance(m, torch.nn.Conv3d)
    ]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return max(sizes)


def test_patch_conv_equals_the_plain_vae_and_holds_less_memory(monkeypatch):
    from trainer_core.memory import patch_conv
    from trainer_core.testing.tiny import make_hunyuan_video_vae

    slabs: list[int] = []
    real_conv3d = patch_conv._conv3d
    monkeypatch.setattr(patch_conv, "_conv3d", lambda conv, x: slabs.append(x.numel()) or real_conv3d(conv, x))
    torch.manual_seed(0)
    vae = make_hunyuan_video_vae()
    clip = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    z = torch.randn(1, 16, 5, 8, 8)
    close = {"atol": 5e-5, "rtol": 1e-4}  # summation order only: oneDNN on slabs, PyTorch's pick on wholes
    with torch.no_grad():
        encode = lambda: vae.encode(clip).latent_dist.mean  # noqa: E731
        decode = lambda: vae.decode(z).sample  # noqa: E731
        plain_enc, plain_dec = encode(), decode()
        plain_peak, plain_conv = _peak_bytes(encode), _largest_conv_input(vae, encode)
        assert enable_patch_conv(vae, budget_bytes=64 * 1024) == 42  # every causal conv, encoder and decoder
        torch.testing.assert_close(encode(), plain_enc, **close)
        torch.testing.assert_close(decode(), plain_dec, **close)
        slabs.clear()
        patched_peak = _peak_bytes(encode)
        patched_conv = max(slabs)
        enable_patch_conv(vae, budget_bytes=1)  # below one row: slabs of one frame, then of one output row
        torch.testing.assert_close(encode(), plain_enc, **close)
        disable_patch_conv(vae)
        assert not patch_conv_enabled(vae) and torch.equal(encode(), plain_enc)
    assert patched_conv * 4 <= 64 * 1024 < plain_conv * 4  # every conv3d call got at most the budget
    assert patched_peak < 0.6 * plain_peak, (patched_peak, plain_peak)


# ---------------------------------------------------------------------- the training input
def Recorder(visual_cond: bool = True) -> TransformerRecorder:  # noqa: N802 - video checkpoints have visual_cond
    return TransformerRecorder(visual_cond)


def _text(n: int = 5) -> dict[str, torch.Tensor]:
    return family_for().collate_text([{"prompt_embeds": torch.randn(n, 32), "pooled_prompt_embeds": torch.randn(32)}])


def test_i2v_input_has_the_clean_first_latent_in_frame_0_zero_condition_and_mask_on_frame_0():
    fam = family_for(flavour="i2v-lite-5s")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 5, 4, 6, 16, generator=g), torch.randn(2, 5, 4, 6, 16, generator=g)
    sigma = torch.tensor([0.3, 0.9])
    noisy, weights = fam.prepare_noisy(x0, noise, sigma)
    rec = Recorder()
    fam.predict(rec, noisy, sigma, {k: v.expand(2, *v.shape[1:]) for k, v in _text().items()})
    (call,) = rec.calls
    x = call["hidden_states"]
    assert x.shape == (2, 5, 4, 6, 33)
    assert torch.equal(x[:, 0, ..., :16], x0[:, 0])  # frame 0: the clean image latent
    s = sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x[:, 1:, ..., :16], ((1 - s) * x0 + s * noise)[:, 1:])
    assert not x[..., 16:32].any()  # condition channels stay zero
    assert torch.equal(x[:, 0, ..., 32], torch.ones(2, 4, 6)) and not x[:, 1:, ..., 32].any()
    assert call["timestep"].dtype == torch.float32 and call["timestep"].tolist() == pytest.approx([300.0, 900.0])
    assert [p.tolist() for p in call["visual_rope_pos"]] == [[0, 1, 2, 3, 4], [0, 1], [0, 1, 2]]
    assert tuple(call["scale_factor"]) == (1.0, 2.0, 2.0)
    assert weights.shape == (2, 5, 1, 1, 1) and not weights[:, 0].any() and weights[:, 1:].all()


def test_i2v_loss_ignores_frame_0():
    fam = family_for(flavour="i2v-lite-5s")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 5, 4, 6, 16, generator=g), torch.randn(2, 5, 4, 6, 16, generator=g)
    _, weights = fam.prepare_noisy(x0, noise, torch.tensor([0.5, 0.5]))
    target = fam.target(x0, noise)
    pred = torch.randn(target.shape, generator=g)
    loss = flow_loss(pred, target, weights=weights)
    other_frame_0 = pred.clone()
    other_frame_0[:, 0] += 100.0
    assert torch.equal(flow_loss(other_frame_0, target, weights=weights), loss)
    other_frame_1 = pred.clone()
    other_frame_1[:, 1] += 1.0
    assert (flow_loss(other_frame_1, target, weights=weights) > loss).all()
    expected = ((pred - target)[:, 1:] ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss, expected)


def test_t2v_with_visual_cond_gets_zeros_and_mask_0_and_plain_checkpoints_16_channels():
    fam = family_for()
    noisy = torch.randn(1, 5, 4, 6, 16)
    assert fam.prepare_noisy(noisy, noisy, torch.tensor([0.5]))[1] is None
    rec = Recorder()
    fam.predict(rec, noisy, torch.tensor([0.5]), _text())
    x = rec.calls[0]["hidden_states"]
    assert x.shape[-1] == 33 and torch.equal(x[..., :16], noisy) and not x[..., 16:].any()
    plain = Recorder(visual_cond=False)
    fam.predict(plain, noisy, torch.tensor([0.5]), _text())
    assert torch.equal(plain.calls[0]["hidden_states"], noisy)
    with pytest.raises(ConfigError, match="visual_cond"):
        family_for(flavour="i2v-lite-5s")._check_transformer(plain)


def test_i2v_tread_always_keeps_the_condition_frame(monkeypatch):
    import trainer_core.routing.kandinsky5 as routing
    from trainer_core.routing.tread import keep_first_frame

    seen = {}

    def fake(transformer, config, **kwargs):
        seen.update(kwargs)
        return _Null()

    monkeypatch.setattr(routing, "tread_routing", fake)
    family_for(flavour="i2v-lite-5s").tread_context(Recorder())
    assert seen == {"force_keep": keep_first_frame}
    seen.clear()
    family_for().tread_context(Recorder())
    assert seen == {}


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


# ---------------------------------------------------------------------- validation pieces
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # fp32 time embedding, bf16 rest
def test_validation_timesteps_reach_a_bf16_transformer_in_fp32(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel

    tr = Kandinsky5Transformer3DModel.from_pretrained(tiny, subfolder="transformer", torch_dtype=torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=10.0)
    scheduler.set_timesteps(3)
    seen = []
    tr.register_forward_hook(lambda m, a, kw, out: seen.append(kw["timestep"]), with_kwargs=True)
    x = torch.randn(1, 1, 4, 4, 33, dtype=torch.bfloat16)
    inputs = {
        "encoder_hidden_states": torch.randn(1, 3, 32, dtype=torch.bfloat16),
        "pooled_projections": torch.randn(1, 32, dtype=torch.bfloat16),
        "visual_rope_pos": [torch.arange(1), torch.arange(2), torch.arange(2)],
        "text_rope_pos": torch.arange(3),
    }
    with torch.no_grad(), fp32_timesteps(tr, scheduler):
        for t in scheduler.timesteps:
            tr(hidden_states=x, timestep=t.unsqueeze(0).to(torch.bfloat16), **inputs)  # as the K5 pipelines do
            scheduler.step(torch.zeros(1, 1, 4, 4, 16), t, torch.zeros(1, 1, 4, 4, 16))
        tr(hidden_states=x, timestep=torch.tensor([5.0], dtype=torch.bfloat16), **inputs)  # not the scheduler's: kept
    assert [s.dtype for s in seen] == [torch.float32] * 3 + [torch.bfloat16]
    assert [s.item() for s in seen[:3]] == scheduler.timesteps.tolist()
    assert not torch.equal(scheduler.timesteps.to(torch.bfloat16).float(), scheduler.timesteps)  # not vacuous


def test_i2v_validation_image_is_the_first_frame_of_the_first_clip_or_from_the_eval_dataset(tiny_i2v, tmp_path):
    data = write_clips(tmp_path / "clips", {"a": BALL, "b": RED})
    stills = write_image(tmp_path / "stills", "still", RED, colour=(10, 200, 40))
    spec, fam, _ = resolved(tiny_i2v, tmp_path, [clips(str(data))], flavour="i2v-lite-5s")
    index = discover(spec, 16, frame_rule=fam.frame_rule)
    fam.prepare_validation(index)
    expected = ((first_frame(index.samples[0]) + 1) * 127.5).round().permute(1, 2, 0).to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(fam.validation_image), expected)
    assert fam._conditioning_image(64, 48).size == (64, 48)

    eval_ds = {"id": "eval", "instance_data_dir": str(stills), "resolution": 32, "resolution_type": "pixel",
               "disabled": True}  # fmt: skip
    spec, fam, _ = resolved(tiny_i2v, tmp_path, [clips(str(data)), eval_ds], flavour="i2v-lite-5s",
                            validation_using_datasets=True, eval_dataset_id="eval")  # fmt: skip
    fam.prepare_validation(discover(spec, 16, frame_rule=fam.frame_rule))  # "eval" is not trained on
    assert fam.validation_image.size == SIZE and fam.validation_image.getpixel((5, 5)) == (10, 200, 40)


# ---------------------------------------------------------------------- engine end to end
def eval_loss(trainer: Trainer, draws: int = 8) -> float:
    """Mean loss over fixed noise levels and noise for every sample (through prepare_noisy and its weights)."""
    gen = torch.Generator().manual_seed(1234)
    fam = trainer.family
    losses = []
    with torch.no_grad():
        for sample in trainer.index.samples:
            text = fam.collate_text([trainer.batches.text(sample.captions[0])])
            entry = trainer.latent_cache.load(sample)
            x0 = fam.sample_latents([{k: v if "mean" in k else torch.zeros_like(v) for k, v in entry.items()}], gen)
            for i in range(draws):
                sigma = torch.tensor([(i + 0.5) / draws])
                noise = torch.randn(x0.shape, generator=gen)
                noisy, weights = fam.prepare_noisy(x0, noise, sigma)
                pred = fam.predict(trainer.transformer, noisy, sigma, text)
                losses.append(flow_loss(pred, fam.target(x0, noise), weights=weights).item())
    return sum(losses) / len(losses)


def _train(spec: dict) -> tuple[Trainer, object, float, float]:
    trainer = Trainer(TrainSpec.model_validate(spec), ListSink())
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    trainer.transformer.eval()
    before = eval_loss(trainer)
    trainer.transformer.train()
    result = trainer.train()
    trainer.transformer.eval()
    return trainer, result, before, eval_loss(trainer)


VALIDATION = {
    "validation_disable": False,
    "validation_prompt": BALL,
    "validation_resolution": "48x32",
    "validation_num_inference_steps": 2,
    "validation_num_video_frames": 17,
    "framerate": 12,
    "validation_disable_unconditional": True,
}


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Two clips and one image (a one-frame clip), batch 1, rank 4 / alpha 8, validation at steps 0 and 30."""
    root = tmp_path_factory.mktemp("run")
    data = write_clips(root / "clips", {"a": BALL, "b": RED})
    stills = write_image(root / "stills", "c", RED)
    image_ds = {"id": "stills", "instance_data_dir": str(stills), "resolution": 32, "resolution_type": "pixel"}
    spec = video_spec(
        tiny, root / "out", [clips(str(data)), image_ds],
        training={"max_train_steps": 30}, validation=VALIDATION,
    )  # fmt: skip
    return _train(spec)


def test_training_on_clips_lowers_the_loss(trained):
    trainer, result, before, after = trained
    assert sorted(trainer.index.buckets()) == [(48, 32), (48, 32, 17)]
    assert trainer.spec.training.flow_schedule_shift == 5.0
    assert after < 0.85 * before, (before, after)
    assert result.steps == 30 and all(np.isfinite(h[1]) for h in result.loss_history)


def test_validation_writes_playable_mp4s_and_frame_strips(trained):
    trainer, result, _, _ = trained
    assert trainer._val_scheduler.config.shift == 10.0  # the authors' sampling shift
    mp4s = [f for f in result.validation_files if f.suffix == ".mp4"]
    strips = [f for f in result.validation_files if f.name.endswith("-frames.png")]
    assert len(mp4s) == len(strips) == 2  # steps 0 and 30
    for mp4 in mp4s:
        with av.open(str(mp4)) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert float(stream.average_rate) == 12.0
        assert len(frames) == 17 and (frames[0].width, frames[0].height) == SIZE
    assert Image.open(strips[0]).size == (SIZE[0] * 8, SIZE[1])


def _inputs() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "hidden_states": torch.randn(1, 5, 4, 6, 33, generator=g),
        "encoder_hidden_states": torch.randn(1, 9, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([400.0]),
        "visual_rope_pos": [torch.arange(5), torch.arange(2), torch.arange(3)],
        "text_rope_pos": torch.arange(9),
        "scale_factor": (1.0, 2.0, 2.0),
        "return_dict": False,
    }


def test_diffusers_file_loads_into_a_plain_t2v_pipeline_and_reproduces_the_trained_transformer(tiny, trained):
    from diffusers import Kandinsky5T2VPipeline
    from transformers import Qwen2Tokenizer

    trainer, result, _, _ = trained
    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny, tokenizer=None)
    pipe.tokenizer = Qwen2Tokenizer.from_pretrained(tiny, subfolder="tokenizer")
    inputs = _inputs()
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(result.lora.diffusers.parent)
        (cfg,) = pipe.transformer.peft_config.values()
        assert (cfg.r, cfg.lora_alpha) == (RANK, ALPHA)
        loaded, trained_out = pipe.transformer(**inputs)[0], trainer.transformer(**inputs)[0]
    assert (loaded - trained_out).abs().max() < 1e-5
    assert (trained_out - base).abs().max() > 1e-2


def test_comfyui_file_merged_by_comfyuis_rule_equals_diffusers_fused_weights(trained):
    trainer, result, _, _ = trained
    comfy = load_file(str(result.lora.comfyui))
    prefixes = {k.removesuffix(".lora_A.weight") for k in comfy if k.endswith(".lora_A.weight")}
    assert len(prefixes) == 1 * 6 + 2 * 10  # attention+ffn: text block (self-attn, ffn), visual (+ cross-attn)
    assert "diffusion_model.visual_transformer_blocks.1.feed_forward.out_layer" in prefixes
    tr = trainer.transformer
    base = {k.replace(".base_layer.", "."): v.clone() for k, v in tr.state_dict().items() if "lora_" not in k}
    fused = copy.deepcopy(tr)
    fused.fuse_lora()
    fused.unload_lora()
    expected = fused.state_dict()
    for prefix in prefixes:
        a, b, alpha = comfy[prefix + ".lora_A.weight"], comfy[prefix + ".lora_B.weight"], comfy[prefix + ".alpha"]
        key = prefix.removeprefix("diffusion_model.") + ".weight"
        merged = base[key] + alpha.item() / a.shape[0] * (b @ a)
        torch.testing.assert_close(merged, expected[key], atol=1e-6, rtol=1e-5)


def test_i2v_trains_and_renders_conditioned_on_the_first_clip(tiny_i2v, tmp_path):
    data = write_clips(tmp_path / "clips", {"a": BALL, "b": RED})
    validation = {**VALIDATION, "disable_benchmark": True}
    spec = video_spec(
        tiny_i2v,
        tmp_path / "out",
        [clips(str(data))],
        "i2v-lite-5s",
        training={"max_train_steps": 3},
        validation=validation,
    )
    trainer = Trainer(TrainSpec.model_validate(spec), ListSink())
    result = trainer.run()
    assert result.steps == 3 and all(np.isfinite(h[1]) for h in result.loss_history)
    mp4s = [f for f in result.validation_files if f.suffix == ".mp4"]
    assert len(mp4s) == 1
    with av.open(str(mp4s[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 17
    # the engine did not call prepare_validation: the family found the first clip itself
    first = ((first_frame(trainer.index.samples[0]) + 1) * 127.5).round().permute(1, 2, 0).to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(trainer.family.validation_image), first)


# ---------------------------------------------------------------------- SimpleTuner config
def test_simpletuners_shipped_kandinsky5_video_example_imports(tmp_path):
    config = {
        "model_family": "kandinsky5-video",
        "model_flavour": "t2v-lite-sft-5s",
        "model_type": "lora",
        "output_dir": str(tmp_path / "out"),
        "base_model_precision": "int8-torchao",
        "optimizer": "optimi-lion",  # needs torch-optimi to train; importing is fine
        "compress_disk_cache": True,
        "resolution": 480,
        "resolution_type": "pixel_area",
        "validation_num_video_frames": 81,
        "framerate": 24,
        "learning_rate": 6e-5,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 50,
        "max_grad_norm": 0.1,
        "vae_enable_tiling": True,
        "vae_enable_slicing": True,
        "vae_enable_patch_conv": True,
        "lora_rank": 16,
        "train_batch_size": 2,
        "caption_dropout_probability": 0.1,
        "validation_guidance": 5.0,
        "validation_resolution": "768x512",
        "validation_prompt": "a cat walks across a sunny kitchen",
        "max_train_steps": 100,
        "report_to": "none",
    }
    backend = [
        {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(tmp_path / "clips"),
         "caption_strategy": "textfile", "video": {"num_frames": 61, "min_frames": 61}},
        {"id": "te", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "text")},
    ]  # fmt: skip
    result = import_simpletuner(config, backend)
    unsupported = result.unsupported_keys
    assert "compress_disk_cache" in unsupported  # the rest of the example maps onto the spec
    assert [w for w in result.warnings if w.startswith(UNSUPPORTED_MESSAGE)] == [
        UNSUPPORTED_MESSAGE + ", ".join(unsupported)
    ]
    spec = result.spec
    assert (spec.model.model_family, spec.model.model_flavour) == ("kandinsky5-video", "t2v-lite-sft-5s")
    v = spec.validation
    assert (v.validation_num_video_frames, v.framerate, v.validation_resolution) == (81, 24.0, "768x512")
    assert (spec.optimizer.optimizer, spec.optimizer.learning_rate, spec.optimizer.max_grad_norm) == (
        "optimi-lion", 6e-5, 0.1,
    )  # fmt: skip
    assert spec.optimizer.lr_scheduler == "constant_with_warmup"
    m = spec.memory
    assert m.vae_enable_tiling and m.vae_enable_slicing and m.vae_enable_patch_conv
    (ds,) = spec.video_datasets
    assert (ds.video.num_frames, ds.video.min_frames, ds.resolution, ds.resolution_type) == (61, 61, 480, "pixel_area")
    from trainer_core.memory.quantize import backend_available

    if not backend_available("torchao"):  # resolve_spec refuses it before anything loads
        with pytest.raises(ConfigError, match="needs torchao"):
            resolve_spec(spec)
        spec.memory.base_model_precision = "int8-quanto"
    resolved_spec, fam, warnings = resolve_spec(spec)
    assert fam.validation_frames == 81 and fam.frame_rule(61) == 61 and warnings == []
