"""Lumina 2 with one fused ``to_qkv`` projection per attention behaves exactly like diffusers' three.

Why it exists (trainer_core/families/lumina2_qkv.py): ComfyUI's Lumina 2 has one ``attention.qkv``
weight, and a LyCORIS delta (LoKr, LoHa) of it cannot be split into deltas of separate q/k/v
projections, so LyCORIS trains on the fused projection. These tests pin that the fused model is the
same model: outputs and gradients (with and without gradient checkpointing), quantised with quanto
and torchao, under group offload, and through the validation pipeline; and that a LoKr on ``to_qkv``
is exactly a delta of the fused weight, i.e. what ComfyUI merges into ``attention.qkv``.

The tiny model has 2 query heads and 1 key/value head (grouped-query attention, as the real model):
q has 48 rows, k and v 24 each, so a fusion that mixed up the row ranges would not even run, and one
that swapped k and v (equal widths) is caught by every comparison below
(:func:`test_a_fusion_with_k_and_v_swapped_is_caught`).
"""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_core.errors import ConfigError
from trainer_core.families.lumina2 import Lumina2Family
from trainer_core.families.lumina2_qkv import (
    FusedQKVLumina2AttnProcessor,
    fuse_qkv_projections,
    fused_lora_targets,
    has_fused_qkv,
)
from trainer_core.lora.comfy_keys import lumina2_qkv_rows
from trainer_core.memory import offload as memory_offload
from trainer_core.memory.quantize import is_quantized_tensor
from trainer_core.memory.transformer import place_transformer, quantize_transformer
from trainer_core.spec import TrainSpec

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
BLOCKS = ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"]  # every attention of the tiny model
TIGHT = dict(rtol=1e-5, atol=1e-5)  # fp32: the same arithmetic up to summation order (measured <= 2e-6)


def load(path: Path) -> torch.nn.Module:
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel.from_pretrained(path, subfolder="transformer")


def load_fused(path: Path) -> torch.nn.Module:
    tr = load(path)
    assert fuse_qkv_projections(tr) == len(BLOCKS)
    return tr


def inputs(seed: int = 0, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Two samples, the second with a shorter caption (masked padding), as a training batch."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    x = {
        "hidden_states": torch.randn(2, 16, 8, 8, generator=g),
        "timestep": torch.tensor([0.4, 0.8]),
        "encoder_hidden_states": torch.randn(2, 9, 32, generator=g),
        "encoder_attention_mask": mask,
    }
    if requires_grad:
        x["hidden_states"].requires_grad_(True)
        x["encoder_hidden_states"].requires_grad_(True)
    return x


def run(tr: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return tr(**x, return_dict=False)[0]


def spec_for(path: Path, memory: dict | None = None) -> TrainSpec:
    return TrainSpec.model_validate(
        {"model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(path)}, "memory": memory or {}}
    )


def swap_k_and_v(tr: torch.nn.Module) -> None:
    """The mistake a fusion could make silently: k and v have the same width."""
    rows = lumina2_qkv_rows(tr.config)
    q, k = rows["q"], rows["k"]
    with torch.no_grad():
        for blk in BLOCKS:
            w = tr.get_submodule(f"{blk}.attn.to_qkv").weight
            w.copy_(torch.cat([w[:q], w[q + k :], w[q : q + k]]))


# ---------------------------------------------------------------------- structure
def test_to_qkv_holds_the_q_k_v_rows_and_the_separate_projections_are_gone(tiny_lumina2):
    base = load(tiny_lumina2)
    tr = load(tiny_lumina2)
    old = weakref.ref(tr.get_submodule("layers.0.attn.to_k").weight)
    assert not has_fused_qkv(tr)
    assert fuse_qkv_projections(tr) == len(BLOCKS)
    assert has_fused_qkv(tr)

    rows = lumina2_qkv_rows(tr.config)
    assert rows == {"q": 48, "k": 24, "v": 24}  # grouped-query attention: k and v narrower than q
    fused_names = sorted(n for n, _ in tr.named_modules() if n.endswith("attn.to_qkv"))
    assert fused_names == sorted(f"{blk}.attn.to_qkv" for blk in BLOCKS)
    assert not [n for n, _ in tr.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]
    for blk in BLOCKS:
        attn = tr.get_submodule(f"{blk}.attn")
        assert type(attn.to_qkv) is torch.nn.Linear and attn.to_qkv.bias is None
        assert isinstance(attn.processor, FusedQKVLumina2AttnProcessor)
        expected = torch.cat([base.get_submodule(f"{blk}.attn.{p}").weight for p in ("to_q", "to_k", "to_v")])
        assert attn.to_qkv.weight.dtype == expected.dtype and torch.equal(attn.to_qkv.weight, expected)
    # the originals are deleted, not kept beside the copy: memory holds the weights once
    assert sum(p.numel() for p in tr.parameters()) == sum(p.numel() for p in base.parameters())
    gc.collect()
    assert old() is None


def test_fusing_twice_changes_nothing(tiny_lumina2):
    tr = load_fused(tiny_lumina2)
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    assert fuse_qkv_projections(tr) == 0
    after = tr.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(run(tr, inputs()), run(load(tiny_lumina2), inputs()), **TIGHT)


def test_fusing_keeps_the_dtype(tiny_lumina2):
    base = load(tiny_lumina2).to(torch.bfloat16)
    tr = load(tiny_lumina2).to(torch.bfloat16)
    fuse_qkv_projections(tr)
    fused = tr.get_submodule("layers.0.attn.to_qkv").weight
    expected = torch.cat([base.get_submodule(f"layers.0.attn.{p}").weight for p in ("to_q", "to_k", "to_v")])
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, expected)


# ---------------------------------------------------------------------- the same model
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_model_gives_the_same_outputs_and_gradients(tiny_lumina2, checkpointing):
    calls = []
    results = {}
    for fused in (False, True):
        tr = load_fused(tiny_lumina2) if fused else load(tiny_lumina2)
        if fused:  # count the fused projection's calls
            for blk in BLOCKS:
                tr.get_submodule(f"{blk}.attn.to_qkv").register_forward_pre_hook(lambda *a: calls.append(1))
        if checkpointing:
            tr.enable_gradient_checkpointing()
        tr.train()
        x = inputs(requires_grad=True)
        out = run(tr, x)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results[fused] = (out.detach(), x, {n: p.grad for n, p in tr.named_parameters()})

    (ref, ref_x, ref_grads), (out, x, grads) = results[False], results[True]
    torch.testing.assert_close(out, ref, **TIGHT)
    for key in ("hidden_states", "encoder_hidden_states"):
        torch.testing.assert_close(x[key].grad, ref_x[key].grad, **TIGHT)
    for blk in BLOCKS:  # the fused weight's gradient is the three weights' gradients, stacked
        separate = [ref_grads.pop(f"{blk}.attn.{p}.weight") for p in ("to_q", "to_k", "to_v")]
        torch.testing.assert_close(grads.pop(f"{blk}.attn.to_qkv.weight"), torch.cat(separate), **TIGHT)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TIGHT, msg=name)
    # checkpointing recomputes the main layers' attention during backward (the refiners are not checkpointed)
    assert len(calls) == len(BLOCKS) + (2 if checkpointing else 0)


def test_a_fusion_with_k_and_v_swapped_is_caught(tiny_lumina2):
    """The comparisons above can fail: k and v rows swapped (same shapes) change the output."""
    ref = run(load(tiny_lumina2), inputs()).detach()
    tr = load_fused(tiny_lumina2)
    swap_k_and_v(tr)
    assert (run(tr, inputs()).detach() - ref).abs().max() > 1e-3


def test_cross_attention_is_refused(tiny_lumina2):
    attn = load_fused(tiny_lumina2).get_submodule("layers.0.attn")
    x = torch.randn(1, 5, 48)
    assert attn(hidden_states=x, encoder_hidden_states=x).shape == (1, 5, 48)
    with pytest.raises(RuntimeError, match="self-attention"):
        attn(hidden_states=x, encoder_hidden_states=torch.randn(1, 5, 48))


# ---------------------------------------------------------------------- quantisation
def _torchao_works() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except Exception:
        return False
    return True


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    return weight.dequantize()


@pytest.mark.parametrize(
    "precision",
    [
        "int8-quanto",
        pytest.param("int8-torchao", marks=pytest.mark.skipif(not _torchao_works(), reason="torchao not installed")),
    ],
)
def test_fused_then_quantised_equals_the_quantised_unfused_model(tiny_lumina2, precision):
    """int8 weights are scaled per output row, so the fused weight quantises to the very same rows."""
    spec = spec_for(tiny_lumina2, {"base_model_precision": precision})
    family = Lumina2Family(spec)
    ref = load(tiny_lumina2)
    quantize_transformer(ref, spec, family, CPU)
    tr = load_fused(tiny_lumina2)
    result = quantize_transformer(tr, spec, family, CPU)

    assert {f"{blk}.attn.to_qkv" for blk in BLOCKS} <= set(result.quantized)
    for blk in BLOCKS:
        fused = tr.get_submodule(f"{blk}.attn.to_qkv").weight
        assert is_quantized_tensor(fused)
        separate = [_dequantized(ref.get_submodule(f"{blk}.attn.{p}").weight) for p in ("to_q", "to_k", "to_v")]
        assert torch.equal(_dequantized(fused), torch.cat(separate))
    with torch.no_grad():
        quantised_ref = run(ref, inputs())
        torch.testing.assert_close(run(tr, inputs()), quantised_ref, **TIGHT)
        swap_k_and_v_quantised = load_fused(tiny_lumina2)
        swap_k_and_v(swap_k_and_v_quantised)
        quantize_transformer(swap_k_and_v_quantised, spec, family, CPU)
        assert (run(swap_k_and_v_quantised, inputs()) - quantised_ref).abs().max() > 1e-3


@pytest.mark.parametrize(
    "precision",
    [
        "int8-quanto",  # QLinear modules
        pytest.param(  # plain Linear modules holding torchao tensors
            "int8-torchao", marks=pytest.mark.skipif(not _torchao_works(), reason="torchao not installed")
        ),
    ],
)
def test_fusing_after_quantisation_is_refused(tiny_lumina2, precision):
    spec = spec_for(tiny_lumina2, {"base_model_precision": precision})
    tr = load(tiny_lumina2)
    quantize_transformer(tr, spec, Lumina2Family(spec), CPU)
    with pytest.raises(ConfigError, match="before quantisation") as err:
        fuse_qkv_projections(tr)
    assert "noise_refiner.0.attn.to_q" in err.value.message and "fuse_qkv_projections" in err.value.hint


def test_fusing_after_an_adapter_or_group_offload_is_refused(tiny_lumina2):
    from peft import LoraConfig

    tr = load(tiny_lumina2)
    tr.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"]))
    with pytest.raises(ConfigError, match="before quantisation, adapters"):
        fuse_qkv_projections(tr)

    tr = load(tiny_lumina2)
    attach_lokr_to(tr, "layers.0.attn.to_q")
    with pytest.raises(ConfigError, match="layers.0.attn.to_q already carries a LyCORIS adapter"):
        fuse_qkv_projections(tr)
    assert not has_fused_qkv(tr)  # nothing was fused: the refiners' attention (checked first) stays as it was

    tr = load(tiny_lumina2)
    place_transformer(tr, spec_for(tiny_lumina2, {"enable_group_offload": True}), CPU)
    with pytest.raises(ConfigError, match="before place_transformer"):
        fuse_qkv_projections(tr)


# ---------------------------------------------------------------------- LoKr on the fused weight
def attach_lokr_to(tr: torch.nn.Module, name: str) -> torch.nn.Module:
    """A LoKr (lycoris) on module ``name``, with non-zero factors so it changes the output."""
    from lycoris.modules.lokr import LokrModule

    lokr = LokrModule(f"lycoris_{name.replace('.', '_')}", tr.get_submodule(name), lora_dim=4, alpha=4, factor=4)
    with torch.no_grad():
        for p in lokr.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape) * 0.1)
    lokr.apply_to()
    return lokr


def attach_lokr(tr: torch.nn.Module, seed: int = 0) -> list[torch.nn.Module]:
    """A LoKr on every ``to_qkv``."""
    torch.manual_seed(seed)
    return [attach_lokr_to(tr, f"{blk}.attn.to_qkv") for blk in BLOCKS]


def merged_unfused(path: Path, lokrs: list[torch.nn.Module]) -> torch.nn.Module:
    """The unfused diffusers model with each LoKr's fused delta added to to_q/to_k/to_v by row range."""
    merged = load(path)
    rows = lumina2_qkv_rows(merged.config)
    with torch.no_grad():
        for blk, lokr in zip(BLOCKS, lokrs):
            delta = lokr.get_diff_weight()[0]
            assert delta.shape == (sum(rows.values()), merged.config.hidden_size)
            for part, d in zip(("to_q", "to_k", "to_v"), delta.split(list(rows.values()))):
                merged.get_submodule(f"{blk}.attn.{part}").weight.add_(d)
    return merged


def test_a_lokr_on_to_qkv_is_a_delta_of_the_fused_weight(tiny_lumina2):
    """What ComfyUI does with the exported file: add the delta to ``attention.qkv``. Split into the
    q/k/v row ranges, the same delta on the unfused diffusers model gives the same output."""
    tr = load_fused(tiny_lumina2)
    tr.requires_grad_(False)
    lokrs = attach_lokr(tr)
    with torch.no_grad():
        out = run(tr, inputs())
        torch.testing.assert_close(out, run(merged_unfused(tiny_lumina2, lokrs), inputs()), **TIGHT)
        assert (out - run(load(tiny_lumina2), inputs())).abs().max() > 1e-3  # the LoKr does change the output


# ---------------------------------------------------------------------- group offload
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_gives_the_same_outputs_and_lokr_gradients(tiny_lumina2, monkeypatch, offload_type):
    """Fuse, add the LoKr, place with group offload (poisoned: an offloaded weight used without being
    onloaded would be a meta tensor and fail), with gradient checkpointing, as training runs it."""
    monkeypatch.setattr(memory_offload, "POISON_DEFAULT", True)
    results = []
    for offload in (False, True):
        tr = load_fused(tiny_lumina2)
        tr.requires_grad_(False)
        lokrs = attach_lokr(tr)
        spec = spec_for(tiny_lumina2, {"enable_group_offload": offload, "group_offload_type": offload_type})
        offloader = place_transformer(tr, spec, CPU)
        assert (offloader is not None) == offload
        if offloader is not None:  # offloaded frozen weights are parked as meta tensors until a group runs
            assert tr.get_submodule("layers.0.attn.to_qkv").weight.device.type == "meta"
        tr.enable_gradient_checkpointing()
        tr.train()
        out = run(tr, inputs())
        out.square().mean().backward()
        grads = [p.grad.clone() for m in lokrs for p in m.parameters() if p.requires_grad]
        assert grads and all(g.abs().sum() > 0 for g in grads)
        results.append((out.detach(), grads))
    (ref, ref_grads), (out, grads) = results
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    with torch.no_grad():  # and it is the model ComfyUI gets: the unfused one with the delta merged
        torch.testing.assert_close(out, run(merged_unfused(tiny_lumina2, lokrs), inputs()), **TIGHT)


# ---------------------------------------------------------------------- validation pipeline
def test_the_validation_pipeline_samples_the_fused_model(tiny_lumina2):
    family = Lumina2Family(spec_for(tiny_lumina2))
    vae = family.load_vae(CPU, torch.float32)
    g = torch.Generator().manual_seed(0)
    prompt, negative = (
        {
            "prompt_embeds": torch.randn(1, n, 32, generator=g),
            "prompt_attention_mask": torch.ones(1, n, dtype=torch.long),
        }
        for n in (3, 2)
    )

    def sample(tr: torch.nn.Module) -> np.ndarray:
        image = family.render(
            tr, vae, family.load_scheduler(), prompt, negative,
            width=32, height=32, steps=1, guidance=3.0, guidance_rescale=0.0, seed=0,
        )  # fmt: skip
        return np.asarray(image)

    ref = sample(load(tiny_lumina2).eval())
    fused = load_fused(tiny_lumina2).eval()
    image = sample(fused)
    assert image.shape == (32, 32, 3)
    assert np.array_equal(image, ref)
    swap_k_and_v(fused)
    assert not np.array_equal(sample(fused), ref)


# ---------------------------------------------------------------------- LoRA targets
def test_lora_targets_name_the_fused_projection(tiny_lumina2, caplog):
    from peft import LoraConfig

    presets = Lumina2Family.lora_presets
    assert fused_lora_targets(presets["attention"]) == ["to_qkv", "to_out.0"]
    assert fused_lora_targets(presets["attention+ffn"]) == [
        "to_qkv",
        "to_out.0",
        "feed_forward.linear_1",
        "feed_forward.linear_2",
        "feed_forward.linear_3",
    ]
    assert fused_lora_targets(["feed_forward.linear_1"]) == ["feed_forward.linear_1"]  # nothing to map
    # a longer suffix keeps its head
    assert fused_lora_targets(["attn.to_q", "attn.to_k", "attn.to_v"]) == ["attn.to_qkv"]
    assert fused_lora_targets(fused_lora_targets(presets["attention"])) == ["to_qkv", "to_out.0"]
    assert not caplog.records

    # only some of q/k/v: the adapter covers the whole fused weight, and the user is told
    with caplog.at_level(logging.WARNING, logger="trainer_core.families.lumina2_qkv"):
        assert fused_lora_targets(["to_q", "to_out.0"]) == ["to_qkv", "to_out.0"]
    assert "to_k, to_v" in caplog.text and "all of q, k and v" in caplog.text

    tr = load_fused(tiny_lumina2)
    tr.add_adapter(LoraConfig(r=2, target_modules=fused_lora_targets(presets["attention"])))
    wrapped = sorted(n.removesuffix(".lora_A.default.weight") for n, _ in tr.named_parameters() if "lora_A" in n)
    assert wrapped == sorted([f"{b}.attn.to_qkv" for b in BLOCKS] + [f"{b}.attn.to_out.0" for b in BLOCKS])
