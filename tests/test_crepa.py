"""CREPA on Kandinsky 5 video: the loss, the schedule, the capture, the teacher cache, the engine, SimpleTuner;
then the encoder-free backbone teacher on Kandinsky 5 image and Lumina 2.

The models are tiny and random but real: a Kandinsky 5 video pipeline with 4 visual blocks, a
``transformers.Dinov2Model`` saved to a folder and loaded back the way real weights are, and the
tiny Lumina 2 pipeline (2 main layers after the refiners).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from helpers.datasets import write_video_dataset
from helpers.measure import prepared_trainer
from safetensors.torch import load_file

from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.routing.crepa import (
    BlockCapture,
    CrepaScheduler,
    align_tokens,
    crepa_loss,
    crepa_terms,
    resolve_encoder,
)
from trainer_core.routing.kandinsky5 import tread_routing
from trainer_core.simpletuner import export_simpletuner, import_simpletuner
from trainer_core.spec import TrainSpec
from trainer_core.train.checkpoint import load_checkpoint
from trainer_core.train.engine import Trainer
from trainer_core.train.resolve import resolve_spec

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
BLOCKS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny K5 T2V pipeline with a 4-visual-block transformer (so a TREAD route fits inside)."""
    from diffusers import Kandinsky5Transformer3DModel

    from trainer_core.testing.tiny import build_tiny_kandinsky5_video, randomize_zero_init

    folder = build_tiny_kandinsky5_video(tmp_path_factory.mktemp("k5v"))
    cfg = dict(Kandinsky5Transformer3DModel.load_config(folder / "transformer"))
    cfg["num_visual_blocks"] = BLOCKS
    torch.manual_seed(0)
    t = Kandinsky5Transformer3DModel.from_config(cfg)
    randomize_zero_init(t)
    t.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def dino(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_dinov2

    return build_tiny_dinov2(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    return write_video_dataset(root / "clips", {"a": "a white ball rolls", "b": "a red square slides"}, frames=9)


def crepa_spec(tiny: Path, dino: Path, clips: Path, out: Path, crepa: dict | None = None, **training) -> TrainSpec:
    """Two 9-frame 48x32 clips (3 latent frames of 3x2 tokens), rank 4, adamw, fp32 on the CPU."""
    return TrainSpec.model_validate(
        {
            "output_dir": str(out),
            "model": {"model_family": "kandinsky5-video", "pretrained_model_name_or_path": str(tiny)},
            "lora": {"lora_rank": 4, "lora_alpha": 8},
            "optimizer": {"optimizer": "adamw", "learning_rate": 1e-2},
            "training": {
                "max_train_steps": 4,
                "mixed_precision": "no",
                "base_model_default_dtype": "fp32",
                "gradient_checkpointing": False,
                "seed": 0,
                **training,
            },
            "checkpointing": {"checkpoint_step_interval": None},
            "validation": {"validation_disable": True},
            "crepa": {
                "crepa_enabled": True,
                "crepa_block_index": 1,
                "crepa_encoder": str(dino),
                "crepa_encoder_image_size": 28,
                **(crepa or {}),
            },
            "datasets": [
                {
                    "id": "clips",
                    "dataset_type": "video",
                    "instance_data_dir": str(clips),
                    "resolution": 32,
                    "resolution_type": "pixel",
                    "cache_dir_vae": str(out.parent / f"{out.name}-vae"),
                    "video": {"num_frames": 9},
                },
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(out / "text")},
            ],
        }
    )


# ---------------------------------------------------------------------- the loss, by hand
def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _sim(p: torch.Tensor, t: torch.Tensor, b: int, f: int, k: int) -> float:
    """Mean over patches of cos(student frame f, teacher frame k), written out."""
    pu, tu = _unit(p[b, f]), _unit(t[b, k])
    return float(sum(float(pu[n] @ tu[n]) for n in range(p.shape[2])) / p.shape[2])


def test_the_loss_is_the_papers_eq_6_with_neighbours_at_exactly_d():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    tau, d = 0.7, 1
    w = math.exp(-d / tau)
    by_hand = []
    for b in range(2):
        frames = []
        for f in range(4):
            total = _sim(p, t, b, f, f)
            for k in (f - d, f + d):
                if 0 <= k < 4:
                    total += w * _sim(p, t, b, f, k)
            frames.append(total)
        by_hand.append(sum(frames) / 4)  # crepa_normalize_by_frames (default)
    expected = -sum(by_hand) / 2 * 0.5  # mean over clips, times crepa_lambda 0.5
    assert float(crepa_loss(p, t, 0.5, distance=d, tau=tau)) == pytest.approx(expected, rel=1e-5)
    # without the division by frames, the per-clip sum
    assert float(crepa_loss(p, t, 1.0, distance=d, tau=tau, normalize_by_frames=False)) == pytest.approx(
        -sum(by_hand) / 2 * 4, rel=1e-5
    )


def test_cumulative_neighbours_and_the_neighbour_sum_normalisation():
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(1, 5, 2, 3, generator=g), torch.randn(1, 5, 2, 3, generator=g)
    tau = 2.0
    terms = crepa_terms(p, t, distance=2, tau=tau, cumulative=True, normalize_neighbour_sum=True)
    for f in range(5):
        num, den = _sim(p, t, 0, f, f), 1.0
        for k in (1, 2):  # every distance 1..d, each with its own weight
            for j in (f - k, f + k):
                if 0 <= j < 5:
                    num += math.exp(-k / tau) * _sim(p, t, 0, f, j)
                    den += math.exp(-k / tau)
        assert float(terms.total[0, f]) == pytest.approx(num / den, rel=1e-5)
    # exactly d (the paper's K = {f-d, f+d}): distance 2 skips the frames at distance 1
    exact = crepa_terms(p, t, distance=2, tau=tau)
    assert float(exact.total[0, 2]) == pytest.approx(
        _sim(p, t, 0, 2, 2) + math.exp(-2 / tau) * (_sim(p, t, 0, 2, 0) + _sim(p, t, 0, 2, 4)), rel=1e-5
    )
    # distance 0 is per-frame REPA; a distance beyond the clip is capped at T - 1
    assert torch.allclose(crepa_terms(p, t, distance=0).total, crepa_terms(p, t, distance=0).self_sim)
    assert torch.allclose(crepa_terms(p, t, distance=9).total, crepa_terms(p, t, distance=4).total)


def test_token_grids_that_differ_meet_at_the_smaller_one_or_are_pooled():
    s, t = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 16, 4)  # student 2x3, teacher 4x4
    a, b = align_tokens(s, (2, 3), t, (4, 4))
    assert a.shape == (1, 2, 6, 4) and b.shape == (1, 2, 6, 4) and torch.equal(a, s)
    a, b = align_tokens(s, (2, 3), t, (4, 4), spatial_align=False)
    assert a.shape == b.shape == (1, 2, 1, 4) and torch.allclose(b[:, :, 0], t.mean(2))


def test_the_coefficient_schedule_warms_up_decays_and_cuts_off():
    cos = CrepaScheduler(base=0.5, kind="cosine", warmup_steps=10, decay_steps=110, lambda_end=0.1, total_steps=500)
    assert cos.weight(0) == 0.0 and cos.weight(5) == pytest.approx(0.25)
    assert cos.weight(10) == pytest.approx(0.5) and cos.weight(60) == pytest.approx(0.3)
    assert cos.weight(110) == pytest.approx(0.1) and cos.weight(400) == pytest.approx(0.1)
    lin = CrepaScheduler(base=1.0, kind="linear", total_steps=100)  # decay_steps 0: over the whole run
    assert lin.weight(50) == pytest.approx(0.5)
    poly = CrepaScheduler(base=1.0, kind="polynomial", power=2.0, decay_steps=10)
    assert poly.weight(5) == pytest.approx(0.25)
    assert CrepaScheduler(base=0.5, cutoff_step=3).weight(3) == 0.0
    ema = CrepaScheduler(base=0.5, similarity_threshold=0.9, similarity_ema_decay=0.5)
    assert ema.weight(0, similarity=0.8) == 0.5  # EMA 0.8
    assert ema.weight(1, similarity=1.0) == 0.0  # EMA 0.9: cut off, permanently
    saved = ema.state_dict()
    assert ema.weight(2, similarity=0.0) == 0.0
    again = CrepaScheduler(base=0.5, similarity_threshold=0.9, similarity_ema_decay=0.5)
    again.load_state_dict(saved)
    assert again.similarity_ema == pytest.approx(0.9) and again.weight(2, similarity=0.0) == 0.0
    rec = CrepaScheduler(base=0.5, similarity_threshold=0.9, similarity_ema_decay=0.0, threshold_mode="recoverable")
    assert rec.weight(0, similarity=0.95) == 0.0 and rec.weight(1, similarity=0.5) == 0.5


# ---------------------------------------------------------------------- configuration, before any model loads
def test_simpletuner_hub_names_map_to_hugging_face_repos():
    assert resolve_encoder("dinov2_vits14") == "facebook/dinov2-small"
    assert resolve_encoder("dinov2_vitb14") == "facebook/dinov2-base"
    assert resolve_encoder("dinov2_vitl14") == "facebook/dinov2-large"
    assert resolve_encoder("dinov2_vitg14") == "facebook/dinov2-giant"
    assert resolve_encoder("dino_v2_s") == "facebook/dinov2-small"  # SimpleTuner's aliases
    assert resolve_encoder("facebook/dinov2-with-registers-small") == "facebook/dinov2-with-registers-small"
    with pytest.raises(ConfigError, match="Qwen-VL teachers are not supported"):
        resolve_encoder("qwen3-vl-4b")
    with pytest.raises(ConfigError, match="neither a DINOv2 name"):
        resolve_encoder("dinov2")


def test_hub_names_load_from_the_hugging_face_cache_offline_never_torch_hub(dino, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from trainer_core.errors import ModelLoadError
    from trainer_core.routing.crepa import DinoTeacher, encoder_dim
    from trainer_core.testing.tiny import install_in_hf_cache

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("torch.hub must not be used"))
    install_in_hf_cache(dino, "facebook/dinov2-small", cache)
    source = resolve_encoder("dinov2_vits14")
    assert encoder_dim(source) == (16, 14)  # width and patch from the config alone
    teacher = DinoTeacher(source, 28, torch.device("cpu"))
    frames = torch.rand(3, 3, 32, 48)
    features = teacher.encode(frames)
    assert features.shape == (3, 4, 16) and teacher.grid == (2, 2)  # 28 px / 14: 2x2 patch tokens, CLS dropped
    assert not features.requires_grad
    with pytest.raises(ModelLoadError, match="facebook/dinov2-base"):
        encoder_dim(resolve_encoder("dinov2_vitb14"))  # not downloaded, offline: one clear error


def test_defaults_are_simpletuners_quick_start():
    c = TrainSpec().crepa
    assert not c.crepa_enabled
    assert (c.crepa_block_index, c.crepa_lambda, c.crepa_adjacent_distance, c.crepa_adjacent_tau) == (8, 0.5, 1, 1.0)
    assert (c.crepa_encoder, c.crepa_encoder_image_size) == ("dinov2_vitg14", 518)
    assert c.crepa_normalize_by_frames and not c.crepa_cumulative_neighbors and not c.crepa_normalize_neighbour_sum
    assert (c.crepa_scheduler, c.crepa_threshold_mode, c.crepa_similarity_ema_decay) == ("constant", "permanent", 0.99)


def test_refusals_before_any_model_loads(tiny, dino, clips, tmp_path):
    spec = crepa_spec(tiny, dino, clips, tmp_path / "o")
    image = spec.model_copy(deep=True)
    image.model.model_family = "kandinsky5-image"
    image.datasets[0].dataset_type = "image"
    with pytest.raises(ConfigError, match=r"crepa_feature_source 'encoder' is not available for kandinsky5-image"):
        resolve_spec(image, "cpu")  # images: the encoder-free backbone teacher only (below)
    lumina = image.model_copy(deep=True)
    lumina.model.model_family = "lumina2"  # Lumina 2 likewise: the backbone teacher only (tests below)
    with pytest.raises(ConfigError, match=r"crepa_feature_source 'encoder' is not available for lumina2 "
                       r"\(it has: backbone\)"):  # fmt: skip
        resolve_spec(lumina, "cpu")
    missing = spec.model_copy(deep=True)
    missing.crepa.crepa_encoder = str(tmp_path / "no-such-dino")
    with pytest.raises(ConfigError, match="crepa_encoder folder .*no-such-dino does not exist"):
        resolve_spec(missing, "cpu")
    (tmp_path / "empty").mkdir()
    empty = spec.model_copy(deep=True)
    empty.crepa.crepa_encoder = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_spec(empty, "cpu")
    with pytest.raises(ValueError, match="crepa_adjacent_tau"):
        TrainSpec.model_validate({"crepa": {"crepa_adjacent_tau": 0}})


def test_a_block_index_beyond_the_model_is_refused_when_it_loads(tiny, dino, clips, tmp_path):
    spec = crepa_spec(tiny, dino, clips, tmp_path / "o", {"crepa_block_index": 8})  # the quick-start 8; 4 blocks here
    trainer = Trainer(spec, ListSink())
    trainer.prepare()
    trainer.fill_caches()
    with pytest.raises(ConfigError, match=r"crepa_block_index 8 is out of range: this transformer has 4 visual blocks"):
        trainer.build_model()


# ---------------------------------------------------------------------- capture
def test_with_tread_the_captured_block_holds_every_token(tiny):
    from trainer_core.families import get_family_class

    spec = TrainSpec.model_validate(
        {"model": {"model_family": "kandinsky5-video", "pretrained_model_name_or_path": str(tiny)}}
    )
    fam = get_family_class("kandinsky5-video")(spec)
    t = fam.load_transformer(torch.device("cpu"), torch.float32).train()
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 3, 4, 6, 16, generator=g)  # 3 latent frames of 2x3 tokens
    text = {
        "prompt_embeds": torch.randn(2, 5, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
        "prompt_lengths": torch.tensor([5, 3]),  # two forward calls
    }
    sigma = torch.tensor([0.3, 0.7])
    route = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]}
    raw: list[torch.Tensor] = []
    handle = t.visual_transformer_blocks[1].register_forward_hook(lambda m, a, out: raw.append(out))
    with BlockCapture(t, 0) as before, BlockCapture(t, 1) as cap, tread_routing(t, route) as router:
        fam.model_input(t, noisy)  # (no-op) the family's own input path is used below
        outs = []
        for idx in fam.forward_calls(text):
            n = int(text["prompt_lengths"][idx[0]])
            outs.append(
                t(
                    hidden_states=fam.model_input(t, noisy[idx]),
                    encoder_hidden_states=text["prompt_embeds"][idx, :n],
                    pooled_projections=text["pooled_prompt_embeds"][idx],
                    timestep=sigma[idx] * 1000,
                    visual_rope_pos=fam.visual_rope_pos(t, noisy),
                    text_rope_pos=torch.arange(n),
                    scale_factor=fam.scale_factor,
                    return_dict=False,
                )
            )
        kept = router.kept[0]  # the last call's kept tokens (batch 1)
    handle.remove()
    assert raw[-1].shape[1] == 9  # block 1 itself ran on half of the 18 tokens
    hidden = cap.hidden(fam.forward_calls(text), 3, 6)
    assert hidden.shape == (2, 3, 6, 48)  # every token of every frame
    last = cap.outputs[-1][0]  # the second call: sample 0 (caption length 5)
    dropped = torch.ones(18, dtype=torch.bool)
    dropped[kept[0]] = False
    assert torch.equal(last[kept[0]], raw[-1][0])  # kept tokens: block 1's output
    assert torch.equal(last[dropped], before.outputs[-1][0][dropped])  # dropped: their pre-route values
    assert torch.equal(hidden[0].reshape(18, 48), last)


# ---------------------------------------------------------------------- the engine
def test_gradients_reach_the_projector_and_the_lora_never_dinov2(tiny, dino, clips, tmp_path):
    spec = crepa_spec(tiny, dino, clips, tmp_path / "o", {"crepa_teacher_cache": False}, max_train_steps=1)
    trainer = prepared_trainer(spec)
    seen: dict[str, float] = {}
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen["projector"] = sum(float(p.grad.abs().sum()) for p in trainer.crepa.projector.parameters())
        seen["lora"] = sum(float(p.grad.abs().sum()) for p in trainer.params if p.grad is not None)
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    result = trainer.train()
    assert seen["projector"] > 0 and seen["lora"] > 0
    teacher = trainer.teacher.teacher.model
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in trainer.teacher.vae.parameters())
    progress = trainer.events.of("progress")
    # logged with the step: the loss is -score * lambda (every clip has as many frames), score = mean similarity
    event = progress[0]
    assert event["crepa_loss"] == pytest.approx(-event["crepa_alignment_score"] * 0.5, rel=1e-5)
    assert -1 <= event["crepa_similarity_self"] <= 1 and event["crepa_weight"] == 0.5 and result.steps == 1
    # kept for the loss plot (a second line) and in the checkpoint, so a resumed run draws it whole
    assert result.crepa_history == [[1, event["crepa_loss"]]]
    assert load_checkpoint(result.checkpoint).state.crepa_history == result.crepa_history
    # the projector is kept out of the LoRA files
    lora = load_file(str(tmp_path / "o" / "pytorch_lora_weights.safetensors"))
    assert lora and not any("crepa" in k or "projector" in k for k in lora)


def test_with_crepa_off_a_run_is_todays_bit_for_bit(tiny, dino, clips, tmp_path):
    """No hook, no projector, the optimizer over the LoRA only: the other crepa_* values change nothing."""
    base = crepa_spec(tiny, dino, clips, tmp_path / "a", {"crepa_enabled": False})
    other = crepa_spec(
        tiny, dino, clips, tmp_path / "b", {"crepa_enabled": False, "crepa_block_index": 3, "crepa_lambda": 2.0}
    )
    a, b = prepared_trainer(base), prepared_trainer(other)
    assert a.crepa is None and a.teacher is None and not a.transformer.visual_transformer_blocks[1]._forward_hooks
    assert [p for g in a.optimizer.param_groups for p in g["params"]] == list(a.params)
    ra, rb = a.train(), b.train()
    assert ra.loss_history == rb.loss_history
    la = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    lb = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert not any("crepa" in p.name for p in (tmp_path / "a" / "checkpoints").rglob("*"))


def resumable(tiny: Path, dino: Path, clips: Path, out: Path) -> TrainSpec:
    """A schedule with state (warmup, decay, similarity EMA), block 1 inside a TREAD route, gradient checkpointing."""
    crepa = {"crepa_scheduler": "linear", "crepa_warmup_steps": 2, "crepa_similarity_threshold": 5.0}
    spec = crepa_spec(tiny, dino, clips, out, crepa, max_train_steps=6, gradient_checkpointing=True)
    spec.routing.tread_config = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]}
    return spec


def test_resume_with_crepa_equals_the_uninterrupted_run(tiny, dino, clips, tmp_path):
    straight = Trainer(resumable(tiny, dino, clips, tmp_path / "straight")).run()
    cancel = threading.Event()

    class CancelAtStep3(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 3:
                cancel.set()

    spec = resumable(tiny, dino, clips, tmp_path / "split")
    first = Trainer(spec, CancelAtStep3(), cancel=cancel).run()
    assert first.cancelled and first.steps == 3
    assert (tmp_path / "split" / "checkpoints" / "step-3" / "crepa.safetensors").is_file()
    second = Trainer(spec, ListSink()).run()
    assert second.resumed_from.name == "step-3" and second.steps == 6
    assert [h[1] for h in second.loss_history] == pytest.approx([h[1] for h in straight.loss_history], rel=1e-6)
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    # turning CREPA off cannot continue it, even with resume_with_changes: the projector is in the checkpoint
    off = resumable(tiny, dino, clips, tmp_path / "split")
    off.crepa.crepa_enabled = False
    off.training.max_train_steps = 8
    off.checkpointing.resume_with_changes = True
    with pytest.raises(ConfigError, match=r"resume_with_changes cannot continue checkpoint step-6(.|\n)*crepa_enabled"):
        Trainer(off, ListSink()).run()


def test_the_teacher_features_are_cached_so_epoch_2_and_later_runs_decode_nothing(tiny, dino, clips, tmp_path):
    spec = crepa_spec(tiny, dino, clips, tmp_path / "one", num_train_epochs=2, max_train_steps=None)
    trainer = prepared_trainer(spec)
    assert trainer.teacher.computed == 2 and trainer.teacher.vae is None  # the pre-pass, then released
    trainer.train()
    assert trainer.teacher.computed == 2 and trainer.teacher.teacher is None  # epochs 1 and 2 read the cache
    files = sorted((tmp_path / "one-vae" / "crepa").rglob("*.safetensors"))
    assert len(files) == 2 and load_file(str(files[0]))["features"].shape == (3, 4, 16)  # 3 frames, 2x2 patches
    again = crepa_spec(tiny, dino, clips, tmp_path / "two", max_train_steps=1)
    again.datasets[0].cache_dir_vae = str(tmp_path / "one-vae")  # another run over the same cache
    assert prepared_trainer(again).teacher.computed == 0  # same clips, same encoder: nothing decoded
    bigger = crepa_spec(tiny, dino, clips, tmp_path / "three", {"crepa_encoder_image_size": 42}, max_train_steps=1)
    bigger.datasets[0].cache_dir_vae = str(tmp_path / "one-vae")
    assert prepared_trainer(bigger).teacher.computed == 2  # another image size is another entry
    live = prepared_trainer(
        crepa_spec(tiny, dino, clips, tmp_path / "four", {"crepa_teacher_cache": False}, max_train_steps=3)
    )
    live.train()
    assert live.teacher.computed == 3  # without the cache: decoded at every draw (batch 1)


def test_teacher_features_are_dinov2_patch_tokens_of_the_decoded_frames_by_hand(tiny, dino, clips, tmp_path):
    """Posterior mean -> VAE decode -> 9 frames, of which linspace picks 3 (one per latent frame) -> resized to
    28 px square, ImageNet-normalised -> DINOv2's last hidden state without the CLS token."""
    from transformers import Dinov2Model

    trainer = prepared_trainer(crepa_spec(tiny, dino, clips, tmp_path / "o", max_train_steps=1))
    sample = trainer.index.samples[0]
    features = trainer.teacher.get([sample])[0]
    mean = trainer.latent_cache.load(sample)["mean"]  # (3, 4, 6, 16): 3 latent frames
    vae = trainer.family.load_vae(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        z = mean.permute(3, 0, 1, 2).unsqueeze(0) / vae.config.scaling_factor
        video = (vae.decode(z).sample[0].clamp(-1, 1) + 1) / 2  # (3, 9, 32, 48) in [0, 1]
        frames = video.permute(1, 0, 2, 3)[[0, 4, 8]]  # linspace(0, 8, 3)
        x = torch.nn.functional.interpolate(frames, size=(28, 28), mode="bilinear")
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
            1, 3, 1, 1
        )
        expected = Dinov2Model.from_pretrained(dino).eval()(pixel_values=x).last_hidden_state[:, 1:]
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- SimpleTuner
def test_simpletuner_import_export_round_trip(tiny, dino, clips, tmp_path):
    crepa = {"crepa_lambda": 0.3, "crepa_scheduler": "cosine", "crepa_similarity_threshold": 0.9}
    spec = crepa_spec(tiny, dino, clips, tmp_path / "o", {**crepa, "crepa_teacher_cache": False})
    config, backend = export_simpletuner(spec)
    assert config["crepa_enabled"] is True and config["crepa_block_index"] == 1 and config["crepa_lambda"] == 0.3
    assert config["crepa_encoder"] == str(dino) and config["crepa_encoder_image_size"] == 28
    assert config["comfyui_tuner"]["crepa_teacher_cache"] is False  # ours only
    assert import_simpletuner(config, backend).spec == spec
    # the quick-start block 8 is the default here, but SimpleTuner has none: it is always written
    quick = TrainSpec.model_validate({"crepa": {"crepa_enabled": True}})
    assert export_simpletuner(quick)[0]["crepa_block_index"] == 8


def test_simpletuner_configs_import_and_other_teachers_are_refused():
    result = import_simpletuner(
        {
            "crepa_enabled": True,
            "crepa_block_index": 8,
            "crepa_lambda": 0.5,
            "crepa_adjacent_distance": 1,
            "crepa_adjacent_tau": 1.0,
            "crepa_model": "dinov2_vits14",  # CrepaRegularizer's other spelling of crepa_encoder
            "crepa_encoder_image_size": 224,
            "crepa_normalize_by_frames": True,
            "crepa_cumulative_neighbors": False,
            "crepa_drop_vae_encoder": True,
            "crepa_feature_source": "external",  # SimpleTuner's alias of encoder
            "crepa_use_backbone_features": False,
            "crepa_warmup_steps": 100,
            "crepa_threshold_mode": "recoverable",
        }
    )
    c = result.spec.crepa
    assert c.crepa_enabled and c.crepa_encoder == "dinov2_vits14" and c.crepa_encoder_image_size == 224
    assert c.crepa_feature_source == "encoder"
    assert c.crepa_drop_vae_encoder and c.crepa_warmup_steps == 100 and c.crepa_threshold_mode == "recoverable"
    assert not any(k.startswith("crepa") for k in result.unsupported_keys)
    assert "crepa_use_tae" in import_simpletuner({"crepa_use_tae": True}).unsupported_keys  # a warning only
    # the encoder-free backbone teacher: the current key, its alias, and the legacy flag
    for config in ({"crepa_feature_source": "backbone"}, {"crepa_feature_source": "Internal"},
                   {"crepa_use_backbone_features": True}):  # fmt: skip
        spec = import_simpletuner({"crepa_enabled": True, "crepa_teacher_block_index": 12, **config}).spec
        assert spec.crepa.crepa_feature_source == "backbone" and spec.crepa.crepa_teacher_block_index == 12
    with pytest.raises(ConfigError, match="crepa_use_backbone_features asks for the backbone teacher"):
        import_simpletuner({"crepa_use_backbone_features": True, "crepa_feature_source": "encoder"})
    for key, value in [
        ("crepa_feature_source", "self_flow"),
        ("crepa_feature_source", "selfflow"),
        ("crepa_self_flow", True),
        ("irepa_enabled", True),
    ]:
        with pytest.raises(ConfigError, match=f"asks for a CREPA mode comfyui-tuner does not train(.|\n)*{key}"):
            import_simpletuner({"crepa_enabled": True, key: value})
    with pytest.raises(ConfigError, match="crepa_scheduler"):
        import_simpletuner({"crepa_scheduler": "exponential"})


# ---------------------------------------------------------------------- the encoder-free teacher (images too)
def test_the_backbone_teacher_is_a_deeper_block_detached(tiny):
    from trainer_core.families import get_family_class
    from trainer_core.routing.crepa import Captures

    spec = TrainSpec.model_validate(
        {"model": {"model_family": "kandinsky5-video", "pretrained_model_name_or_path": str(tiny)}}
    )
    fam = get_family_class("kandinsky5-video")(spec)
    t = fam.load_transformer(torch.device("cpu"), torch.float32).train()
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 3, 4, 6, 16, generator=g)
    text = {
        "prompt_embeds": torch.randn(1, 5, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        "prompt_lengths": torch.tensor([5]),
    }
    with Captures(t, 0, 2) as cap:
        fam.predict(t, noisy, torch.tensor([0.5]), text)
    student, teacher = cap.hidden(fam.forward_calls(text), 3, 6)
    assert student.requires_grad and not teacher.requires_grad and student.shape == teacher.shape == (1, 3, 6, 48)
    assert not torch.equal(student, teacher)
    with Captures(t, 1, 1) as same:  # SimpleTuner's default teacher block is the student's own
        fam.predict(t, noisy, torch.tensor([0.5]), text)
    student, teacher = same.hidden(fam.forward_calls(text), 3, 6)
    assert torch.equal(student, teacher) and not teacher.requires_grad
    with pytest.raises(ConfigError, match="crepa_teacher_block_index 9 is out of range"):
        Captures(t, 0, 9)


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    return build_tiny_kandinsky5_image(tmp_path_factory.mktemp("k5i"))


def test_kandinsky5_image_trains_with_the_backbone_teacher_and_no_encoder(tiny_image, tmp_path):
    from helpers.datasets import lumina_spec, write_dataset

    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue square on a plain background"})
    spec = TrainSpec.model_validate(
        lumina_spec(
            tiny_image, data, tmp_path / "out",
            model={"model_family": "kandinsky5-image", "pretrained_model_name_or_path": str(tiny_image)},
            training={"seed": 0, "max_train_steps": 3},
            optimizer={"optimizer": "adamw", "learning_rate": 1e-2},
            crepa={"crepa_enabled": True, "crepa_feature_source": "backbone", "crepa_block_index": 0,
                   "crepa_teacher_block_index": 1, "crepa_encoder": str(tmp_path / "never-read")},
        )
    )  # fmt: skip
    trainer = prepared_trainer(spec)
    assert trainer.teacher is None  # nothing decoded, no DINOv2
    projector = trainer.crepa.projector[1]
    assert (projector.in_features, projector.out_features) == (48, 48)  # hidden -> hidden
    seen = []
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen.append(float(trainer.crepa.projector[1].weight.grad.abs().sum()))
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    result = trainer.train()
    assert result.steps == 3 and all(g > 0 for g in seen)
    event = trainer.events.of("progress")[0]  # one frame: the score is the self-similarity (no neighbours)
    assert event["crepa_alignment_score"] == pytest.approx(event["crepa_similarity_self"])
    assert event["crepa_loss"] == pytest.approx(-0.5 * event["crepa_alignment_score"], rel=1e-5)


# ---------------------------------------------------------------------- Lumina 2: the backbone teacher
LUMINA_CAPTIONS = {"a": "a red circle", "b": "a blue square on a plain background, drawn with a thick black outline"}


def test_lumina2_captures_each_samples_image_tokens_and_drops_its_caption(tiny_lumina2):
    """Lumina 2's main layers run the joint sequence: per sample, its real caption tokens, its image tokens,
    then padding. With two caption lengths in one batch, each sample's image tokens start at its own length."""
    from trainer_core.families import get_family_class
    from trainer_core.routing.crepa import Captures, check_block_index

    spec = TrainSpec.model_validate(
        {"model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(tiny_lumina2)}}
    )
    fam = get_family_class("lumina2")(spec)
    t = fam.load_transformer(torch.device("cpu"), torch.float32).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 8, 6, generator=g)  # 4x3 image tokens
    embeds = torch.randn(2, 5, 32, generator=g)
    embeds[1, 3:] = 0  # sample 1's caption is 3 tokens, right-padded as collate_text pads it
    text = {"prompt_embeds": embeds, "prompt_attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2])}
    sigma = torch.tensor([0.3, 0.7])
    assert fam.token_grid(t, x0) == (1, 4, 3) and fam.crepa_hidden_size(t) == 48

    raw: list[torch.Tensor] = []
    handle = t.layers[0].register_forward_hook(lambda m, a, out: raw.append(out))  # by hand: the joint sequence
    with Captures(t, 0, 1) as cap:
        fam.predict(t, x0, sigma, text)
    handle.remove()
    select = fam.crepa_image_tokens(text)
    student, teacher = cap.hidden(fam.forward_calls(text), 1, 12, select)
    assert raw[0].shape == (2, 5 + 12, 48)  # the longest caption + the image tokens
    assert torch.equal(student[0, 0], raw[0][0, 5:17])  # sample 0: after its 5 caption tokens
    assert torch.equal(student[1, 0], raw[0][1, 3:15])  # sample 1: after its 3, then 2 padding positions
    assert student.requires_grad and not teacher.requires_grad and teacher.shape == (2, 1, 12, 48)
    assert not torch.equal(student, teacher)  # layer 1's output, not layer 0's

    # the same image tokens as sample 1 alone with its caption trimmed: padding changes nothing
    alone = {"prompt_embeds": embeds[1:, :3], "prompt_attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with Captures(t, 0) as single:
        fam.predict(t, x0[1:], sigma[1:], alone)
    solo = single.student.hidden(fam.forward_calls(alone), 1, 12, fam.crepa_image_tokens(alone))
    torch.testing.assert_close(solo[0], student[1], atol=1e-5, rtol=1e-5)

    with pytest.raises(ConfigError, match=r"crepa_block_index 2 is out of range: this transformer has 2 main layers"):
        check_block_index(2, t)  # the refiners are not counted, as SimpleTuner's layer_{i}


def lumina_crepa_spec(tiny_lumina2: Path, data: Path, out: Path, crepa: dict | None = None, **training) -> TrainSpec:
    """Two 64x64 images whose captions differ in length, in one batch of 2; student layer 0, teacher layer 1."""
    from helpers.datasets import lumina_spec

    return TrainSpec.model_validate(
        lumina_spec(
            tiny_lumina2, data, out,
            training={"seed": 0, "max_train_steps": 3, "train_batch_size": 2, **training},
            optimizer={"optimizer": "adamw", "learning_rate": 1e-2},
            crepa={"crepa_enabled": True, "crepa_feature_source": "backbone", "crepa_block_index": 0,
                   "crepa_teacher_block_index": 1, **(crepa or {})},
        )
    )  # fmt: skip


def test_lumina2_trains_with_the_backbone_teacher_on_image_tokens(tiny_lumina2, tmp_path):
    from helpers.datasets import write_dataset

    data = write_dataset(tmp_path / "data", LUMINA_CAPTIONS)
    trainer = prepared_trainer(lumina_crepa_spec(tiny_lumina2, data, tmp_path / "out"))
    assert trainer.teacher is None  # nothing decoded, no DINOv2
    projector = trainer.crepa.projector[1]
    assert (projector.in_features, projector.out_features) == (48, 48)  # hidden -> hidden
    lengths, sides, seen = [], [], []
    image_tokens, loss, step = trainer.family.crepa_image_tokens, trainer.crepa.loss, trainer.optimizer.step

    def spy_tokens(text):
        lengths.append(sorted(text["prompt_attention_mask"].sum(dim=1).tolist()))
        return image_tokens(text)

    def spy_loss(hidden, grid, teacher, at):
        sides.append((tuple(hidden.shape), hidden.requires_grad, teacher.requires_grad, grid))
        return loss(hidden, grid, teacher, at)

    def spy_step(*args, **kwargs):
        seen.append((float(projector.weight.grad.abs().sum()),
                     sum(float(p.grad.abs().sum()) for p in trainer.params if p.grad is not None)))  # fmt: skip
        return step(*args, **kwargs)

    trainer.family.crepa_image_tokens, trainer.crepa.loss, trainer.optimizer.step = spy_tokens, spy_loss, spy_step
    result = trainer.train()
    assert result.steps == 3 and all(math.isfinite(h[1]) for h in result.loss_history)
    assert all(a != b for a, b in lengths)  # every batch held two caption lengths
    # the student's 4x4 image tokens of both samples, the teacher detached
    assert sides == [((2, 1, 16, 48), True, False, (4, 4))] * 3
    assert all(p > 0 and lora > 0 for p, lora in seen)  # the projector and the LoRA both learn
    event = trainer.events.of("progress")[0]
    assert math.isfinite(event["crepa_loss"]) and event["crepa_alignment_score"] == pytest.approx(
        event["crepa_similarity_self"]
    )
    assert event["crepa_loss"] == pytest.approx(-0.5 * event["crepa_alignment_score"], rel=1e-5)
    lora = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert lora and not any("crepa" in k or "projector" in k for k in lora)


def test_lumina2_layer_indices_beyond_the_main_layers_are_refused_when_the_model_loads(tiny_lumina2, tmp_path):
    from helpers.datasets import write_dataset

    data = write_dataset(tmp_path / "data", LUMINA_CAPTIONS)
    spec = lumina_crepa_spec(tiny_lumina2, data, tmp_path / "out", {"crepa_teacher_block_index": 2})
    trainer = Trainer(spec, ListSink())
    trainer.prepare()
    trainer.fill_caches()
    with pytest.raises(ConfigError, match=r"crepa_teacher_block_index 2 is out of range: this transformer has 2 main "
                       r"layers \(0..1; the refiners are not counted\)"):  # fmt: skip
        trainer.build_model()


def test_lumina2_resume_with_crepa_equals_the_uninterrupted_run(tiny_lumina2, tmp_path):
    from helpers.datasets import write_dataset

    data = write_dataset(tmp_path / "data", LUMINA_CAPTIONS)
    crepa = {"crepa_scheduler": "linear", "crepa_warmup_steps": 2, "crepa_similarity_threshold": 5.0}

    def spec(out: Path) -> TrainSpec:
        return lumina_crepa_spec(tiny_lumina2, data, out, crepa, max_train_steps=6, gradient_checkpointing=True)

    straight = Trainer(spec(tmp_path / "straight")).run()
    cancel = threading.Event()

    class CancelAtStep3(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 3:
                cancel.set()

    first = Trainer(spec(tmp_path / "split"), CancelAtStep3(), cancel=cancel).run()
    assert first.cancelled and first.steps == 3
    assert (tmp_path / "split" / "checkpoints" / "step-3" / "crepa.safetensors").is_file()
    second = Trainer(spec(tmp_path / "split"), ListSink()).run()
    assert second.resumed_from.name == "step-3" and second.steps == 6
    assert [h[1] for h in second.loss_history] == pytest.approx([h[1] for h in straight.loss_history], rel=1e-6)
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_the_terminal_progress_line_shows_the_crepa_term_only_when_there_is_one():
    import io

    from trainer_core.events import TerminalSink

    out = io.StringIO()
    sink = TerminalSink(out)
    sink.emit("progress", step=2, total=2, loss=0.5, lr=1e-4, it_s=1.0, eta_s=0.0)
    sink.emit("progress", step=2, total=2, loss=0.5, lr=1e-4, it_s=1.0, eta_s=0.0, crepa_loss=-0.25,
              crepa_alignment_score=0.5)  # fmt: skip
    plain, crepa = out.getvalue().strip().splitlines()
    assert "crepa" not in plain and "loss 0.5000 lr 1.00e-04 crepa -0.2500 align 0.500 1.00 it/s" in crepa
