"""On-disk caches: re-encode exactly what changed, never reuse stale or corrupt entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset

from trainer_core.cache.latents import LatentCache
from trainer_core.cache.store import TensorStore
from trainer_core.cache.text import PromptRequest, TextEmbedCache
from trainer_core.data.discovery import discover
from trainer_core.spec import TrainSpec
from trainer_core.train.resolve import resolve_spec


class CountingLoader:
    """Loads a component on demand and counts how often it was needed."""

    def __init__(self, load):
        self.load, self.calls = load, 0

    def __call__(self):
        self.calls += 1
        return self.load()


def setup(tiny_lumina2, tmp_path, **overrides):
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, {"a": "a red circle", "b": "a blue circle", "c": "a green circle"})
    spec, family, _ = resolve_spec(
        TrainSpec.model_validate(lumina_spec(tiny_lumina2, data, tmp_path / "out", **overrides))
    )
    return spec, family, data


def text_requests(spec, family):
    index = discover(spec, family.bucket_alignment)
    return [PromptRequest(c, "caption", str(s.path)) for s in index.samples for c in s.captions]


def test_second_run_encodes_nothing_and_does_not_even_load_the_encoder(tiny_lumina2, tmp_path):
    spec, family, _ = setup(tiny_lumina2, tmp_path)
    cache = TextEmbedCache(spec.text_cache_dir(), family)
    loader = CountingLoader(lambda: family.load_text_encoders(torch.device("cpu"), torch.float32))
    first = cache.ensure(text_requests(spec, family), loader)
    assert (first.encoded, first.reused, loader.calls) == (3, 0, 1)
    second = TextEmbedCache(spec.text_cache_dir(), family).ensure(text_requests(spec, family), loader)
    assert (second.encoded, second.reused, loader.calls) == (0, 3, 1)


def test_changing_one_caption_re_encodes_exactly_one_entry(tiny_lumina2, tmp_path):
    spec, family, data = setup(tiny_lumina2, tmp_path)
    loader = CountingLoader(lambda: family.load_text_encoders(torch.device("cpu"), torch.float32))
    TextEmbedCache(spec.text_cache_dir(), family).ensure(text_requests(spec, family), loader)
    (data / "b.txt").write_text("a blue square\n")
    report = TextEmbedCache(spec.text_cache_dir(), family).ensure(text_requests(spec, family), loader)
    assert (report.encoded, report.reused) == (1, 2)


def test_changing_the_max_length_or_system_prompt_invalidates_every_entry(tiny_lumina2, tmp_path):
    spec, family, _ = setup(tiny_lumina2, tmp_path)
    loader = CountingLoader(lambda: family.load_text_encoders(torch.device("cpu"), torch.float32))
    TextEmbedCache(spec.text_cache_dir(), family).ensure(text_requests(spec, family), loader)
    for model in ({"tokenizer_max_length": 128}, {"system_prompt": "Draw this."}):
        spec2, family2, _ = setup(tiny_lumina2, tmp_path, model={**spec.model.model_dump(), **model})
        report = TextEmbedCache(spec2.text_cache_dir(), family2).ensure(text_requests(spec2, family2), loader)
        assert report.encoded == 3, model


def test_a_corrupt_entry_is_detected_and_rebuilt_never_used(tiny_lumina2, tmp_path):
    spec, family, _ = setup(tiny_lumina2, tmp_path)
    cache = TextEmbedCache(spec.text_cache_dir(), family)
    loader = CountingLoader(lambda: family.load_text_encoders(torch.device("cpu"), torch.float32))
    cache.ensure(text_requests(spec, family), loader)
    good = {k: v.clone() for k, v in cache.load("a red circle").items()}
    path = cache.store.path_for(cache.key("a red circle"))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(raw))
    report = TextEmbedCache(spec.text_cache_dir(), family).ensure(text_requests(spec, family), loader)
    assert (report.encoded, report.rebuilt) == (1, 1)
    torch.testing.assert_close(cache.load("a red circle")["prompt_embeds"], good["prompt_embeds"])


def test_a_truncated_entry_reads_as_missing(tmp_path):
    store = TensorStore(tmp_path)
    store.put("k" * 64, {"x": torch.arange(100.0)})
    path = store.path_for("k" * 64)
    path.write_bytes(path.read_bytes()[:50])
    assert store.get("k" * 64) is None and not path.exists()


def test_latents_re_encode_only_edited_images_and_changed_crops(tiny_lumina2, tmp_path):
    spec, family, data = setup(tiny_lumina2, tmp_path)
    vae_loader = CountingLoader(lambda: family.load_vae(torch.device("cpu"), torch.float32))

    def ensure(spec):
        index = discover(spec, family.bucket_alignment)
        cache = LatentCache({ds.id: spec.vae_cache_dir(ds) for ds in spec.image_datasets}, family)
        return cache.ensure(index.samples, vae_loader), cache, index

    first, cache, index = ensure(spec)
    assert first.encoded == 3
    assert cache.load(index.samples[0])["mean"].shape == (16, 8, 8)
    again, _, _ = ensure(spec)
    assert (again.encoded, vae_loader.calls) == (0, 1)
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 10)).save(data / "c.png")  # edit one image
    edited, _, _ = ensure(spec)
    assert (edited.encoded, edited.reused) == (1, 2)
    spec2, _, _ = setup(
        tiny_lumina2,
        tmp_path,
        datasets=[{**spec.datasets[0].model_dump(), "resolution": 128}, spec.datasets[1].model_dump()],
    )
    resized, _, _ = ensure(spec2)
    assert resized.encoded == 3


# ------------------------------------------------------------- the model's identity is in the keys
def other_weights(component: Path) -> None:
    """Give one model component other weights (same architecture, same file names): every weight + 0.01."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    [path] = sorted(component.glob("*.safetensors"))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)


def copy_model(model: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(model, tmp_path / "model" / model.name))


def test_another_vae_re_encodes_every_latent_and_reuses_every_caption(tiny_lumina2, tmp_path):
    model = copy_model(tiny_lumina2, tmp_path)
    spec, family, _ = setup(model, tmp_path)
    index = discover(spec, family.bucket_alignment)
    roots = {ds.id: spec.vae_cache_dir(ds) for ds in spec.image_datasets}

    def fill(family):
        text = TextEmbedCache(spec.text_cache_dir(), family).ensure(
            text_requests(spec, family), lambda: family.load_text_encoders(torch.device("cpu"), torch.float32)
        )
        cache = LatentCache(roots, family)
        latents = cache.ensure(index.samples, lambda: family.load_vae(torch.device("cpu"), torch.float32))
        return text, latents, cache.load(index.samples[0])["mean"]

    _, first, before = fill(family)
    assert first.encoded == 3
    other_weights(model / "vae")
    _, family2, _ = setup(model, tmp_path)
    text, latents, after = fill(family2)
    assert (latents.encoded, latents.reused) == (3, 0)  # nothing encoded by the old VAE is reused
    assert not torch.equal(before, after)
    assert (text.encoded, text.reused) == (0, 3)  # the captions did not change, nor did their encoder


def test_another_text_encoder_re_encodes_every_caption_and_reuses_every_latent(tiny_lumina2, tmp_path):
    model = copy_model(tiny_lumina2, tmp_path)
    spec, family, _ = setup(model, tmp_path)
    index = discover(spec, family.bucket_alignment)
    roots = {ds.id: spec.vae_cache_dir(ds) for ds in spec.image_datasets}

    def fill(family):
        cache = TextEmbedCache(spec.text_cache_dir(), family)
        text = cache.ensure(
            text_requests(spec, family), lambda: family.load_text_encoders(torch.device("cpu"), torch.float32)
        )
        latents = LatentCache(roots, family).ensure(
            index.samples, lambda: family.load_vae(torch.device("cpu"), torch.float32)
        )
        return text, latents, cache.load("a red circle")["prompt_embeds"]

    first, _, before = fill(family)
    assert first.encoded == 3
    other_weights(model / "text_encoder")
    _, family2, _ = setup(model, tmp_path)
    text, latents, after = fill(family2)
    assert (text.encoded, text.reused) == (3, 0)
    assert not torch.equal(before, after)
    assert (latents.encoded, latents.reused) == (0, 3)


@pytest.fixture(scope="module")
def tiny_kandinsky5(tmp_path_factory) -> dict[str, Path]:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image, build_tiny_kandinsky5_video

    root = tmp_path_factory.mktemp("k5-identity")
    return {
        "kandinsky5-image": build_tiny_kandinsky5_image(root),
        "kandinsky5-video": build_tiny_kandinsky5_video(root),
    }


@pytest.mark.parametrize("family_name", ["kandinsky5-image", "kandinsky5-video"])
@pytest.mark.parametrize("component", ["vae", "text_encoder", "text_encoder_2"])
def test_kandinsky5_cache_keys_follow_each_component_they_come_from(tiny_kandinsky5, tmp_path, family_name, component):
    """The latent key changes with the VAE alone, the text key with each of the two text encoders alone."""
    model = copy_model(tiny_kandinsky5[family_name], tmp_path)
    data = write_dataset(tmp_path / "data", {"a": "a red circle"})

    def keys() -> tuple[str, str]:
        spec, family, _ = resolve_spec(
            TrainSpec.model_validate(lumina_spec(model, data, tmp_path / "out", model={"model_family": family_name}))
        )
        [sample] = discover(spec, family.bucket_alignment).samples
        latent = LatentCache({ds.id: spec.vae_cache_dir(ds) for ds in spec.image_datasets}, family).key(sample)
        return latent, TextEmbedCache(spec.text_cache_dir(), family).key("a red circle")

    latent_before, text_before = keys()
    other_weights(model / component)
    latent_after, text_after = keys()
    assert (latent_after != latent_before) == (component == "vae")
    assert (text_after != text_before) == (component != "vae")
