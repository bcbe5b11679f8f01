"""Memory features on tiny models (CPU): quantised base, group offload, start-up sequencing, report."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from helpers.measure import train_and_measure
from safetensors.torch import load_file

from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.families import get_family_class
from trainer_core.memory import check as memory_check
from trainer_core.memory import offload as memory_offload
from trainer_core.memory.check import check_memory_spec, use_stream
from trainer_core.memory.offload import GroupOffloader
from trainer_core.memory.quantize import exclude_patterns, is_excluded, quantize_model
from trainer_core.memory.startup import Startup
from trainer_core.spec import TrainSpec
from trainer_core.train.engine import Trainer

CPU = torch.device("cpu")
EVENT_FIELDS = {
    "device",
    "dtype",
    "quantization",
    "offload",
    "parameters",
    "trainable_parameters",
    "quantized_parameters",
    "transformer_bytes",
    "transformer_device_bytes",
    "cuda_allocated",
    "cuda_peak",
    "rss_bytes",
    "peak_rss_bytes",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and results do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("memdata") / "data", {"img": "a red circle, tunertest style"})


@pytest.fixture(scope="module")
def tiny_k5(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    return build_tiny_kandinsky5_image(tmp_path_factory.mktemp("k5"))


@pytest.fixture
def poisoned(monkeypatch):
    """Offloaded weights become meta tensors: a weight used without being onloaded breaks the result."""
    monkeypatch.setattr(memory_offload, "POISON_DEFAULT", True)


def make_spec(model: Path, data: Path, out: Path, memory: dict | None = None, **overrides) -> TrainSpec:
    raw = lumina_spec(model, data, out, **overrides)
    raw["memory"] = memory or {}
    return TrainSpec.model_validate(raw)


def train(spec: TrainSpec, sink: ListSink | None = None) -> tuple[Trainer, float, float]:
    trainer, _, before, after = train_and_measure(spec, sink, first_sample_only=True)
    return trainer, before, after


def lumina_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, 8, 8, generator=g),
        "timestep": torch.tensor([0.4]),
        "encoder_hidden_states": torch.randn(1, 9, 32, generator=g),
        "encoder_attention_mask": torch.ones(1, 9, dtype=torch.long),
    }


# ----------------------------------------------------------------------------- quantised base
QUANTO_TRAIN = dict(
    training={
        "max_train_steps": 30,
        "mixed_precision": "no",
        "base_model_default_dtype": "fp32",
        "gradient_checkpointing": False,
        "seed": 0,
    },
    optimizer={"optimizer": "adamw", "learning_rate": 1e-2},
    lora={"lora_rank": 8, "lora_alpha": 8, "lora_target_preset": "attention+ffn"},
    checkpointing={"checkpoint_step_interval": None},
)


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-quanto", "int4-quanto"])
def test_quanto_base_trains_and_its_lora_loads_on_an_unquantised_model(tiny_lumina2, image_dir, tmp_path, precision):
    from diffusers import Lumina2Pipeline
    from optimum.quanto.nn import QLinear

    sink = ListSink()
    spec = make_spec(tiny_lumina2, image_dir, tmp_path / "out", {"base_model_precision": precision}, **QUANTO_TRAIN)
    trainer, before, after = train(spec, sink)
    assert after < 0.85 * before, (precision, before, after)

    tr = trainer.transformer
    assert isinstance(tr.get_submodule("layers.0.attn.to_q").base_layer, QLinear)  # PEFT wraps the QLinear
    assert type(tr.get_submodule("x_embedder")) is torch.nn.Linear  # excluded: full precision
    event = [e for e in sink.of("memory") if e.get("stage") == "training"][0]
    assert EVENT_FIELDS <= event.keys()
    assert event["quantization"] == precision and event["quantized_parameters"] > 0
    assert event["trainable_parameters"] == sum(p.numel() for p in trainer.params)

    # the LoRA file loads into a plain (unquantised) pipeline and moves its output towards the trained model
    pipe = Lumina2Pipeline.from_pretrained(tiny_lumina2)
    x = lumina_inputs()
    with torch.no_grad():
        trained = tr(**x, return_dict=False)[0]
        base = pipe.transformer(**x, return_dict=False)[0]
        pipe.load_lora_weights(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
        loaded = pipe.transformer(**x, return_dict=False)[0]
    assert not torch.allclose(loaded, base, atol=1e-4)
    assert (loaded - trained).abs().mean() < 0.5 * (base - trained).abs().mean()


def _torchao_works() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _torchao_works(), reason="torchao is not installed (optional; pip install torchao)")
@pytest.mark.parametrize("precision", ["int8-torchao", "fp8-torchao"])
def test_torchao_base_trains_and_its_lora_loads_on_an_unquantised_model(tiny_lumina2, image_dir, tmp_path, precision):
    from diffusers import Lumina2Pipeline

    spec = make_spec(tiny_lumina2, image_dir, tmp_path / "out", {"base_model_precision": precision}, **QUANTO_TRAIN)
    trainer, before, after = train(spec, ListSink())
    assert after < 0.85 * before, (precision, before, after)
    weight = trainer.transformer.get_submodule("layers.0.attn.to_q").base_layer.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)  # a torchao tensor subclass
    assert type(trainer.transformer.get_submodule("x_embedder").weight) is torch.nn.Parameter  # excluded

    pipe = Lumina2Pipeline.from_pretrained(tiny_lumina2)
    x = lumina_inputs()
    with torch.no_grad():
        trained = trainer.transformer(**x, return_dict=False)[0]
        base = pipe.transformer(**x, return_dict=False)[0]
        pipe.load_lora_weights(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
        loaded = pipe.transformer(**x, return_dict=False)[0]
    assert (loaded - trained).abs().mean() < 0.5 * (base - trained).abs().mean()


def test_quantised_transformer_is_smaller_in_the_memory_report(tiny_lumina2, image_dir, tmp_path):
    sizes = {}
    for precision in ("no_change", "int8-quanto"):
        sink = ListSink()
        spec = make_spec(
            tiny_lumina2, image_dir, tmp_path / precision, {"base_model_precision": precision}, **QUANTO_TRAIN
        )
        trainer = Trainer(spec, sink)
        trainer.prepare()
        trainer.fill_caches()
        trainer.build_model()
        sizes[precision] = sink.of("memory")[-1]["transformer_bytes"]
    assert sizes["int8-quanto"] < 0.6 * sizes["no_change"], sizes


@pytest.mark.parametrize("family_name", ["lumina2", "kandinsky5-image"])
def test_excluded_layers_stay_unquantised(tiny_lumina2, tiny_k5, family_name):
    from optimum.quanto.nn import QModuleMixin

    family = get_family_class(family_name)
    cls_name = "Lumina2Transformer2DModel" if family_name == "lumina2" else "Kandinsky5Transformer3DModel"
    import diffusers

    path = tiny_lumina2 if family_name == "lumina2" else tiny_k5
    tr = getattr(diffusers, cls_name).from_pretrained(path, subfolder="transformer")
    result = quantize_model(tr, "int8-quanto", family.quantization_exclude)
    patterns = exclude_patterns(family.quantization_exclude)
    linears = [(n, m) for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = [n for n, m in linears if not isinstance(m, QModuleMixin)]
    quantised = [n for n, m in linears if isinstance(m, QModuleMixin)]
    assert kept and quantised
    assert all(is_excluded(n, patterns) for n in kept)  # nothing unquantised by accident
    assert not any(is_excluded(n, patterns) for n in quantised)
    assert sorted(result.quantized) == sorted(quantised) and sorted(result.kept) == sorted(kept)
    if family_name == "lumina2":
        assert {"x_embedder", "layers.0.norm1.linear", "norm_out.linear_2"} <= set(kept)
        assert "time_caption_embed.timestep_embedder.linear_1" in kept
    else:
        assert {"visual_embeddings.in_layer", "out_layer.out_layer", "time_embeddings.in_layer"} <= set(kept)
        assert "visual_transformer_blocks.0.visual_modulation.out_layer" in kept
        assert "visual_transformer_blocks.0.self_attention.to_query" in quantised


@pytest.mark.parametrize("precision", ["int8-torchao", "fp8-torchao"])
def test_torchao_without_torchao_fails_clearly_before_any_model_loads(
    tiny_lumina2, image_dir, tmp_path, monkeypatch, precision
):
    monkeypatch.setattr(memory_check, "backend_available", lambda backend: backend != "torchao")
    trainer = Trainer(make_spec(tiny_lumina2, image_dir, tmp_path / "out", {"base_model_precision": precision}))

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the memory options were checked")

    for loader in ("load_text_encoders", "load_vae", "load_transformer"):
        monkeypatch.setattr(get_family_class("lumina2"), loader, no_loading)
    with pytest.raises(ConfigError) as err:
        trainer.prepare()  # resolve_spec checks the memory options before the family is even built
    assert "base_model_precision" in err.value.message and precision in err.value.message
    assert "pip install torchao" in err.value.hint

    spec = make_spec(tiny_lumina2, image_dir, tmp_path / "te", {"text_encoder_1_precision": precision})
    with pytest.raises(ConfigError, match="text_encoder_1_precision"):
        check_memory_spec(spec)


# ----------------------------------------------------------------------------- group offload
def _lumina_with_lora(path: Path, precision: str = "no_change") -> torch.nn.Module:
    from diffusers import Lumina2Transformer2DModel
    from peft import LoraConfig

    tr = Lumina2Transformer2DModel.from_pretrained(path, subfolder="transformer")
    if precision != "no_change":
        quantize_model(tr, precision, get_family_class("lumina2").quantization_exclude)
    tr.requires_grad_(False)
    torch.manual_seed(1)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.linear_1"]
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    return tr


def _k5_with_lora(path: Path, precision: str = "no_change") -> torch.nn.Module:
    from diffusers import Kandinsky5Transformer3DModel
    from peft import LoraConfig

    tr = Kandinsky5Transformer3DModel.from_pretrained(path, subfolder="transformer")
    if precision != "no_change":
        quantize_model(tr, precision, get_family_class("kandinsky5-image").quantization_exclude)
    tr.requires_grad_(False)
    torch.manual_seed(1)
    targets = ["self_attention.to_query", "cross_attention.to_value", "feed_forward.in_layer"]
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    return tr


def _forward_backward(tr: torch.nn.Module, family_name: str, checkpointing: bool):
    if checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    if family_name == "lumina2":
        out = tr(**lumina_inputs(), return_dict=False)[0]
    else:
        spec = TrainSpec.model_validate({"model": {"model_family": "kandinsky5-image"}})
        family = get_family_class("kandinsky5-image")(spec)
        g = torch.Generator().manual_seed(0)
        text = {
            "prompt_embeds": torch.randn(2, 7, 32, generator=g),
            "prompt_lengths": torch.tensor([7, 5]),  # two lengths: two forward calls per step
            "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
        }
        out = family.predict(tr, torch.randn(2, 1, 8, 8, 16, generator=g), torch.tensor([0.3, 0.7]), text)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("family_name", ["lumina2", "kandinsky5-image"])
def test_group_offload_gives_the_same_outputs_and_gradients(tiny_lumina2, tiny_k5, family_name, offload_type):
    build = _lumina_with_lora if family_name == "lumina2" else _k5_with_lora
    path = tiny_lumina2 if family_name == "lumina2" else tiny_k5
    for precision in ("no_change", "int8-quanto"):
        for checkpointing in (False, True):
            ref_out, ref_grads = _forward_backward(build(path, precision), family_name, checkpointing)
            for per_group in (1, 2):
                tr = build(path, precision)
                off = GroupOffloader(tr, CPU, offload_type=offload_type, blocks_per_group=per_group, poison=True)
                assert off.groups and all(not any(s.stored.requires_grad for s in g.slots) for g in off.groups)
                out, grads = _forward_backward(tr, family_name, checkpointing)
                case = (precision, checkpointing, per_group)
                assert torch.equal(out, ref_out), case
                assert grads.keys() == ref_grads.keys()
                assert all(torch.equal(grads[k], ref_grads[k]) for k in grads), case
                assert sum(g.resident for g in off.groups) <= 1, case  # at most the last recomputed group
                assert tr.device == CPU  # diffusers sees the onload device through the hooks


def test_trainable_lora_weights_are_never_offloaded(tiny_lumina2):
    tr = _lumina_with_lora(tiny_lumina2)
    off = GroupOffloader(tr, CPU, offload_type="block_level", poison=True)
    offloaded = {id(s.stored) for g in off.groups for s in g.slots}
    lora = [p for n, p in tr.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.device == CPU and id(p) not in offloaded for p in lora)
    # offloaded frozen weights are parked as meta tensors (poison), the LoRA stays real
    assert tr.get_submodule("layers.0.attn.to_q").base_layer.weight.device.type == "meta"
    off.remove()
    assert tr.get_submodule("layers.0.attn.to_q").base_layer.weight.device == CPU
    out = tr(**lumina_inputs(), return_dict=False)[0]
    assert torch.isfinite(out).all()


def test_quanto_weights_ignore_data_assignment():
    """Why offloading replaces tensors: ``param.data = x`` (diffusers' offload move) is a no-op for quanto weights."""
    from optimum.quanto import freeze, qint8, quantize

    torch.manual_seed(0)
    a, b = torch.nn.Sequential(torch.nn.Linear(16, 8)), torch.nn.Sequential(torch.nn.Linear(16, 8))
    b[0].bias.data.copy_(a[0].bias.data)  # only the weights differ
    for m in (a, b):
        quantize(m, weights=qint8)
        freeze(m)
        m.requires_grad_(False)
    x = torch.randn(2, 16)
    before = a(x)
    a[0].weight.data = b[0].weight.data
    assert torch.equal(a(x), before)  # the assignment did not change what the layer computes
    a[0]._parameters["weight"] = torch.nn.Parameter(b[0].weight.to("cpu", copy=True), requires_grad=False)
    assert torch.equal(a(x), b(x))  # replacing the tensor does


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_trains_the_same_adapter(tiny_lumina2, image_dir, tmp_path, poisoned, offload_type):
    overrides = dict(
        training={
            "max_train_steps": 4,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": True,
            "seed": 2,
        },
        checkpointing={"checkpoint_step_interval": None},
    )
    Trainer(make_spec(tiny_lumina2, image_dir, tmp_path / "plain", **overrides)).run()
    sink = ListSink()
    memory = {"enable_group_offload": True, "group_offload_type": offload_type, "group_offload_blocks_per_group": 2}
    Trainer(make_spec(tiny_lumina2, image_dir, tmp_path / "offload", memory, **overrides), sink).run()
    plain = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    offloaded = load_file(str(tmp_path / "offload" / "pytorch_lora_weights.safetensors"))
    assert plain.keys() == offloaded.keys()
    for k in plain:
        torch.testing.assert_close(offloaded[k], plain[k], rtol=0, atol=0, msg=k)
    event = sink.of("memory")[-1]
    assert event["offload"].startswith(f"group:{offload_type}") and event["offload_groups"] > 0
    assert event["offloaded_bytes"] > 0


# ----------------------------------------------------------------------------- refused combinations
def _spec(memory: dict, **training) -> TrainSpec:
    return TrainSpec.model_validate({"memory": memory, "training": training})


def test_group_offload_and_model_cpu_offload_are_refused_together():
    with pytest.raises(ConfigError) as err:
        check_memory_spec(_spec({"enable_group_offload": True, "enable_model_cpu_offload": True}))
    assert "enable_group_offload" in err.value.message and "enable_model_cpu_offload" in err.value.message


def test_streams_need_cuda_and_are_turned_off_with_gradient_checkpointing():
    spec = _spec({"enable_group_offload": True, "group_offload_use_stream": True}, gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="group_offload_use_stream needs a CUDA GPU"):
        check_memory_spec(spec, CPU)
    assert check_memory_spec(spec, "cuda") == [] and use_stream(spec, "cuda")
    with_ckpt = _spec({"enable_group_offload": True, "group_offload_use_stream": True}, gradient_checkpointing=True)
    warnings = check_memory_spec(with_ckpt, "cuda")
    assert any("turned off because gradient_checkpointing" in w for w in warnings)
    assert not use_stream(with_ckpt, "cuda")


def test_other_memory_checks():
    with pytest.raises(ConfigError, match="model_type 'full'"):
        check_memory_spec(
            TrainSpec.model_validate(
                {"model": {"model_type": "full"}, "memory": {"base_model_precision": "int8-quanto"}}
            )
        )
    warnings = check_memory_spec(_spec({"group_offload_vae": True}))
    assert any("only apply with enable_group_offload" in w for w in warnings)
    k5 = TrainSpec.model_validate(
        {"model": {"model_family": "kandinsky5-image"}, "memory": {"text_encoder_1_precision": "int8-quanto"}}
    )
    assert any("Qwen2.5-VL is discouraged" in w for w in check_memory_spec(k5))


def test_refused_combination_stops_the_trainer_before_models_load(tiny_lumina2, image_dir, tmp_path, monkeypatch):
    memory = {"enable_group_offload": True, "enable_model_cpu_offload": True}
    trainer = Trainer(make_spec(tiny_lumina2, image_dir, tmp_path / "out", memory))
    monkeypatch.setattr(
        get_family_class("lumina2"), "load_text_encoders", lambda *a: pytest.fail("text encoders loaded")
    )
    with pytest.raises(ConfigError, match="cannot be used together"):
        trainer.prepare()
    assert not hasattr(trainer, "index")  # refused before the datasets were even scanned


def test_memory_warnings_come_from_resolve_spec_and_are_emitted_by_prepare(tiny_lumina2, image_dir, tmp_path):
    from trainer_core.train.resolve import resolve_spec

    spec = make_spec(tiny_lumina2, image_dir, tmp_path / "out", {"group_offload_vae": True})
    _, _, warnings = resolve_spec(spec, "cpu")
    assert any("only apply with enable_group_offload" in w for w in warnings)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        streams = {"enable_group_offload": True, "group_offload_use_stream": True}
        resolve_spec(make_spec(tiny_lumina2, image_dir, tmp_path / "s", streams), "cpu")
    sink = ListSink()
    Trainer(spec, sink, device="cpu").prepare()
    assert any("only apply with enable_group_offload" in w["message"] for w in sink.of("warning"))


# ----------------------------------------------------------------------------- start-up sequencing
def test_offload_during_startup_frees_text_encoders_before_the_vae_loads(
    tiny_lumina2, image_dir, tmp_path, monkeypatch
):
    sink = ListSink()
    spec = make_spec(tiny_lumina2, image_dir, tmp_path / "out", {"offload_during_startup": True})
    trainer = Trainer(spec, sink)
    trainer.prepare()
    family = trainer.family
    encoder_refs: list[weakref.ref] = []
    order: list[str] = []
    load_te, load_vae = family.load_text_encoders, family.load_vae

    def tracked_text_encoders(device, dtype):
        encoders = load_te(device, dtype)
        encoder_refs.extend(weakref.ref(m) for m in family.text_encoder_modules(encoders))
        order.append("text_encoders")
        return encoders

    def checked_vae(device, dtype):
        assert encoder_refs and all(r() is None for r in encoder_refs), "a text encoder is still alive"
        order.append("vae")
        return load_vae(device, dtype)

    monkeypatch.setattr(family, "load_text_encoders", tracked_text_encoders)
    monkeypatch.setattr(family, "load_vae", checked_vae)
    trainer.fill_caches()
    trainer.build_model()
    assert order == ["text_encoders", "vae"]
    stages = [e["stage"] for e in sink.of("memory")]
    assert stages == ["text_encoders_loaded", "text_encoders_released", "vae_loaded", "vae_released", "training"]
    loaded = sink.of("memory")[0]
    assert loaded["resident_bytes"] > 0 and loaded["rss_bytes"] > 0 and "cuda_allocated" in loaded
    assert not sink.of("warning") or not any("still referenced" in w["message"] for w in sink.of("warning"))


def test_a_leaked_text_encoder_is_reported(tiny_lumina2, image_dir, tmp_path, monkeypatch):
    sink = ListSink()
    trainer = Trainer(make_spec(tiny_lumina2, image_dir, tmp_path / "out", {"offload_during_startup": True}), sink)
    trainer.prepare()
    leaked = []
    load_te = trainer.family.load_text_encoders
    monkeypatch.setattr(trainer.family, "load_text_encoders", lambda d, t: leaked.append(load_te(d, t)) or leaked[-1])
    trainer.fill_caches()
    assert any("Gemma2Model still referenced after caching" in w["message"] for w in sink.of("warning"))


def test_text_encoder_quantisation_offload_and_vae_options_while_caching(tiny_k5, image_dir, tmp_path):
    from optimum.quanto.nn import QModuleMixin

    memory = {
        "text_encoder_2_precision": "int8-quanto",
        "enable_group_offload": True,
        "group_offload_text_encoder": True,
        "group_offload_vae": True,
        "vae_enable_tiling": True,
        "vae_enable_slicing": True,
    }
    raw = lumina_spec(tiny_k5, image_dir, tmp_path / "out")
    raw["model"] = {"model_family": "kandinsky5-image", "pretrained_model_name_or_path": str(tiny_k5)}
    plain_spec = TrainSpec.model_validate(raw)
    spec = TrainSpec.model_validate({**raw, "memory": memory})
    family = get_family_class("kandinsky5-image")(spec)
    warnings: list[str] = []
    startup = Startup(family, spec, CPU, ListSink().emit, warnings.append)
    assert startup.text_identity_extra() == {"text_encoder_2_precision": "int8-quanto"}  # separate cache keys

    encoders = startup.load_text_encoders(torch.float32)
    qwen, clip = family.text_encoder_modules(encoders)
    assert not any(isinstance(m, QModuleMixin) for m in qwen.modules())  # text_encoder_1: no_change
    clip_q = [n for n, m in clip.named_modules() if isinstance(m, QModuleMixin)]
    assert clip_q and not any("embed" in n or "norm" in n for n in clip_q)
    assert hasattr(qwen, "_diffusers_hook") and hasattr(clip, "_diffusers_hook")  # group offloaded
    plain = get_family_class("kandinsky5-image")(plain_spec).load_text_encoders(CPU, torch.float32)
    got, want = family.encode_text(encoders, ["a red circle"])[0], family.encode_text(plain, ["a red circle"])[0]
    torch.testing.assert_close(got.tensors["prompt_embeds"], want.tensors["prompt_embeds"])  # qwen untouched
    pooled_err = (got.tensors["pooled_prompt_embeds"] - want.tensors["pooled_prompt_embeds"]).abs().max()
    assert 0 < pooled_err < 0.1  # clip quantised: close, not equal

    vae = startup.load_vae(torch.float32)
    assert vae.use_tiling and vae.use_slicing and hasattr(vae, "_diffusers_hook")
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain_vae = get_family_class("kandinsky5-image")(plain_spec).load_vae(CPU, torch.float32)
    assert not plain_vae.use_tiling
    plain_vae.enable_tiling()  # tiling changes latents (hence its own cache key); compare like with like
    plain_vae.enable_slicing()
    assert startup.latent_identity_extra() == {"vae_tiling": True}
    got_lat, want_lat = family.encode_pixels(vae, pixels), family.encode_pixels(plain_vae, pixels)
    torch.testing.assert_close(got_lat[1]["mean"], want_lat[1]["mean"])
