"""Lumina 2 conventions, pinned (../shared/reference/lumina2_conventions.md)."""

from __future__ import annotations

import pytest
import torch

from trainer_core.errors import ModelLoadError, UnknownFlavourError
from trainer_core.families import get_family_class
from trainer_core.families.lumina2 import BASE_SYSTEM_PROMPT, NETA_SYSTEM_PROMPT
from trainer_core.spec import TrainSpec


def family_for(model_path, **model) -> object:
    spec = TrainSpec.model_validate(
        {"model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(model_path), **model}}
    )
    return get_family_class("lumina2")(spec)


def test_captions_get_the_system_prompt_but_empty_captions_and_negatives_do_not(tiny_lumina2):
    fam = family_for(tiny_lumina2)
    assert fam.format_prompt("a cat") == BASE_SYSTEM_PROMPT + " <Prompt Start> a cat"
    assert fam.format_prompt("") == ""  # caption dropout: the authors drop the whole string
    assert fam.format_prompt("blurry", role="negative") == "blurry"


def test_system_prompt_is_per_flavour_and_overridable(tiny_lumina2):
    assert family_for(tiny_lumina2, model_flavour="neta-lumina").system_prompt == NETA_SYSTEM_PROMPT
    assert family_for(tiny_lumina2, system_prompt="Draw.").format_prompt("x") == "Draw. <Prompt Start> x"


def test_unknown_flavour_names_the_allowed_ones(tiny_lumina2):
    with pytest.raises(UnknownFlavourError, match="2.0, neta-lumina"):
        family_for(tiny_lumina2, model_flavour="3.0")


def test_text_embeddings_are_gemma_penultimate_layer_trimmed_to_the_real_tokens(tiny_lumina2):
    from diffusers import Lumina2Pipeline

    fam = family_for(tiny_lumina2)
    encoders = fam.load_text_encoders(torch.device("cpu"), torch.float32)
    caption = "a small red circle"
    (enc,) = fam.encode_text(encoders, [fam.format_prompt(caption)])
    pipe = Lumina2Pipeline.from_pretrained(tiny_lumina2)
    embeds, mask, _, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, device="cpu")
    n = int(mask.sum())
    assert embeds.shape[1] == 256  # diffusers pads to 256 ...
    assert enc.tensors["prompt_embeds"].shape[0] == n  # ... we keep the real tokens only
    torch.testing.assert_close(enc.tensors["prompt_embeds"], embeds[0, :n])


def test_padding_never_changes_the_transformer_output(tiny_lumina2):
    """Captions of different lengths in one batch give the same prediction as one at a time."""
    fam = family_for(tiny_lumina2)
    encoders = fam.load_text_encoders(torch.device("cpu"), torch.float32)
    encs = fam.encode_text(encoders, [fam.format_prompt("a cat"), fam.format_prompt("a much longer caption here")])
    tr = fam.load_transformer(torch.device("cpu"), torch.float32).eval()
    x = torch.randn(2, 16, 8, 8)
    sigma = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        batched = fam.predict(tr, x, sigma, fam.collate_text([e.tensors for e in encs]))
        singles = [fam.predict(tr, x[i : i + 1], sigma[i : i + 1], fam.collate_text([encs[i].tensors])) for i in (0, 1)]
        padded = fam.collate_text([encs[0].tensors])  # pad caption 0 to 256 tokens, as diffusers does
        pad = 256 - padded["prompt_embeds"].shape[1]
        padded = {
            "prompt_embeds": torch.nn.functional.pad(padded["prompt_embeds"], (0, 0, 0, pad)),
            "prompt_attention_mask": torch.nn.functional.pad(padded["prompt_attention_mask"], (0, pad)),
        }
        full = fam.predict(tr, x[:1], sigma[:1], padded)
    torch.testing.assert_close(batched[0:1], singles[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1:2], singles[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full, singles[0], atol=1e-5, rtol=1e-4)


def test_latents_are_shifted_then_scaled(tiny_lumina2):
    fam = family_for(tiny_lumina2)
    vae = fam.load_vae(torch.device("cpu"), torch.float32)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    (entry,) = fam.encode_pixels(vae, pixels)
    dist = vae.encode(pixels).latent_dist
    assert vae.config.shift_factor == pytest.approx(0.1159)
    torch.testing.assert_close(entry["mean"], (dist.mean[0] - 0.1159) * 0.3611)
    torch.testing.assert_close(entry["std"], dist.std[0] * 0.3611)
    assert entry["mean"].shape == (16, 8, 8)  # channels-first


def test_transformer_gets_one_minus_sigma_and_target_is_x0_minus_noise(tiny_lumina2):
    fam = family_for(tiny_lumina2)
    seen = {}

    class Recorder(torch.nn.Module):
        dtype = torch.float32

        def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict):
            seen["t"] = timestep
            return (hidden_states,)

    text = {"prompt_embeds": torch.zeros(1, 3, 32), "prompt_attention_mask": torch.ones(1, 3, dtype=torch.long)}
    fam.predict(Recorder(), torch.zeros(1, 16, 4, 4), torch.tensor([0.25]), text)
    assert seen["t"].item() == pytest.approx(0.75)  # t = 0 is pure noise for Lumina 2
    x0, noise = torch.ones(2), torch.full((2,), 3.0)
    assert torch.equal(fam.target(x0, noise), x0 - noise)


def test_loads_from_a_hugging_face_repo_id_through_the_hub_cache(tiny_lumina2, tmp_path, monkeypatch):
    from trainer_core.testing.tiny import install_in_hf_cache

    install_in_hf_cache(tiny_lumina2, "tiny-org/tiny-lumina2", tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    fam = family_for("tiny-org/tiny-lumina2")
    tr = fam.load_transformer(torch.device("cpu"), torch.float32)
    assert type(tr).__name__ == "Lumina2Transformer2DModel"


def test_a_folder_that_is_not_a_diffusers_model_is_refused_with_the_fix(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    fam = family_for(tmp_path)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        fam.load_transformer(torch.device("cpu"), torch.float32)
