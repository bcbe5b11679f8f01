"""Kandinsky 5 image editing (i2i): reference pairs as SimpleTuner declares them, the authors' conditioning.

An image dataset names a ``dataset_type: conditioning`` dataset in ``conditioning_data``; files pair
1:1 by name. The reference is fitted (cover + centre crop) to its target's bucket, VAE-encoded into the
condition channels with mask 1 (33 channels), and shown to Qwen at half size with the image_edit
template (../shared/reference/kandinsky5_conventions.md section 4).

The first group runs everywhere. Tests marked ``torchvision`` need the real Qwen2VLProcessor, which
transformers builds only with a working torchvision: run them in a venv made with
``pip install torch==2.14.1 torchvision==0.29.1`` (they are skipped without one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from PIL import Image

from trainer_core.cache.text import TextEmbedCache
from trainer_core.data.discovery import discover
from trainer_core.errors import ConfigError, DatasetError
from trainer_core.events import ListSink
from trainer_core.families.kandinsky5 import TEMPLATES, torchvision_available
from trainer_core.families.kandinsky5_image import Kandinsky5ImageFamily
from trainer_core.simpletuner import import_simpletuner
from trainer_core.spec import TrainSpec
from trainer_core.train.engine import Trainer

needs_torchvision = pytest.mark.skipif(not torchvision_available(), reason="needs a torchvision that imports")
EDIT, EDIT_LONG = "make it blue", "turn the circle into a large blue square drawn in tunertest style"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def write_refs(folder: Path, names: dict[str, tuple[int, int]], ext: str = ".png") -> Path:
    """Reference images (no captions), one colour gradient each so that their latents differ."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(sorted(names.items())):
        img = Image.linear_gradient("L").resize(size).convert("RGB")
        img.paste((40 * i % 255, 200, 90), (0, 0, size[0] // 3, size[1] // 3))
        img.save(folder / f"{name}{ext}")
    return folder


def i2i_spec(model: Path | str, edits: Path, refs: Path, out: Path, **overrides) -> dict:
    spec = lumina_spec(Path(model), edits, out, **overrides)
    spec["model"] = {
        "model_family": "kandinsky5-image",
        "model_flavour": "i2i-lite-sft",
        "pretrained_model_name_or_path": str(model),
    }
    spec["datasets"][0].update({"conditioning_data": "refs", "conditioning_type": "reference_strict"})
    spec["datasets"].insert(
        1,
        {
            "id": "refs",
            "dataset_type": "conditioning",
            "instance_data_dir": str(refs),
            "conditioning_type": "reference_strict",
        },
    )
    return spec


# ---------------------------------------------------------------------- pairing (no model needed)
def test_references_pair_by_file_name_and_are_fitted_to_their_targets_bucket(tmp_path):
    edits = write_dataset(tmp_path / "edits", {"a": EDIT, "b": EDIT_LONG}, size=(64, 48))
    refs = write_refs(tmp_path / "refs", {"a": (96, 96), "b": (64, 48)}, ext=".jpg")  # other size, other extension
    spec = TrainSpec.model_validate(i2i_spec("unused", edits, refs, tmp_path / "out"))
    index = discover(spec, alignment=16)
    by_name = {s.path.stem: s for s in index.samples}
    assert set(by_name) == {"a", "b"}  # references are not training samples
    a = by_name["a"]
    assert a.reference.path == refs / "a.jpg"
    for smp in index.samples:
        ref = smp.reference.plan
        assert ref.bucket == smp.plan.bucket  # the reference is the output size
        (bw, bh), (rw, rh) = ref.bucket, ref.resize
        assert (rw == bw and rh >= bh) or (rh == bh and rw >= bw)  # resized to cover, aspect kept
        left, top = (rw - bw) // 2, (rh - bh) // 2
        assert ref.crop_box == (left, top, left + bw, top + bh)  # centre crop
    assert a.plan.bucket == (80, 48) and a.reference.plan.resize == (80, 80)  # a square reference, a 5:3 target


def test_a_reference_of_the_same_shape_gets_its_targets_random_crop(tmp_path):
    """Random crops cut the same region from both images of a pair, at any reference resolution."""
    edits = write_dataset(tmp_path / "edits", {"a": EDIT, "b": EDIT}, size=(120, 64))
    refs = write_refs(tmp_path / "refs", {"a": (240, 128), "b": (60, 60)})  # a: same shape, twice the size
    spec = i2i_spec("unused", edits, refs, tmp_path / "out")
    spec["datasets"][0].update(crop=True, crop_style="random", crop_aspect="square", resolution=48)
    a, b = discover(TrainSpec.model_validate(spec), alignment=16).samples
    assert a.plan.crop_box != (0, 0, *a.plan.bucket) and a.plan.crop_box[0] != (a.plan.resize[0] - 48) // 2
    assert a.reference.plan == a.plan  # the same resize and crop box: the pair stays aligned
    assert b.reference.plan.bucket == b.plan.bucket and b.reference.plan != b.plan  # other shape: fitted


def test_unmatched_pairs_are_reported_up_front_by_file(tmp_path):
    edits = write_dataset(tmp_path / "edits", {"a": EDIT, "lonely": EDIT})
    refs = write_refs(tmp_path / "refs", {"a": (64, 64), "stray": (64, 64)})
    spec = TrainSpec.model_validate(i2i_spec("unused", edits, refs, tmp_path / "out"))
    with pytest.raises(DatasetError) as err:
        discover(spec, alignment=16)
    text = str(err.value)
    assert f"{edits / 'lonely.png'}: no reference image lonely.*" in text
    assert f"{refs / 'stray.png'}: reference image has no training image stray.*" in text
    assert "same file name" in text  # the fix


def test_a_corrupt_reference_is_named(tmp_path):
    edits = write_dataset(tmp_path / "edits", {"a": EDIT})
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    spec = TrainSpec.model_validate(i2i_spec("unused", edits, refs, tmp_path / "out"))
    with pytest.raises(DatasetError, match=r"a\.png.*\(reference of .*a\.png\)"):
        discover(spec, alignment=16)


def test_conditioning_data_must_name_a_conditioning_dataset(tmp_path):
    spec = i2i_spec("unused", tmp_path, tmp_path, tmp_path / "out")
    spec["datasets"][0]["conditioning_data"] = "te"
    with pytest.raises(
        ConfigError, match="conditioning_data 'te' must name a dataset with dataset_type 'conditioning'"
    ):
        TrainSpec.from_json(json.dumps(spec))


def test_families_that_do_not_edit_refuse_reference_pairs(tiny_lumina2, tmp_path):
    from trainer_core.train.resolve import resolve_spec

    edits = write_dataset(tmp_path / "edits", {"a": EDIT})
    refs = write_refs(tmp_path / "refs", {"a": (64, 64)})
    spec = i2i_spec(tiny_lumina2, edits, refs, tmp_path / "out")
    for model in ({"model_family": "lumina2"}, {"model_family": "kandinsky5-image", "model_flavour": "t2i-lite-sft"}):
        spec["model"] = {**model, "pretrained_model_name_or_path": str(tiny_lumina2)}
        with pytest.raises(ConfigError, match="does not edit images"):
            resolve_spec(TrainSpec.model_validate(spec), "cpu")


@pytest.mark.skipif(torchvision_available(), reason="checks the message shown without torchvision")
def test_without_torchvision_i2i_says_so_before_any_model_loads(tmp_path, monkeypatch):
    for name in ("load_text_encoders", "load_vae", "load_transformer"):
        monkeypatch.setattr(Kandinsky5ImageFamily, name, lambda *a, **k: pytest.fail("a model was loaded"))
    edits = write_dataset(tmp_path / "edits", {"a": EDIT})
    refs = write_refs(tmp_path / "refs", {"a": (64, 64)})
    with pytest.raises(ConfigError, match="needs torchvision") as err:
        Trainer(TrainSpec.model_validate(i2i_spec("unused", edits, refs, tmp_path / "out"))).run()
    assert "pip install torch==2.14.1 torchvision==0.29.1" in str(err.value)
    assert "t2i-lite-sft" in str(err.value)  # what works without it


def test_the_text_cache_key_holds_the_reference_image(tmp_path):
    edits = write_dataset(tmp_path / "edits", {"a": EDIT, "b": EDIT})  # same caption, different references
    refs = write_refs(tmp_path / "refs", {"a": (64, 64), "b": (64, 64)})
    spec = TrainSpec.model_validate(i2i_spec("unused", edits, refs, tmp_path / "out"))
    a, b = discover(spec, alignment=16).samples
    fam = Kandinsky5ImageFamily(spec)
    cache = TextEmbedCache(tmp_path / "cache", fam)
    assert cache.key(EDIT, image=a.reference) != cache.key(EDIT, image=b.reference)
    assert cache.key(EDIT, image=a.reference) != cache.key(EDIT)
    assert fam.text_cache_identity()["template"] == TEMPLATES["image_edit"].text
    before = cache.key(EDIT, image=a.reference)
    write_refs(tmp_path / "refs", {"a": (64, 64), "b": (64, 64)})  # rewritten with the same pixels: same key
    assert cache.key(EDIT, image=discover(spec, alignment=16).samples[0].reference) == before
    Image.new("RGB", (64, 64), (1, 2, 3)).save(refs / "a.png")
    assert cache.key(EDIT, image=discover(spec, alignment=16).samples[0].reference) != before


def test_a_simpletuner_i2i_dataloader_imports(tmp_path):
    config = {
        "model_family": "kandinsky5-image",
        "model_flavour": "i2i-lite-sft",
        "output_dir": str(tmp_path / "out"),
        "max_train_steps": 10,
        "validation_using_datasets": True,
        "eval_dataset_id": "edits",
    }
    backend = [
        {"id": "edits", "type": "local", "dataset_type": "image", "instance_data_dir": str(tmp_path / "e"),
         "conditioning_data": "refs", "caption_strategy": "textfile", "resolution": 1024,
         "resolution_type": "pixel_area"},
        {"id": "refs", "type": "local", "dataset_type": "conditioning", "instance_data_dir": str(tmp_path / "r"),
         "conditioning_type": "reference_strict"},
        {"id": "te", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "t")},
    ]  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**config, "data_backend_config": str(tmp_path / "b.json")}))
    (tmp_path / "b.json").write_text(json.dumps(backend))
    result = import_simpletuner(tmp_path / "config.json")
    edits, refs = result.spec.datasets[:2]
    assert (edits.conditioning_data, refs.dataset_type, refs.conditioning_type) == (
        "refs",
        "conditioning",
        "reference_strict",
    )
    assert not result.unsupported_keys
    assert [d.id for d in result.spec.training_datasets] == ["edits"]


# ---------------------------------------------------------------------- with the real Qwen2VLProcessor
@pytest.fixture(scope="module")
def tiny_i2i(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    return build_tiny_kandinsky5_image(tmp_path_factory.mktemp("k5i2i"), i2i=True)


@pytest.mark.torchvision
@needs_torchvision
def test_qwen_sees_the_reference_at_half_size_with_the_image_edit_template(tiny_i2i, tmp_path, monkeypatch):
    spec = TrainSpec.model_validate(
        {
            "model": {
                "model_family": "kandinsky5-image",
                "model_flavour": "i2i-lite-sft",
                "pretrained_model_name_or_path": str(tiny_i2i),
            }
        }  # fmt: skip
    )
    fam = Kandinsky5ImageFamily(spec)
    enc = fam.load_text_encoders(torch.device("cpu"), torch.float32)
    assert enc.qwen.model.visual is not None  # i2i shows Qwen the reference: the vision tower stays
    seen = {}
    real_call = type(enc.qwen_tokenizer).__call__

    def spy(self, text=None, images=None, **kw):
        seen["text"], seen["sizes"] = text, [im.size for im in images]
        return real_call(self, text=text, images=images, **kw)

    monkeypatch.setattr(type(enc.qwen_tokenizer), "__call__", spy)
    red = Image.new("RGB", (112, 84), (255, 0, 0))
    blue = Image.new("RGB", (112, 84), (0, 0, 255))
    a, b, plain = fam.encode_text(enc, [EDIT, EDIT, EDIT], images=[red, blue, None])
    assert seen["sizes"] == [(56, 42), (56, 42)]  # half size
    assert seen["text"][0] == TEMPLATES["image_edit"].format(EDIT, n_images=1)
    assert seen["text"][0].endswith(EDIT + "<|vision_start|><|image_pad|><|vision_end|><|im_end|>")
    assert seen["text"][2] == TEMPLATES["image_edit"].format(EDIT, n_images=0)
    n_image_tokens = a.tensors["prompt_embeds"].shape[0] - plain.tensors["prompt_embeds"].shape[0]
    assert n_image_tokens >= 3  # vision start/end + at least one merged patch
    assert not torch.allclose(a.tensors["prompt_embeds"], b.tensors["prompt_embeds"])  # Qwen saw the image
    assert torch.equal(a.tensors["pooled_prompt_embeds"], b.tensors["pooled_prompt_embeds"])  # CLIP did not


def _eval_loss(trainer: Trainer, draws: int = 6) -> float:
    gen = torch.Generator().manual_seed(99)
    losses = []
    with torch.no_grad():
        for smp in trainer.index.samples:
            text = trainer.family.collate_text([trainer.batches.text(smp.captions[0], image=smp.reference)])
            x0 = trainer.latent_cache.load(smp)["mean"][None]
            cond = trainer.latent_cache.load(smp.reference)["mean"][None]
            for i in range(draws):
                sigma = torch.tensor([(i + 0.5) / draws])
                noise = torch.randn(x0.shape, generator=gen)
                pred = trainer.family.predict(
                    trainer.transformer, (1 - sigma) * x0 + sigma * noise, sigma, text, condition=cond
                )
                losses.append(torch.mean((pred - trainer.family.target(x0, noise)) ** 2).item())
    return sum(losses) / len(losses)


@pytest.mark.torchvision
@pytest.mark.slow
@needs_torchvision
def test_i2i_trains_on_pairs_with_the_reference_in_the_condition_channels(tiny_i2i, tmp_path):
    edits = write_dataset(tmp_path / "edits", {"a": EDIT, "b": EDIT_LONG}, size=(64, 48))
    refs = write_refs(tmp_path / "refs", {"a": (96, 64), "b": (64, 48)})
    spec = TrainSpec.model_validate(
        i2i_spec(
            tiny_i2i,
            edits,
            refs,
            tmp_path / "out",
            training={
                "max_train_steps": 30,
                "train_batch_size": 2,
                "mixed_precision": "no",
                "base_model_default_dtype": "fp32",
                "gradient_checkpointing": False,
                "seed": 0,
                "caption_dropout_probability": 0.1,
            },
            optimizer={"optimizer": "adamw", "learning_rate": 1e-2},
            lora={"lora_rank": 4, "lora_alpha": 8, "lora_target_preset": "attention+ffn"},
            checkpointing={"checkpoint_step_interval": None},
            validation={
                "validation_disable": False,
                "validation_using_datasets": True,
                "eval_dataset_id": "d",
                "validation_resolution": "64x48",
                "validation_num_inference_steps": 2,
                "validation_disable_unconditional": True,
            },
        )  # fmt: skip
    )
    trainer = Trainer(spec, ListSink())
    trainer.prepare()
    trainer.fill_caches()
    assert trainer.latent_report.encoded == 4  # two targets, two references
    trainer.build_model()

    seen = []
    real_forward = trainer.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["hidden_states"].detach().clone())
        return real_forward(*args, **kwargs)

    trainer.transformer.forward = spy
    batch = trainer.batches.build([0, 1], torch.Generator().manual_seed(0))
    assert batch.condition is not None and batch.condition.shape == batch.x0.shape
    trainer.family.predict(
        trainer.transformer, batch.x0, torch.tensor([0.5, 0.5]), batch.text, condition=batch.condition
    )
    x = torch.cat(seen)
    assert x.shape[-1] == 33
    assert torch.all(x[..., 32] == 1)  # mask on: a reference is given
    assert torch.allclose(x[..., 16:32].sort(0).values, batch.condition.sort(0).values)  # the references' latents
    del trainer.transformer.forward

    trainer.transformer.eval()
    before = _eval_loss(trainer)
    trainer.transformer.train()
    result = trainer.train()
    trainer.transformer.eval()
    after = _eval_loss(trainer)
    assert after < 0.85 * before, (before, after)
    assert result.lora.comfyui.exists() and result.lora.diffusers.exists()
    rendered = [f for f in result.validation_files if f.suffix == ".png"]
    assert rendered and all(Image.open(f).size == (64, 48) for f in rendered)
    assert any("dataset-a" in f.name for f in rendered)  # the eval pair's edit caption is the prompt

    # the diffusers file loads into a plain Kandinsky5I2IPipeline (real processor) and reproduces the trained model
    from diffusers import Kandinsky5I2IPipeline

    pipe = Kandinsky5I2IPipeline.from_pretrained(tiny_i2i)
    g = torch.Generator().manual_seed(7)
    inputs = {
        "hidden_states": torch.randn(1, 1, 6, 8, 33, generator=g),
        "encoder_hidden_states": torch.randn(1, 9, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([400.0]),
        "visual_rope_pos": [torch.arange(1), torch.arange(3), torch.arange(4)],
        "text_rope_pos": torch.arange(9),
        "return_dict": False,
    }
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(result.lora.diffusers.parent)
        loaded, trained_out = pipe.transformer(**inputs)[0], trainer.transformer(**inputs)[0]
    assert (loaded - trained_out).abs().max() < 1e-5 and (trained_out - base).abs().max() > 1e-2

    # a second run reuses every cache entry, references and image prompts included
    again = Trainer(spec, ListSink())
    again.prepare()
    again.fill_caches()
    assert again.latent_report.encoded == 0 and again.text_report.encoded == 0
