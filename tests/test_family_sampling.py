"""What every family hands its transformer, checked against the real diffusers samplers.

- Timesteps reach the transformer in fp32, in training (``family.predict``) and in validation
  (``family.render`` through the family's diffusers pipeline), even when the model runs in bf16: the
  authors pass fp32 timesteps, and in bf16 ``1000 * sigma`` = 857.69 would arrive as 856.
- The flow-target sign is tied to the sampler, not to a restatement of the code: a transformer that
  returns exactly the training target ``family.target(x0, noise)`` for the noise level its timestep
  says, denoised by the family's own validation render (its real diffusers pipeline and scheduler),
  must land on x0. A flipped target sign, or a flipped timestep convention, lands elsewhere.
- Lumina 2 validation samples with the authors' static shift 6.0 whatever the repo's scheduler says.

One tiny model of each family (T2I, T2V, Lumina 2) serves every test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from trainer_core.families import get_family_class
from trainer_core.families.base import ModelFamily
from trainer_core.families.lumina2 import SAMPLING_SHIFT
from trainer_core.spec import TrainSpec

pytestmark = [
    pytest.mark.usefixtures("one_cpu_thread"),
    pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight"),  # fp32 time path, bf16 rest
]

CPU = torch.device("cpu")
FAMILIES = ("lumina2", "kandinsky5-image", "kandinsky5-video")
SIZE = 32  # px: 4x4 latents, 2x2 patches
VIDEO_FRAMES = 5  # 2 latent frames


@pytest.fixture(scope="module")
def models(tiny_lumina2, tmp_path_factory) -> dict[str, Path]:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image, build_tiny_kandinsky5_video

    root = tmp_path_factory.mktemp("family-sampling")
    return {
        "lumina2": tiny_lumina2,
        "kandinsky5-image": build_tiny_kandinsky5_image(root),
        "kandinsky5-video": build_tiny_kandinsky5_video(root),
    }


def family_for(name: str, model: Path) -> ModelFamily:
    spec = TrainSpec.model_validate(
        {
            "model": {"model_family": name, "pretrained_model_name_or_path": str(model)},
            "validation": {"validation_num_video_frames": VIDEO_FRAMES} if name == "kandinsky5-video" else {},
        }
    )
    return get_family_class(name)(spec)


def text_for(name: str, tokens: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cached-text tensors as the family's collate_text gives them (random embeddings, width 32)."""
    g = torch.Generator().manual_seed(seed)
    if name == "lumina2":
        return {
            "prompt_embeds": torch.randn(1, tokens, 32, generator=g),
            "prompt_attention_mask": torch.ones(1, tokens, dtype=torch.long),
        }
    return {
        "prompt_embeds": torch.randn(1, tokens, 32, generator=g),
        "prompt_lengths": torch.tensor([tokens]),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
    }


def noisy_input(fam: ModelFamily, transformer: torch.nn.Module) -> torch.Tensor:
    """A training input of the family's layout: channels-first for Lumina 2, channels-last frames for K5."""
    if fam.name == "lumina2":
        return torch.randn(1, 16, 4, 4)
    frames = 2 if fam.name == "kandinsky5-video" else 1
    return torch.randn(1, frames, 4, 4, 16)


def expected_timestep(fam: ModelFamily, sigma: torch.Tensor) -> torch.Tensor:
    """The family's timestep for noise level sigma, in fp32: 1 - sigma (Lumina 2) or 1000 sigma (K5)."""
    return 1.0 - sigma if fam.name == "lumina2" else 1000.0 * sigma


def sigma_of(fam: ModelFamily, timestep: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`expected_timestep`: the noise level a timestep stands for in the family's convention."""
    t = timestep.float()
    return 1.0 - t if fam.name == "lumina2" else t / 1000.0


def spy_timesteps(transformer: torch.nn.Module) -> list[torch.Tensor]:
    """Record the ``timestep`` each forward call receives (after any pre-hook, as forward sees it)."""
    seen: list[torch.Tensor] = []
    transformer.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["timestep"].detach().clone()), with_kwargs=True
    )
    return seen


def render(fam: ModelFamily, transformer: torch.nn.Module, vae: torch.nn.Module, scheduler: Any, steps: int) -> Any:
    return fam.render(
        transformer,
        vae,
        scheduler,
        text_for(fam.name, 3, seed=1),
        text_for(fam.name, 2, seed=2),
        width=SIZE,
        height=SIZE,
        steps=steps,
        guidance=3.0,  # CFG on: prompt and negative passes both get checked
        guidance_rescale=0.0,
        seed=0,
    )


# ---------------------------------------------------------------------- fp32 timesteps (issue 14, item 3)
@pytest.mark.parametrize("name", FAMILIES)
def test_training_timesteps_reach_a_bf16_transformer_in_fp32(models, name):
    fam = family_for(name, models[name])
    transformer = fam.load_transformer(CPU, torch.bfloat16)
    seen = spy_timesteps(transformer)
    sigma = torch.tensor([0.14231])  # 1000 sigma = 142.31, which bf16 would round to 142.0
    with torch.no_grad():
        fam.predict(transformer, noisy_input(fam, transformer), sigma, text_for(name))
    (timestep,) = seen
    assert timestep.dtype == torch.float32
    assert torch.equal(timestep, expected_timestep(fam, sigma))
    assert not torch.equal(timestep.to(torch.bfloat16).float(), timestep)  # bf16 would have changed it


@pytest.mark.parametrize("name", FAMILIES)
def test_validation_timesteps_reach_a_bf16_transformer_in_fp32(models, name):
    fam = family_for(name, models[name])
    transformer = fam.load_transformer(CPU, torch.bfloat16)
    vae = fam.load_vae(CPU, torch.bfloat16)  # as the engine loads it under bf16
    scheduler = fam.load_scheduler()
    seen = spy_timesteps(transformer)
    with torch.no_grad():
        render(fam, transformer, vae, scheduler, steps=3)
    sigmas = scheduler.sigmas[:-1]  # the three noise levels the sampler visited (the last entry is 0)
    expected = [expected_timestep(fam, s) for s in sigmas for _ in ("prompt", "negative")]
    assert len(seen) == len(expected) == 6
    assert all(t.dtype == torch.float32 for t in seen), [t.dtype for t in seen]
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want.expand_as(got), rtol=1e-6, atol=1e-6)
    rounded = torch.stack([t.flatten()[0] for t in seen]).to(torch.bfloat16).float()
    assert not torch.equal(rounded, torch.stack([t.flatten()[0] for t in seen]))  # not vacuous


# ---------------------------------------------------------------------- the target sign, tied to the sampler (item 24)
class Oracle:
    """Stands in for ``transformer.forward``: returns the family's training target for a known x0.

    The sampler's current latents are x_t = (1 - sigma) x0 + sigma noise, so at the noise level the
    timestep stands for (the family's own convention) the noise is (x_t - (1 - sigma) x0) / sigma and
    the training target is ``family.target(x0, noise)``. x0 is drawn on the first call (sigma = 1, so x_t
    is the starting noise and fixes the latent shape). Kandinsky 5's visual-conditioning channels
    (condition and mask, after the first 16) are not part of x_t.
    """

    def __init__(self, fam: ModelFamily) -> None:
        self.fam = fam
        self.x0: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        self.calls += 1
        x_t = hidden_states.float() if self.fam.name == "lumina2" else hidden_states[..., :16].float()
        if self.x0 is None:
            self.x0 = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
        sigma = sigma_of(self.fam, timestep).view(-1, *[1] * (x_t.dim() - 1))
        noise = (x_t - (1.0 - sigma) * self.x0) / sigma
        return Transformer2DModelOutput(sample=self.fam.target(self.x0, noise).to(hidden_states.dtype))


def decoded_latents(fam: ModelFamily, vae: torch.nn.Module) -> list[torch.Tensor]:
    """Record what the pipeline hands the VAE decoder."""
    seen: list[torch.Tensor] = []
    decode = vae.decode

    def spy(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    vae.decode = spy
    return seen


def decoder_input_for(fam: ModelFamily, vae: torch.nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """What the VAE should decode when sampling ends exactly on x0, by each family's latent convention."""
    scale = vae.config.scaling_factor
    if fam.name == "lumina2":
        return x0 / scale + vae.config.shift_factor  # (z - shift) * scale in training
    channels_first = x0.permute(0, 4, 1, 2, 3)  # (B, F, H, W, C) -> (B, C, F, H, W)
    if fam.name == "kandinsky5-image":
        channels_first = channels_first[:, :, 0]  # one frame: (B, C, H, W)
    return channels_first / scale  # z * scale, no shift


@pytest.mark.parametrize("name", FAMILIES)
def test_an_oracle_prediction_denoised_by_the_familys_pipeline_lands_on_x0(models, name, monkeypatch):
    fam = family_for(name, models[name])
    transformer = fam.load_transformer(CPU, torch.float32)
    vae = fam.load_vae(CPU, torch.float32)
    oracle = Oracle(fam)
    monkeypatch.setattr(transformer, "forward", oracle)
    decoded = decoded_latents(fam, vae)
    with torch.no_grad():
        render(fam, transformer, vae, fam.load_scheduler(), steps=4)
    assert oracle.calls == 8 and oracle.x0 is not None  # 4 steps, prompt and negative
    (z,) = decoded
    expected = decoder_input_for(fam, vae, oracle.x0)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_flipped_target_sign_does_not_land_on_x0(models, name, monkeypatch):
    """The test above can fail: with the opposite sign the same oracle ends far from x0."""
    fam = family_for(name, models[name])
    flipped = fam.target
    monkeypatch.setattr(fam, "target", lambda x0, noise: -flipped(x0, noise))
    transformer = fam.load_transformer(CPU, torch.float32)
    vae = fam.load_vae(CPU, torch.float32)
    oracle = Oracle(fam)
    monkeypatch.setattr(transformer, "forward", oracle)
    decoded = decoded_latents(fam, vae)
    with torch.no_grad():
        render(fam, transformer, vae, fam.load_scheduler(), steps=4)
    (z,) = decoded
    miss = (z - decoder_input_for(fam, vae, oracle.x0)).abs().mean().item()
    assert miss > 0.5, miss


# ---------------------------------------------------------------------- Lumina 2's sampling shift (item 4)
def test_lumina2_validation_samples_with_the_authors_shift_whatever_the_repos_scheduler_says(models, tmp_path):
    """The authors sample Lumina-Image-2.0 with a static time shift of 6 (sample.sh, sample.py, demo.py)."""
    folder = tmp_path / "lumina-other-scheduler"
    shutil.copytree(models["lumina2"], folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    config_path.write_text(json.dumps(config))

    steps = 5
    s = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps)).float()  # diffusers' Lumina2Pipeline grid
    sigmas = SAMPLING_SHIFT * s / (1.0 + (SAMPLING_SHIFT - 1.0) * s)
    assert SAMPLING_SHIFT == 6.0
    for model in (models["lumina2"], folder):
        fam = family_for("lumina2", model)
        scheduler = fam.load_scheduler()
        assert scheduler.config.shift == 6.0 and not scheduler.config.use_dynamic_shifting
        transformer = fam.load_transformer(CPU, torch.float32)
        seen = spy_timesteps(transformer)
        with torch.no_grad():
            render(fam, transformer, fam.load_vae(CPU, torch.float32), scheduler, steps=steps)
        prompt_calls = torch.stack([t.flatten()[0] for t in seen[::2]])
        torch.testing.assert_close(prompt_calls, 1.0 - sigmas, rtol=1e-5, atol=1e-6)
