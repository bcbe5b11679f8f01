"""Full fine-tune (``model_type: full``) of a tiny Lumina 2, end to end.

One run (module fixture) trains every transformer weight for a few steps with EMA, recording the
weights after each step; the tests then read what it wrote: the loss fell, every weight moved, the
diffusers folder and the ComfyUI file reproduce the trained transformer, the EMA file is the
average the decay says, and a cancelled-then-resumed run ends bit-for-bit where the straight one did.
The opt-in test at the end (``COMFYUI_DIR``) loads the ComfyUI file into ComfyUI's own NextDiT.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from safetensors.torch import load_file

from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.spec import TrainSpec
from trainer_core.train import fullft
from trainer_core.train.comfy_model import lumina2_from_comfy, lumina2_to_comfy
from trainer_core.train.engine import RunResult, Trainer
from trainer_core.train.resolve import resolve_spec
from trainer_core.train.shards import LazyTensors, stream_safetensors, write_sharded

STEPS = 6
DECAY = 0.9
SHARD = 64 * 1024  # bytes: the tiny transformer's checkpoint comes in several shards


def full_spec(tiny_lumina2: Path, data: Path, out: Path, **overrides) -> TrainSpec:
    raw = lumina_spec(
        tiny_lumina2,
        data,
        out,
        model={"model_family": "lumina2", "pretrained_model_name_or_path": str(tiny_lumina2), "model_type": "full"},
        optimizer={"optimizer": "adamw", "learning_rate": 3e-3},
        training={
            "max_train_steps": STEPS,
            "train_batch_size": 1,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": True,
            "seed": 3,
            "use_ema": True,
            "ema_decay": DECAY,
        },
        checkpointing={"checkpoint_step_interval": 3, "checkpoints_total_limit": 1},
    )
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return TrainSpec.model_validate(raw)


def base_transformer(tiny_lumina2: Path) -> torch.nn.Module:
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel.from_pretrained(tiny_lumina2, subfolder="transformer").float().eval()


def eval_loss(trainer: Trainer, draws: int = 8) -> float:
    """Mean loss over fixed noise levels and noise, so before/after compare like with like."""
    gen = torch.Generator().manual_seed(1234)
    sample = trainer.index.samples[0]
    text = trainer.family.collate_text([trainer.batches.text(sample.captions[0])])
    x0 = trainer.latent_cache.load(sample)["mean"][None]
    losses = []
    with torch.no_grad():
        for i in range(draws):
            sigma = torch.tensor([(i + 0.5) / draws])
            noise = torch.randn(x0.shape, generator=gen)
            noisy = (1 - sigma) * x0 + sigma * noise
            pred = trainer.family.predict(trainer.transformer, noisy, sigma, text)
            losses.append(torch.mean((pred - trainer.family.target(x0, noise)) ** 2).item())
    return sum(losses) / len(losses)


def transformer_output(model: torch.nn.Module, cap_dim: int, in_channels: int) -> torch.Tensor:
    """A diffusers Lumina 2 transformer's prediction on fixed inputs."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, in_channels, 8, 8, generator=g)
    cap = torch.randn(1, 5, cap_dim, generator=g)
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        return model(x, torch.tensor([0.6]), cap, mask, return_dict=False)[0]


class StepRecorder(ListSink):
    """Keeps a copy of the trained weights after every optimizer step (the progress event follows it)."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Trainer | None = None
        self.weights: list[dict[str, torch.Tensor]] = []

    def emit(self, type, **payload):
        super().emit(type, **payload)
        if type == "progress" and self.trainer is not None:
            self.weights.append({k: v.clone() for k, v in self.trainer.adapter.state_dict().items()})


@dataclass
class Run:
    trainer: Trainer
    result: RunResult
    before: float
    after: float
    start: dict[str, torch.Tensor]
    steps: list[dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), {"img": "a red circle, tunertest style"})


@pytest.fixture(scope="module")
def run(tiny_lumina2, data, tmp_path_factory) -> Run:
    mp = pytest.MonkeyPatch()
    mp.setattr(fullft, "SHARD_BYTES", SHARD)
    try:
        sink = StepRecorder()
        trainer = Trainer(full_spec(tiny_lumina2, data, tmp_path_factory.mktemp("straight")), sink)
        sink.trainer = trainer
        trainer.prepare()
        trainer.fill_caches()
        trainer.build_model()
        start = {k: v.clone() for k, v in trainer.adapter.state_dict().items()}
        trainer.transformer.eval()
        before = eval_loss(trainer)
        trainer.transformer.train()
        result = trainer.train()
        trainer.transformer.eval()
        after = eval_loss(trainer)
    finally:
        mp.undo()
    return Run(trainer, result, before, after, start, sink.weights)


# ---------------------------------------------------------------------- training
def test_full_finetune_trains_every_transformer_weight_and_the_loss_falls(run: Run, tiny_lumina2):
    base = base_transformer(tiny_lumina2)
    names = [n for n, _ in base.named_parameters()]
    assert run.trainer.adapter.kind == "full"
    assert run.trainer.adapter.names == names  # Lumina 2: nothing stays frozen (as SimpleTuner)
    assert len(run.trainer.optimizer.param_groups[0]["params"]) == len(names)
    trained = run.trainer.adapter.state_dict()
    unchanged = [n for n, p in base.named_parameters() if torch.equal(p, trained[n])]
    assert not unchanged
    assert run.after < 0.8 * run.before, (run.before, run.after)
    live = dict(run.trainer.transformer.named_parameters())  # the checkpoint writes the weights, not a copy
    assert all(t.data_ptr() == live[n].data_ptr() for n, t in trained.items())
    assert run.result.steps == STEPS


def test_a_family_can_keep_parts_frozen_and_they_stay_as_loaded(tiny_lumina2, data, tmp_path, monkeypatch):
    from trainer_core.families.lumina2 import Lumina2Family

    monkeypatch.setattr(Lumina2Family, "full_finetune_frozen", ["x_embedder.*", "norm_out.*"])
    spec = full_spec(tiny_lumina2, data, tmp_path / "out", training={"max_train_steps": 2, "use_ema": False})
    trainer = Trainer(spec, ListSink())
    trainer.run()
    base = dict(base_transformer(tiny_lumina2).named_parameters())
    now = dict(trainer.transformer.named_parameters())
    frozen = [n for n in now if n.startswith(("x_embedder.", "norm_out."))]
    assert frozen and frozen == trainer.adapter.frozen_names
    for n in frozen:
        assert torch.equal(now[n], base[n]) and not now[n].requires_grad, n
    for n in trainer.adapter.names:
        assert not torch.equal(now[n], base[n]), n


def test_resume_after_cancel_equals_the_straight_run(run: Run, tiny_lumina2, data, tmp_path, monkeypatch):
    monkeypatch.setattr(fullft, "SHARD_BYTES", SHARD)
    cancel = threading.Event()

    class CancelAtStep2(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 2:
                cancel.set()

    spec = full_spec(tiny_lumina2, data, tmp_path / "split")
    first = Trainer(spec, CancelAtStep2(), cancel=cancel).run()
    assert first.cancelled and first.steps == 2
    folder = first.checkpoint
    shards = sorted(folder.glob("adapter-*-of-*.safetensors"))
    assert len(shards) > 1 and not (folder / "lora").exists()  # sharded weights, no export copy beside them
    second = Trainer(spec, ListSink()).run()
    assert second.resumed_from.name == "step-2" and second.steps == STEPS
    assert [h[1] for h in second.loss_history] == pytest.approx([h[1] for h in run.result.loss_history], rel=1e-6)
    for a, b in ((run.result.lora, second.lora), (run.result.ema_lora, second.ema_lora)):
        sa, sb = load_file(str(a.comfyui)), load_file(str(b.comfyui))
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


def test_checkpoint_weights_are_read_back_one_tensor_at_a_time(run: Run, tmp_path):
    from trainer_core.train.checkpoint import damage, list_checkpoints

    folder = run.result.checkpoint
    assert [d.name for _, d in list_checkpoints(run.result.output_dir)] == ["step-6"]  # keep-last-K (1)
    lazy = LazyTensors(folder, "adapter")
    live = run.trainer.adapter.state_dict()
    assert set(lazy) == set(live)
    assert all(torch.equal(lazy[k], live[k]) for k in live)
    manifest = (folder / "manifest.json").read_text()
    shards = sorted(folder.glob("adapter-*.safetensors"))
    assert len(shards) > 1 and all(p.name in manifest for p in shards)
    copy = tmp_path / "step-6"  # a shard damaged after the save is caught by its checksum
    shutil.copytree(folder, copy)
    data = bytearray(shards[-1].read_bytes())
    data[-1] ^= 0xFF
    (copy / shards[-1].name).write_bytes(bytes(data))
    assert shards[-1].name in damage(copy) and damage(folder) is None


# ---------------------------------------------------------------------- outputs
def test_the_diffusers_folder_loads_as_a_pipeline_and_reproduces_the_trained_transformer(run: Run):
    from diffusers import Lumina2Pipeline

    folder = run.result.lora.diffusers
    pipe = Lumina2Pipeline.from_pretrained(folder)
    model = run.trainer.transformer.eval()
    c = model.config
    expected = transformer_output(model, c.cap_feat_dim, c.in_channels)
    got = transformer_output(pipe.transformer.float().eval(), c.cap_feat_dim, c.in_channels)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert (folder / "model_index.json").is_file() and (folder / "vae").is_dir()


def test_the_comfyui_file_has_comfyuis_lumina2_names_and_reproduces_the_trained_transformer(run: Run):
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
    from safetensors import safe_open

    with safe_open(str(run.result.lora.comfyui), framework="pt") as f:
        meta = f.metadata()
    assert meta["comfyui_tuner.adapter_type"] == "full" and meta["comfyui_tuner.family"] == "lumina2"
    assert "ss_network_dim" not in meta and "comfyui_tuner.rank" not in meta  # a model, not a LoRA
    sd = load_file(str(run.result.lora.comfyui))
    # what ComfyUI's model_detection looks for to recognise Lumina 2
    assert "cap_embedder.1.weight" in sd and "noise_refiner.0.attention.k_norm.weight" in sd
    assert not any(".attn." in k or "time_caption_embed" in k for k in sd)
    model = run.trainer.transformer.eval()
    c = model.config
    kv_rows = c.num_kv_heads * (c.hidden_size // c.num_attention_heads)
    # back to diffusers' names by diffusers' own converter (ComfyUI checkpoints -> diffusers), all but the
    # fused qkv, whose split it hard-codes at the full model's size: that is cut at q | k | v rows here
    plain = {k: v for k, v in sd.items() if ".attention.qkv." not in k}
    back = convert_lumina2_to_diffusers(dict(plain))
    for k in (k for k in sd if ".attention.qkv." in k):
        stem, leaf = k.split(".attention.qkv.")
        for p, t in zip("qkv", torch.split(sd[k], [c.hidden_size, kv_rows, kv_rows])):
            back[f"{stem}.attn.to_{p}.{leaf}"] = t
    fresh = Lumina2Transformer2DModel.from_config(c).float().eval()
    fresh.load_state_dict(back, strict=True)
    expected = transformer_output(model, c.cap_feat_dim, c.in_channels)
    torch.testing.assert_close(transformer_output(fresh, c.cap_feat_dim, c.in_channels), expected, atol=0, rtol=0)
    # our inverse map gives the same tensors under the same names
    ours = lumina2_from_comfy(sd, c.hidden_size, kv_rows)
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in back)


def test_the_ema_files_hold_the_average_the_decay_says(run: Run):
    expected = {k: v.clone() for k, v in run.start.items()}
    for n, weights in enumerate(run.steps):
        d = min(DECAY, (1 + n) / (10 + n))
        for k in expected:
            expected[k].lerp_(weights[k].float(), 1 - d)
    ema = load_file(str(run.result.ema_lora.comfyui))
    raw = load_file(str(run.result.lora.comfyui))
    want = dict(lumina2_to_comfy(expected))
    assert ema.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(ema[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert any(not torch.allclose(ema[k], raw[k]) for k in raw)
    pipe_sd = LazyTensors(run.result.ema_lora.diffusers / "transformer", "diffusion_pytorch_model")  # sharded
    for k, v in expected.items():
        torch.testing.assert_close(pipe_sd[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_the_export_never_replaces_a_folder_it_did_not_write(run: Run, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="not a model folder written by a fine-tune"):
        run.trainer.adapter.save(tmp_path, "checkpoints", {})
    assert (tmp_path / "checkpoints").is_dir()


def test_sharded_transformer_weights_load_with_from_pretrained(tiny_lumina2, tmp_path):
    from diffusers import Lumina2Transformer2DModel

    base = base_transformer(tiny_lumina2)
    base.save_config(tmp_path / "t")
    files = write_sharded(tmp_path / "t", "diffusion_pytorch_model", base.state_dict(), max_bytes=SHARD)
    assert len(files) > 2  # several shards and the index
    back = Lumina2Transformer2DModel.from_pretrained(tmp_path / "t").float()
    for k, v in base.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("optimizer", "weights"),
    [("adamw_bf16", torch.bfloat16), ("optimi-adamw", torch.bfloat16), ("adamw", torch.float32)],
)
def test_bf16_weights_train_with_adamw_bf16_and_other_optimizers_get_fp32_master_weights(
    tiny_lumina2, data, tmp_path, optimizer, weights
):
    training = {"max_train_steps": 1, "mixed_precision": "bf16", "base_model_default_dtype": "bf16", "use_ema": False}
    spec = full_spec(tiny_lumina2, data, tmp_path / "out", optimizer={"optimizer": optimizer}, training=training)
    trainer = Trainer(spec, ListSink(), honour_precision_on_cpu=True)
    result = trainer.run()
    assert {p.dtype for p in trainer.adapter.params} == {weights}
    assert trainer.transformer.is_gradient_checkpointing
    written = load_file(str(result.lora.comfyui))  # the files keep the dtype the base was loaded in
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    base = base_transformer(tiny_lumina2).state_dict()
    assert not torch.equal(written["x_embedder.weight"].float(), base["x_embedder.weight"].bfloat16().float())


def test_streamed_safetensors_read_back_as_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=g), "a": torch.randn(7, generator=g), "e": torch.zeros(0, 2)}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    stream_safetensors(tmp_path / "x.safetensors", shapes, tensors.__getitem__, torch.bfloat16, {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v.bfloat16()), k


# ---------------------------------------------------------------------- refusals, before any model loads
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"lora": {"lora_type": "lycoris", "lycoris": {"algo": "lokr"}}}, "lora_type 'lycoris'"),
        ({"lora": {"use_dora": True}}, "use_dora"),
        ({"lora": {"init_lora": "x.safetensors"}}, "init_lora"),
        ({"memory": {"enable_group_offload": True}}, "enable_group_offload"),
        ({"memory": {"base_model_precision": "int8-torchao"}}, "base_model_precision"),
    ],
)
def test_full_finetune_refuses_what_cannot_work(tiny_lumina2, data, tmp_path, override, words):
    spec = full_spec(tiny_lumina2, data, tmp_path / "out", **override)
    with pytest.raises(ConfigError, match=words) as e:
        resolve_spec(spec, "cpu")
    assert "model_type" in str(e.value)


def test_a_full_finetune_clips_gradients_at_1_by_default_and_warns_without_clipping(
    tiny_lumina2, data, tmp_path, monkeypatch
):
    spec = full_spec(tiny_lumina2, data, tmp_path / "out")
    assert "max_grad_norm" not in spec.optimizer.model_fields_set  # the default, not set by full_spec
    resolved, _, warnings = resolve_spec(spec, "cpu")
    assert (resolved.optimizer.max_grad_norm, resolved.optimizer.grad_clip_method) == (1.0, "norm")
    assert not [w for w in warnings if "clipping" in w]
    _, _, warnings = resolve_spec(full_spec(tiny_lumina2, data, tmp_path / "o", optimizer={"max_grad_norm": 0}), "cpu")
    assert any("without gradient clipping" in w and "1.0 is recommended" in w for w in warnings)

    from trainer_core.train import engine

    seen: list[float] = []
    plain = engine.clip_gradients

    def spy(params, opt_spec):
        norm = plain(params, opt_spec)
        seen.append(opt_spec.max_grad_norm)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        assert after.item() <= 1.0 + 1e-4  # every weight's gradient together, clipped to norm 1
        return norm

    monkeypatch.setattr(engine, "clip_gradients", spy)
    short = full_spec(tiny_lumina2, data, tmp_path / "clip", training={"max_train_steps": 2, "use_ema": False})
    Trainer(short, ListSink()).run()
    assert seen == [1.0, 1.0]


def test_a_family_without_full_finetune_is_refused(tiny_lumina2, data, tmp_path, monkeypatch):
    from trainer_core.families.lumina2 import Lumina2Family

    monkeypatch.setattr(Lumina2Family, "supports_full_finetune", False)
    with pytest.raises(ConfigError, match="model_type 'full' is not available for lumina2"):
        resolve_spec(full_spec(tiny_lumina2, data, tmp_path / "out"), "cpu")


# ---------------------------------------------------------------------- Kandinsky 5 image
@pytest.mark.usefixtures("one_cpu_thread")
def test_a_tiny_kandinsky5_image_full_finetune_trains_and_exports(data, tmp_path):
    from diffusers import Kandinsky5Transformer3DModel

    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    tiny = build_tiny_kandinsky5_image(tmp_path / "k5")
    model = {"model_family": "kandinsky5-image", "pretrained_model_name_or_path": str(tiny), "model_type": "full"}
    spec = full_spec(tiny, data, tmp_path / "out", model=model, training={"max_train_steps": 2})
    trainer = Trainer(spec, ListSink())
    result = trainer.run()
    base = dict(Kandinsky5Transformer3DModel.from_pretrained(tiny, subfolder="transformer").named_parameters())
    trained = trainer.adapter.state_dict()
    assert trainer.adapter.names == list(base)  # every weight trains
    assert all(not torch.equal(trained[n], base[n].float()) for n in base)
    back = Kandinsky5Transformer3DModel.from_pretrained(result.lora.diffusers, subfolder="transformer")
    for n, p in back.named_parameters():
        assert torch.equal(p, trained[n]), n
    comfy_sd = load_file(str(result.lora.comfyui))
    assert "visual_transformer_blocks.0.cross_attention.key_norm.weight" in comfy_sd  # ComfyUI's K5 detector key
    assert set(comfy_sd) == set(back.state_dict())


@pytest.mark.usefixtures("one_cpu_thread")
def test_a_tiny_kandinsky5_video_full_finetune_trains_and_exports(tmp_path):
    from diffusers import Kandinsky5Transformer3DModel
    from helpers.datasets import write_video_dataset

    from trainer_core.testing.tiny import build_tiny_kandinsky5_video

    tiny = build_tiny_kandinsky5_video(tmp_path / "k5v")
    clips = write_video_dataset(tmp_path / "clips", {"a": "a square moving right"}, frames=17, size=(48, 32))
    raw = lumina_spec(tiny, clips, tmp_path / "out")
    raw["model"] = {
        "model_family": "kandinsky5-video",
        "model_flavour": "t2v-lite-sft-5s",
        "pretrained_model_name_or_path": str(tiny),
        "model_type": "full",
    }
    raw["training"]["max_train_steps"] = 2
    raw["checkpointing"] = {"checkpoint_step_interval": None}
    raw["datasets"][0].update(
        {"dataset_type": "video", "resolution": 32, "resolution_type": "pixel", "video": {"num_frames": 17}}
    )
    trainer = Trainer(TrainSpec.model_validate(raw), ListSink())
    result = trainer.run()
    base = dict(Kandinsky5Transformer3DModel.from_pretrained(tiny, subfolder="transformer").named_parameters())
    trained = trainer.adapter.state_dict()
    assert trainer.adapter.names == list(base)
    assert all(not torch.equal(trained[n], base[n].float()) for n in base)
    comfy_sd = load_file(str(result.lora.comfyui))
    assert set(comfy_sd) == set(trained) and all(torch.equal(comfy_sd[n], trained[n]) for n in trained)


# ---------------------------------------------------------------------- real ComfyUI (opt-in)
COMFY_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
root, weights, config, inputs, out = sys.argv[1:]
sys.path.insert(0, root)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ops
from comfy.ldm.lumina.model import NextDiT
net = NextDiT(**json.loads(config), operations=comfy.ops.disable_weight_init, dtype=torch.float32).eval()
result = net.load_state_dict(load_file(weights), strict=True)
i = load_file(inputs)
with torch.no_grad():  # ComfyUI's NextDiT takes sigma and returns the negated prediction
    y = -net(i["x"], i["sigma"], i["cap"], i["cap"].shape[1])
save_file({"y": y.contiguous()}, out)
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout")
def test_comfyuis_own_nextdit_loads_the_file_strictly_and_gives_the_trained_output(run: Run, tmp_path):
    """ComfyUI's NextDiT (only its model module is imported, in a subprocess, so no torchvision is needed)."""
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file

    model = run.trainer.transformer.eval()
    c = model.config
    config = {
        "patch_size": c.patch_size,
        "in_channels": c.in_channels,
        "dim": c.hidden_size,
        "cap_feat_dim": c.cap_feat_dim,
        "n_layers": c.num_layers,
        "n_refiner_layers": c.num_refiner_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_kv_heads,
        "qk_norm": True,
        "multiple_of": c.multiple_of,
        "ffn_dim_multiplier": 4.0 * (c.ffn_dim_multiplier or 1.0),  # ComfyUI widens from dim, diffusers 4 * dim
        "norm_eps": c.norm_eps,
        "axes_dims": list(c.axes_dim_rope),
        "axes_lens": list(c.axes_lens),
        "rope_theta": 10000.0,
    }
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, c.in_channels, 8, 8, generator=g)
    cap = torch.randn(1, 5, c.cap_feat_dim, generator=g)
    save_file({"x": x, "cap": cap, "sigma": torch.tensor([0.4])}, tmp_path / "in.safetensors")
    script = tmp_path / "comfy_nextdit.py"
    script.write_text(COMFY_SCRIPT)
    args = [str(run.result.lora.comfyui), json.dumps(config), str(tmp_path / "in.safetensors"), str(tmp_path / "y")]
    proc = subprocess.run(
        [sys.executable, str(script), os.environ["COMFYUI_DIR"], *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "y"))["y"]
    with torch.no_grad():
        expected = model(x, torch.tensor([0.6]), cap, torch.ones(1, 5, dtype=torch.bool), return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
