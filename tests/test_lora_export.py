"""LoRA export: diffusers reload, ComfyUI merge rule, fused qkv, round trips, metadata, errors.

All on a tiny real-architecture Lumina 2 (GQA: 2 heads, 1 kv head, so q/k/v widths differ), fp32,
with random lora_B so the LoRA is not a no-op, and r=4, alpha=8 so that an ignored alpha shows.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel
from helpers.comfy_merge import comfy_merge
from safetensors import safe_open
from safetensors.torch import load_file

from trainer_core.errors import ConfigError
from trainer_core.lora.adapters import (
    LUMINA2_TARGETS,
    adapter_state_dict,
    add_lora,
    load_adapter_state_dict,
    load_lora_file,
    lora_config,
)
from trainer_core.lora.comfy_keys import diffusers_to_comfyui_module, from_comfyui, to_comfyui
from trainer_core.lora.export import lora_metadata, save_lora
from trainer_core.spec import LoraSpec
from trainer_core.testing.tiny import build_tiny_lumina2

RANK, ALPHA = 4, 8.0
ALL_LINEAR = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "feed_forward.linear_1",
    "feed_forward.linear_2",
    "feed_forward.linear_3",
    "norm1.linear",
    "x_embedder",
    "caption_embedder.1",
    "timestep_embedder.linear_1",
    "timestep_embedder.linear_2",
    "norm_out.linear_1",
    "norm_out.linear_2",
]
P = "diffusion_model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_lumina2(tmp_path_factory.mktemp("tiny"))


def _base(tiny) -> Lumina2Transformer2DModel:
    return Lumina2Transformer2DModel.from_pretrained(tiny, subfolder="transformer").float().eval()


def _with_lora(tiny, targets, *, init=False, alpha=ALPHA, seed=0):
    t = _base(tiny)
    torch.manual_seed(seed)
    cfg = lora_config(LoraSpec(lora_rank=RANK, lora_alpha=alpha), targets, init_weights=init)
    params = add_lora(t, cfg)
    return t, cfg, params


def _inputs() -> dict:
    g = torch.Generator().manual_seed(123)
    return {
        "hidden_states": torch.randn(1, 16, 8, 8, generator=g),
        "timestep": torch.tensor([0.3]),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=g),
        "encoder_attention_mask": torch.ones(1, 7, dtype=torch.bool),
    }


def _run(t) -> torch.Tensor:
    with torch.no_grad():
        return t(**_inputs(), return_dict=False)[0]


def _meta(cfg) -> dict[str, str]:
    return lora_metadata(
        family="lumina2",
        flavour="tiny",
        rank=cfg.r,
        alpha=cfg.lora_alpha,
        steps=123,
        target_modules=sorted(cfg.target_modules),
        extra={"system_prompt": "You are a test.", "spec_hash": "abc123"},
    )


def _save(t, cfg, out_dir):
    return save_lora(out_dir, "mylora", "lumina2", adapter_state_dict(t), cfg, dict(t.config), _meta(cfg))


def _comfy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Lumina 2 state dict under ComfyUI names, q/k/v concatenated into qkv."""
    out = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        name = diffusers_to_comfyui_module("lumina2", module)
        if name.endswith("attention.qkv"):
            if module.endswith("to_q"):
                stem = module[: -len("to_q")]
                out[f"{name}.{leaf}"] = torch.cat([sd[f"{stem}to_{p}.{leaf}"] for p in "qkv"])
            continue
        out[f"{name}.{leaf}"] = value
    return out


def _comfy_merge(base: dict[str, torch.Tensor], comfy: dict[str, torch.Tensor]) -> tuple[dict, set[str]]:
    """ComfyUI's rule (tests/helpers/comfy_merge.py); every file key must be consumed, alphas 0-dim float32."""
    for key, value in comfy.items():
        if key.endswith(".alpha"):
            assert value.dim() == 0 and value.dtype == torch.float32, key
    merged, patched, unconsumed = comfy_merge(base, comfy)
    assert not unconsumed, sorted(unconsumed)
    return merged, patched


def _check_comfy_matches_diffusers(t, comfy_file) -> int:
    base = _comfy_names(_base_sd(t))
    merged_comfy, patched = _comfy_merge(base, load_file(str(comfy_file)))
    fused = copy.deepcopy(t)
    fused.fuse_lora()
    fused.unload_lora()
    expected = _comfy_names(fused.state_dict())
    assert set(expected) == set(base)
    changed = {k for k in expected if not torch.equal(expected[k], base[k])}
    assert changed == patched
    for k in expected:
        assert torch.allclose(merged_comfy[k], expected[k], atol=1e-5, rtol=0), k
    return len(changed)


def _base_sd(t) -> dict[str, torch.Tensor]:
    """The base weights of a transformer that carries an adapter (peft's base_layer names removed)."""
    out = {}
    for key, value in t.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.clone()
    return out


# ---------------------------------------------------------------------- 1. diffusers reload
@pytest.mark.parametrize("preset", ["attention", "attention+ffn"])
def test_diffusers_file_reloads_with_plain_load_lora_weights(tiny, tmp_path, preset):
    t, cfg, params = _with_lora(tiny, LUMINA2_TARGETS[preset])
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in t.named_parameters() if "lora_" not in n)
    files = _save(t, cfg, tmp_path)
    assert files.diffusers == tmp_path / "pytorch_lora_weights.safetensors"
    assert files.comfyui == tmp_path / "mylora_comfyui.safetensors"

    pipe = Lumina2Pipeline.from_pretrained(tiny)
    base_out = _run(pipe.transformer)
    pipe.load_lora_weights(tmp_path)
    (loaded_cfg,) = pipe.transformer.peft_config.values()
    assert loaded_cfg.lora_alpha == ALPHA and loaded_cfg.r == RANK
    trained_out, loaded_out = _run(t), _run(pipe.transformer)
    assert (loaded_out - trained_out).abs().max() < 1e-5
    assert (trained_out - base_out).abs().max() > 0.05


# ---------------------------------------------------------------------- 2-3. ComfyUI merge rule, fused qkv
@pytest.mark.parametrize(
    ("targets", "patched"),
    [(LUMINA2_TARGETS["attention+ffn"], 4 * 5), (ALL_LINEAR, 4 * 5 + 3 + 6), (["to_q"], 4), (["to_k", "to_v"], 4)],
)
def test_comfyui_merge_equals_diffusers_merge(tiny, tmp_path, targets, patched):
    t, cfg, _ = _with_lora(tiny, targets)
    files = _save(t, cfg, tmp_path)
    assert _check_comfy_matches_diffusers(t, files.comfyui) == patched


def test_fused_qkv_layout(tiny, tmp_path):
    t, cfg, _ = _with_lora(tiny, LUMINA2_TARGETS["attention"])
    comfy = load_file(str(_save(t, cfg, tmp_path).comfyui))
    qkv = P + "layers.0.attention.qkv"
    assert comfy[qkv + ".lora_A.weight"].shape == (3 * RANK, 48)
    assert comfy[qkv + ".lora_B.weight"].shape == (48 + 24 + 24, 3 * RANK)
    assert comfy[qkv + ".alpha"].item() == 3 * ALPHA
    assert comfy[P + "layers.0.attention.out.alpha"].item() == ALPHA
    assert all(v.dtype == torch.float32 for v in comfy.values())
    assert not any(".attn." in k or "to_q" in k for k in comfy)

    t, cfg, _ = _with_lora(tiny, ["to_q"])
    comfy = load_file(str(_save(t, cfg, tmp_path / "q").comfyui))
    b = comfy[qkv + ".lora_B.weight"]
    assert comfy[qkv + ".lora_A.weight"].shape == (RANK, 48) and b.shape == (96, RANK)
    assert torch.count_nonzero(b[48:]) == 0 and torch.count_nonzero(b[:48]) > 0
    assert comfy[qkv + ".alpha"].item() == ALPHA


# ---------------------------------------------------------------------- 4. round trips, init_lora
@pytest.mark.parametrize(
    "keep", [None, ("to_q",), ("to_k", "to_v"), ("to_q", "to_v", "linear_1"), ("x_embedder", "norm_out.linear_2")]
)
def test_from_comfyui_inverts_to_comfyui(tiny, keep):
    t, _, _ = _with_lora(tiny, ALL_LINEAR)
    sd = adapter_state_dict(t)
    if keep:
        sd = {k: v for k, v in sd.items() if any(f".{s}.lora_" in f".{k}" for s in keep)}
    back, alpha = from_comfyui("lumina2", to_comfyui("lumina2", sd, ALPHA, t.config), t.config)
    assert alpha == ALPHA
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_load_lora_file_reads_both_formats(tiny, tmp_path):
    t, cfg, _ = _with_lora(tiny, LUMINA2_TARGETS["attention+ffn"])
    files = _save(t, cfg, tmp_path)
    want_sd, want_out = adapter_state_dict(t), _run(t)
    for path in (files.diffusers, files.comfyui):
        fresh, _, _ = _with_lora(tiny, LUMINA2_TARGETS["attention+ffn"], init=True, seed=1)
        load_lora_file(path, fresh, "lumina2")
        got = adapter_state_dict(fresh)
        assert set(got) == set(want_sd) and all(torch.equal(got[k], want_sd[k]) for k in got), path
        assert (_run(fresh) - want_out).abs().max() < 1e-5

    # an adapter with another alpha keeps the file's effect (lora_B is rescaled)
    other, _, _ = _with_lora(tiny, LUMINA2_TARGETS["attention+ffn"], init=True, alpha=2.0)
    load_lora_file(files.comfyui, other, "lumina2")
    assert (_run(other) - want_out).abs().max() < 1e-5


def test_load_lora_file_rejects_other_targets(tiny, tmp_path):
    t, cfg, _ = _with_lora(tiny, LUMINA2_TARGETS["attention+ffn"])
    files = _save(t, cfg, tmp_path)
    for path in (files.diffusers, files.comfyui):
        fresh, _, _ = _with_lora(tiny, LUMINA2_TARGETS["attention"], init=True)
        with pytest.raises(ConfigError, match="mylora_comfyui|pytorch_lora_weights") as err:
            load_lora_file(path, fresh, "lumina2")
        assert str(path) in str(err.value)


def test_load_adapter_state_dict_names_bad_keys(tiny):
    t, _, _ = _with_lora(tiny, ["to_q"])
    sd = adapter_state_dict(t)
    load_adapter_state_dict(t, sd)
    sd["layers.0.attn.to_k.lora_A.weight"] = torch.zeros(RANK, 48)
    with pytest.raises(ConfigError, match=r"unexpected: layers\.0\.attn\.to_k"):
        load_adapter_state_dict(t, sd)


# ---------------------------------------------------------------------- 5. metadata
def test_both_files_carry_metadata(tiny, tmp_path):
    t, cfg, _ = _with_lora(tiny, LUMINA2_TARGETS["attention"])
    files = _save(t, cfg, tmp_path)
    metas = {}
    for path in (files.diffusers, files.comfyui):
        with safe_open(str(path), framework="pt") as f:
            metas[path] = f.metadata()
        meta = metas[path]
        assert meta["comfyui_tuner.family"] == "lumina2"
        assert meta["comfyui_tuner.flavour"] == "tiny"
        assert meta["comfyui_tuner.rank"] == "4" and float(meta["comfyui_tuner.alpha"]) == ALPHA
        assert meta["comfyui_tuner.steps"] == "123"
        assert json.loads(meta["comfyui_tuner.target_modules"]) == sorted(LUMINA2_TARGETS["attention"])
        assert meta["comfyui_tuner.system_prompt"] == "You are a test."
        assert meta["comfyui_tuner.spec_hash"] == "abc123"
    adapter = json.loads(metas[files.diffusers]["lora_adapter_metadata"])
    assert adapter["transformer.lora_alpha"] == ALPHA and adapter["transformer.r"] == RANK
    assert sorted(adapter["transformer.target_modules"]) == sorted(LUMINA2_TARGETS["attention"])
    assert metas[files.diffusers]["format"] == "pt"
    assert all(k.startswith("transformer.") for k in load_file(str(files.diffusers)))


# ---------------------------------------------------------------------- 6. errors, other families
def test_unknown_lumina2_module_is_an_error(tmp_path):
    sd = {"foo.bar.lora_A.weight": torch.zeros(2, 4), "foo.bar.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(ConfigError, match="foo.bar"):
        to_comfyui("lumina2", sd, 2.0, {"hidden_size": 48, "num_attention_heads": 2, "num_kv_heads": 1})
    with pytest.raises(ConfigError, match="context_refiner"):
        diffusers_to_comfyui_module("lumina2", "context_refiner.0.norm1.linear")
    with pytest.raises(ConfigError):
        to_comfyui("sdxl", sd, 2.0, {})


def test_kandinsky5_names_are_identity():
    sd = {
        "visual_transformer_blocks.0.self_attention.to_query.lora_A.weight": torch.randn(4, 8),
        "visual_transformer_blocks.0.self_attention.to_query.lora_B.weight": torch.randn(8, 4),
    }
    comfy = to_comfyui("kandinsky5-video", sd, 8.0, {})
    assert set(comfy) == {P + k for k in sd} | {P + "visual_transformer_blocks.0.self_attention.to_query.alpha"}
    back, alpha = from_comfyui("kandinsky5-video", comfy, {})
    assert alpha == 8.0 and all(torch.equal(back[k], sd[k]) for k in sd) and set(back) == set(sd)


def test_from_comfyui_reads_shared_a_qkv_from_other_tools():
    """diffusers' own converter assumes one A for q/k/v and a dense B; the effect must survive."""
    cfg = {"hidden_size": 48, "num_attention_heads": 2, "num_kv_heads": 1}
    a, b = torch.randn(RANK, 48), torch.randn(96, RANK)
    comfy = {P + "layers.0.attention.qkv.lora_A.weight": a, P + "layers.0.attention.qkv.lora_B.weight": b}
    back, alpha = from_comfyui("lumina2", comfy, cfg)  # no .alpha: ComfyUI's scale is 1.0
    assert alpha == RANK
    delta = torch.cat(
        [back[f"layers.0.attn.to_{p}.lora_B.weight"] @ back[f"layers.0.attn.to_{p}.lora_A.weight"] for p in "qkv"]
    )
    assert torch.allclose(delta * alpha / RANK, b @ a, atol=1e-6)


@pytest.mark.parametrize("family", ["kandinsky5-image", "kandinsky5-video"])
def test_every_default_kandinsky5_target_exports_to_a_comfyui_key(family):
    """The K5 default (the authors' attention+ffn set) reaches ComfyUI whole: A, B and alpha per module."""
    from peft.tuners.lora import LoraLayer

    from trainer_core.families import get_family_class
    from trainer_core.spec import TrainSpec
    from trainer_core.testing.tiny import build_kandinsky5_transformer

    targets = get_family_class(family)(
        TrainSpec.model_validate({"model": {"model_family": family}})
    ).lora_target_modules()
    t = build_kandinsky5_transformer(visual_cond=family == "kandinsky5-video")
    add_lora(t, lora_config(LoraSpec(lora_rank=RANK, lora_alpha=ALPHA), targets))
    wrapped = {n for n, m in t.named_modules() if isinstance(m, LoraLayer)}
    assert {n.split(".", 2)[2] for n in wrapped} == set(targets)  # each target hit, in text and visual blocks
    comfy = to_comfyui(family, adapter_state_dict(t), ALPHA, dict(t.config))
    exported = {k.removeprefix(P).rsplit(".", 2)[0] for k in comfy if k.endswith(".lora_A.weight")}
    assert exported == wrapped
    for module in wrapped:
        name = P + diffusers_to_comfyui_module(family, module)  # ComfyUI's Kandinsky 5 names are diffusers'
        assert {name + ".lora_A.weight", name + ".lora_B.weight", name + ".alpha"} <= set(comfy)
        assert comfy[name + ".alpha"].item() == ALPHA
