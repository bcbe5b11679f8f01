"""LyCORIS and DoRA adapters written for ComfyUI: merged by ComfyUI's rule they are what was trained.

For every algorithm (LoKr with full matrices, LoKr factorised on both sides, LoKr with use_tucker,
LoHa, LoCon, full) and for DoRA (LyCORIS ``dora_wd`` on either axis, PEFT ``use_dora``), on each
family's tiny transformer, with every adapter tensor random and non-zero (LyCORIS and PEFT start
one factor at zero, which would hide a wrong scale or a swapped factor):

* the ComfyUI file, merged by ComfyUI's rule (``tests/helpers/comfy_merge.py``), equals the weights
  the adapter computes (atol 1e-4), every key is consumed, and no other weight changes;
* ``comfyui_to_lycoris`` / ``from_comfyui`` undo the export;
* what cannot be written exactly is refused.

The reference weight of a LyCORIS module is what its forward computes (read off with an identity
input). LyCORIS 4.1.3's ``get_merged_weight`` applies the LoKr/LoHa scale twice, so it is used as
the reference only where that scale is 1 (checked to agree there).

Lumina 2 is trained with LyCORIS on a fused ``attn.to_qkv`` (rows [q | k | v], ComfyUI's qkv).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from helpers.comfy_merge import comfy_merge
from helpers.lycoris_models import effective_weights, fuse_lumina2_qkv, with_lycoris
from peft import LoraConfig

from trainer_core.errors import ConfigError
from trainer_core.lora.adapters import adapter_state_dict, add_lora
from trainer_core.lora.comfy_keys import diffusers_to_comfyui_module, from_comfyui, to_comfyui
from trainer_core.lora.comfy_lycoris import comfyui_to_lycoris, lycoris_module_names, lycoris_to_comfyui
from trainer_core.lora.dora import base_weights_of
from trainer_core.testing.tiny import build_kandinsky5_transformer

FAMILIES = ("lumina2", "kandinsky5-image", "kandinsky5-video")
ATOL = 1e-4
P = "diffusion_model."

# name -> create_lycoris keyword arguments
ALGOS: dict[str, dict] = {
    "lokr-full-matrix": {"algo": "lokr", "linear_dim": 4, "linear_alpha": 8.0, "full_matrix": True},
    # factor 8 and dim 2: lokr_w1_a/b and lokr_w2_a/b on the 48/96 wide layers (alpha/dim = 2)
    "lokr-factorised": {"algo": "lokr", "linear_dim": 2, "linear_alpha": 4.0, "factor": 8, "decompose_both": True},
    "lokr-tucker": {"algo": "lokr", "linear_dim": 2, "linear_alpha": 1.0, "factor": 8, "use_tucker": True},
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0},
    "locon": {"algo": "locon", "linear_dim": 4, "linear_alpha": 8.0},
    "full": {"algo": "full", "linear_dim": 4, "linear_alpha": 1.0},
}


# ---------------------------------------------------------------------- tiny transformers
@pytest.fixture(scope="module")
def lumina2_base(tiny_lumina2) -> torch.nn.Module:
    return Lumina2Transformer2DModel.from_pretrained(tiny_lumina2, subfolder="transformer").float().eval()


@pytest.fixture(scope="module")
def transformers(lumina2_base) -> dict[str, Callable[[], torch.nn.Module]]:
    """Fresh transformers per family; Lumina 2 fused for LyCORIS, unfused for PEFT."""
    return {
        "lumina2": lambda: fuse_lumina2_qkv(copy.deepcopy(lumina2_base)),
        "lumina2-unfused": lambda: copy.deepcopy(lumina2_base),
        "kandinsky5-image": lambda: build_kandinsky5_transformer().float().eval(),
        "kandinsky5-video": lambda: build_kandinsky5_transformer(visual_cond=True).float().eval(),
    }


def _linears(t: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}


def comfy_base(family: str, t: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear's weight (and bias) under ComfyUI's names; Lumina 2's unfused q/k/v concatenated."""
    out: dict[str, torch.Tensor] = {}
    linears = _linears(t)
    for name, m in linears.items():
        cname = diffusers_to_comfyui_module(family, name)
        if name.endswith(("attn.to_k", "attn.to_v")) and family == "lumina2":
            continue
        if name.endswith("attn.to_q") and family == "lumina2":
            stem = name[: -len("to_q")]
            out[cname + ".weight"] = torch.cat([linears[stem + p].weight for p in ("to_q", "to_k", "to_v")]).detach()
            continue
        out[cname + ".weight"] = m.weight.detach().clone()
        if m.bias is not None:
            out[cname + ".bias"] = m.bias.detach().clone()
    return out


def check_comfy_equals_trained(family, base, comfy, net, module_names) -> set[str]:
    merged, patched, unconsumed = comfy_merge(base, comfy)
    assert not unconsumed, sorted(unconsumed)
    expected = dict(base)
    for lyco, (w, b) in effective_weights(net).items():
        module = module_names[lyco]
        cname = diffusers_to_comfyui_module(family, module)
        if family == "lumina2" and module[-5:] in (".to_q", ".to_k", ".to_v"):  # rows of the fused qkv
            start = {"q": 0, "k": 48, "v": 72}[module[-1]]
            fused = expected[cname + ".weight"].clone()
            fused[start : start + w.shape[0]] = w
            w = fused
        expected[cname + ".weight"] = w
        if b is not None and not torch.equal(b, base[cname + ".bias"]):
            expected[cname + ".bias"] = b
    changed = {k for k in expected if not torch.equal(expected[k], base[k])}
    assert patched == changed, (sorted(patched - changed), sorted(changed - patched))
    for k in base:
        err = (merged[k] - expected[k]).abs().max().item()
        assert err <= ATOL, f"{k}: ComfyUI's merge differs from the trained weight by {err:.2e}"
    return patched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_comfyui_merge_of_lycoris_file_equals_trained_weights(transformers, family, algo):
    t = transformers[family]()
    base = comfy_base(family, t)
    net = with_lycoris(t, ALGOS[algo])
    sd = net.state_dict()
    names = lycoris_module_names(t)
    comfy = lycoris_to_comfyui(family, sd, names, dict(t.config), base_weights_of(t, list(names.values())))
    patched = check_comfy_equals_trained(family, base, comfy, net, names)
    assert {k for k in patched if k.endswith(".weight")} == {k for k in base if k.endswith(".weight")}

    params = {k.rsplit(".", 1)[-1] if "lora_" not in k else k.split(".", 1)[1] for k in sd}
    if algo == "lokr-factorised":
        assert {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"} <= params
    if algo == "lokr-full-matrix":
        assert {k.split(".")[-1] for k in comfy} == {"lokr_w1", "lokr_w2", "alpha"}
    if algo == "lokr-tucker":  # a Linear has no kernel: lycoris makes no lokr_t2, the layout is plain LoKr
        assert not any("lokr_t" in k for k in sd)
    if family == "lumina2":
        assert any(k.startswith(P + "layers.0.attention.qkv.") for k in comfy)
        assert not any(".attn." in k for k in comfy)
    # the inverse gives the network's own state dict back
    back = comfyui_to_lycoris(family, comfy, names, dict(t.config), base_weights_of(t, list(names.values())))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.allclose(back[k].float(), sd[k].float(), atol=1e-6, rtol=1e-5), k


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wd_on_output", [True, False])
@pytest.mark.parametrize("algo", ["locon", "lokr-factorised", "loha"])
def test_lycoris_dora_round_trips_through_comfyui(transformers, family, algo, wd_on_output):
    """dora_wd on the output axis is baked against the base weight (ComfyUI divides by ||W||, not
    ||W + dW||); on the input axis ComfyUI's rule is LyCORIS's and dora_scale is written as it is."""
    t = transformers[family]()
    base = comfy_base(family, t)
    net = with_lycoris(t, {**ALGOS[algo], "dora_wd": True, "wd_on_output": wd_on_output})
    sd = net.state_dict()
    names = lycoris_module_names(t)
    bases = base_weights_of(t, list(names.values()))
    comfy = lycoris_to_comfyui(family, sd, names, dict(t.config), bases)
    dora_keys = [k for k in comfy if k.endswith(".dora_scale")]
    assert dora_keys and all(comfy[k].dtype == torch.float32 for k in dora_keys)
    for k in dora_keys:
        rows = base[k.removeprefix(P).replace(".dora_scale", ".weight")].shape[0]
        assert comfy[k].shape[0] == (rows if wd_on_output else 1)
    check_comfy_equals_trained(family, base, comfy, net, names)

    back = comfyui_to_lycoris(family, comfy, names, dict(t.config), bases)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.allclose(back[k], sd[k], atol=1e-6, rtol=1e-5), k

    if wd_on_output:
        # written as LyCORIS holds it, ComfyUI would apply it wrongly: the bake is what makes it right
        lyco_of = {diffusers_to_comfyui_module(family, names[m.lora_name]): m.lora_name for m in net.loras}
        naive = dict(comfy)
        for k in dora_keys:
            naive[k] = sd[lyco_of[k.removeprefix(P)[: -len(".dora_scale")]] + ".dora_scale"]
        with pytest.raises(AssertionError, match="differs from the trained weight"):
            check_comfy_equals_trained(family, base, naive, net, names)
        with pytest.raises(ConfigError, match="base weight"):
            lycoris_to_comfyui(family, sd, names, dict(t.config))
    else:  # the input axis needs no base weight
        assert lycoris_to_comfyui(family, sd, names, dict(t.config)).keys() == comfy.keys()


# ---------------------------------------------------------------------- Lumina 2 unfused q/k/v
def test_unfused_lumina2_locon_is_fused_block_diagonally(transformers):
    t = transformers["lumina2-unfused"]()
    base = comfy_base("lumina2", t)
    net = with_lycoris(t, ALGOS["locon"])
    names = lycoris_module_names(t)
    comfy = lycoris_to_comfyui("lumina2", net.state_dict(), names, dict(t.config))
    qkv = P + "layers.0.attention.qkv."
    assert comfy[qkv + "lora_down.weight"].shape == (3 * 4, 48)
    assert comfy[qkv + "lora_up.weight"].shape == (48 + 24 + 24, 3 * 4)
    check_comfy_equals_trained("lumina2", base, comfy, net, names)
    back = comfyui_to_lycoris("lumina2", comfy, names, dict(t.config))
    sd = net.state_dict()
    assert set(back) == set(sd) and all(torch.allclose(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("algo", ["lokr-factorised", "loha", "full"])
def test_unfused_lumina2_lycoris_other_than_locon_is_refused(transformers, algo):
    t = transformers["lumina2-unfused"]()
    net = with_lycoris(t, ALGOS[algo])
    with pytest.raises(ConfigError, match=r"attn\.to_q: a LyCORIS .* cannot be written") as err:
        lycoris_to_comfyui("lumina2", net.state_dict(), lycoris_module_names(t), dict(t.config))
    assert "to_qkv" in err.value.hint


def test_unmappable_and_unknown_modules_are_refused(transformers):
    t = transformers["kandinsky5-image"]()
    net = with_lycoris(t, ALGOS["lokr-factorised"])
    sd = dict(net.state_dict())
    names = lycoris_module_names(t)
    with pytest.raises(ConfigError, match="lycoris_not_a_module"):
        lycoris_to_comfyui("kandinsky5-image", {**sd, "lycoris_not_a_module.lokr_w1": torch.ones(2, 2)}, names, {})
    with pytest.raises(ConfigError, match="oft_blocks"):
        lycoris_to_comfyui(
            "kandinsky5-image", {**sd, "lycoris_out_layer_out_layer.oft_blocks": torch.ones(2)}, names, {}
        )
    key = next(k for k in sd if k.endswith("lokr_w2_b"))
    with pytest.raises(ConfigError, match="lacks"):
        lycoris_to_comfyui("kandinsky5-image", {k: v for k, v in sd.items() if k != key}, names, {})
    # a delta that does not fit the weight would make ComfyUI log an error and skip the module
    bases = base_weights_of(t, list(names.values()))
    wrong = {**bases, names[key.split(".")[0]]: torch.zeros(3, 3)}
    with pytest.raises(ConfigError, match="reshape"):
        lycoris_to_comfyui("kandinsky5-image", sd, names, {}, wrong)


def test_lumina2_module_without_a_comfyui_name_is_refused(transformers):
    t = transformers["lumina2"]()
    t.extra = torch.nn.Linear(4, 4)
    net = with_lycoris(t, ALGOS["loha"])
    with pytest.raises(ConfigError, match="'extra' has no ComfyUI name"):
        lycoris_to_comfyui("lumina2", net.state_dict(), lycoris_module_names(t), dict(t.config))


# ---------------------------------------------------------------------- PEFT DoRA
LUMINA2_DORA_TARGETS = [
    ["to_q", "to_k", "to_v", "to_out.0", "linear_1", "norm1.linear"],
    ["to_q"],
    ["to_k", "to_v"],
]


def _peft_dora(t: torch.nn.Module, targets: list[str]):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, use_dora=True, init_lora_weights=False)
    add_lora(t, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cfg


def _peft_base_and_merged(family, t):
    base_t = copy.deepcopy(t)
    base_t.unload_lora()
    merged_t = copy.deepcopy(t)
    merged_t.fuse_lora()
    merged_t.unload_lora()
    return comfy_base(family, base_t), comfy_base(family, merged_t)


@pytest.mark.parametrize(
    ("family", "targets"),
    [("lumina2", tg) for tg in LUMINA2_DORA_TARGETS]
    + [
        (f, ["to_query", "to_value", "self_attention.out_layer", "feed_forward.in_layer"])
        for f in ("kandinsky5-image", "kandinsky5-video")
    ],
)
def test_peft_dora_round_trips_through_comfyui(transformers, family, targets):
    t = transformers["lumina2-unfused" if family == "lumina2" else family]()
    _peft_dora(t, targets)
    sd = adapter_state_dict(t)
    assert any(k.endswith(".lora_magnitude_vector") for k in sd)
    modules = sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_A.weight")})
    bases = base_weights_of(t, modules)
    comfy = to_comfyui(family, sd, 8.0, dict(t.config), bases)
    base, expected = _peft_base_and_merged(family, t)
    merged, patched, unconsumed = comfy_merge(base, comfy)
    assert not unconsumed, sorted(unconsumed)
    changed = {k for k in base if not torch.equal(base[k], expected[k])}
    assert patched == changed
    for k in base:
        err = (merged[k] - expected[k]).abs().max().item()
        assert err <= ATOL, f"{k}: {err:.2e}"
    for k in (k for k in comfy if k.endswith(".dora_scale")):
        assert comfy[k].dtype == torch.float32 and comfy[k].shape[1] == 1

    back, alpha = from_comfyui(family, comfy, dict(t.config), base_weights=bases)
    assert alpha == 8.0 and set(back) == set(sd)
    for k in sd:
        assert torch.allclose(back[k], sd[k], atol=1e-6, rtol=1e-5), k

    with pytest.raises(ConfigError, match="base weight"):
        to_comfyui(family, sd, 8.0, dict(t.config))
    with pytest.raises(ConfigError, match="base weight"):
        from_comfyui(family, comfy, dict(t.config))


def test_peft_dora_on_one_lumina2_projection_leaves_the_other_qkv_rows_unchanged(transformers):
    t = transformers["lumina2-unfused"]()
    _peft_dora(t, ["to_k"])
    sd = adapter_state_dict(t)
    bases = base_weights_of(t, ["layers.0.attn.to_k"])
    assert {"layers.0.attn.to_q", "layers.0.attn.to_v"} <= set(bases)  # siblings come along
    comfy = to_comfyui("lumina2", sd, 8.0, dict(t.config), base_weights_of(t, [k.rsplit(".", 1)[0] for k in sd]))
    base, _ = _peft_base_and_merged("lumina2", t)
    merged, _, _ = comfy_merge(base, comfy)
    w, m = base["layers.0.attention.qkv.weight"], merged["layers.0.attention.qkv.weight"]
    assert torch.allclose(m[:48], w[:48], atol=1e-6) and torch.allclose(m[72:], w[72:], atol=1e-6)
    assert (m[48:72] - w[48:72]).abs().max() > 1e-2


# ---------------------------------------------------------------------- the two files
def _read(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), f.metadata()


SAVE_CASES = [(f, a) for f in ("lumina2", "kandinsky5-image") for a in ALGOS] + [
    ("kandinsky5-video", "lokr-factorised"),
    ("kandinsky5-image", "locon+dora"),
]


@pytest.mark.parametrize(("family", "algo"), SAVE_CASES)
def test_save_lycoris_writes_a_lycoris_file_lycoris_reloads_and_a_comfyui_file(transformers, tmp_path, family, algo):
    from lycoris import create_lycoris_from_weights

    from trainer_core.lora.export import lora_metadata, save_lycoris

    settings = {**ALGOS[algo.split("+")[0]], **({"dora_wd": True} if "dora" in algo else {})}
    t = transformers[family]()
    base = comfy_base(family, t)
    net = with_lycoris(t, settings)
    names = lycoris_module_names(t)
    meta = lora_metadata(family=family, flavour="tiny", rank=4, alpha=4.0, steps=7, target_modules=["Linear"])
    files = save_lycoris(
        tmp_path, "mine", family, net.state_dict(), names, settings, dict(t.config),
        base_weights_of(t, list(names.values())), meta,
    )  # fmt: skip
    assert files.adapter == settings["algo"]
    assert files.diffusers == tmp_path / "pytorch_lora_weights.safetensors"
    native, native_meta = _read(files.diffusers)
    comfy, comfy_meta = _read(files.comfyui)
    for m in (native_meta, comfy_meta):
        assert m["comfyui_tuner.adapter"] == settings["algo"]
        assert json.loads(m["comfyui_tuner.lycoris_config"]) == settings
        assert m["ss_network_module"] == "lycoris.kohya" and m["ss_network_dim"] == str(settings["linear_dim"])
        assert m["comfyui_tuner.steps"] == "7"
    assert json.loads(native_meta["lycoris_config"]) == settings
    assert set(native) == set(net.state_dict())
    check_comfy_equals_trained(family, base, comfy, net, names)

    fresh = transformers[family]()
    reloaded, _ = create_lycoris_from_weights(1.0, str(files.diffusers), fresh)
    reloaded.apply_to()
    reloaded.eval()
    want, got = effective_weights(net), effective_weights(reloaded)
    assert set(got) == set(want)
    for k, (w, b) in want.items():
        assert torch.allclose(got[k][0], w, atol=1e-6), k
        assert (b is None) == (got[k][1] is None) and (b is None or torch.allclose(got[k][1], b, atol=1e-6)), k


def test_save_lora_writes_dora_scale_and_names_the_adapter(transformers, tmp_path):
    from trainer_core.lora.export import lora_metadata, save_lora

    t = transformers["lumina2-unfused"]()
    cfg = _peft_dora(t, ["to_q", "to_k", "to_v", "to_out.0"])
    sd = adapter_state_dict(t)
    modules = sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_A.weight")})
    meta = lora_metadata(family="lumina2", flavour="tiny", rank=4, alpha=8.0, steps=1, target_modules=modules)
    with pytest.raises(ConfigError, match="base weight"):
        save_lora(tmp_path, "d", "lumina2", sd, cfg, dict(t.config), meta)
    files = save_lora(
        tmp_path, "d", "lumina2", sd, cfg, dict(t.config), meta, torch.bfloat16, base_weights_of(t, modules)
    )
    comfy, comfy_meta = _read(files.comfyui)
    assert files.adapter == "dora" and comfy_meta["comfyui_tuner.adapter"] == "dora"
    assert comfy[P + "layers.0.attention.qkv.dora_scale"].dtype == torch.float32  # exact scales even in bf16 files
    assert comfy[P + "layers.0.attention.qkv.lora_A.weight"].dtype == torch.bfloat16
    base, expected = _peft_base_and_merged("lumina2", t)
    merged, _, unconsumed = comfy_merge(base, comfy)
    assert not unconsumed
    # bf16 factors: the bake used the bf16 tensors ComfyUI reads, so only their rounding remains
    assert max((merged[k] - expected[k]).abs().max().item() for k in base) < 2e-2
    _, diffusers_meta = _read(files.diffusers)
    assert json.loads(diffusers_meta["lora_adapter_metadata"])["transformer.use_dora"] is True

    plain = transformers["lumina2-unfused"]()
    add_lora(plain, LoraConfig(r=4, lora_alpha=8.0, target_modules=["to_q"]))
    files = save_lora(tmp_path / "p", "p", "lumina2", adapter_state_dict(plain), plain.peft_config["default"],
                      dict(plain.config), meta)  # fmt: skip
    assert files.adapter == "lora" and _read(files.comfyui)[1]["comfyui_tuner.adapter"] == "lora"


@pytest.mark.parametrize("precision", ["int8-quanto", "int8-torchao"])
def test_base_weights_for_the_dora_bake_are_dequantised(precision):
    """ComfyUI patches the full-precision checkpoint; the bake uses the closest weight the trainer has."""
    from trainer_core.memory.quantize import backend_available, backend_of, is_quantized_tensor, quantize_model

    if not backend_available(backend_of(precision)):
        pytest.skip(f"{precision} backend is not installed")
    t = build_kandinsky5_transformer().float().eval()
    name = "visual_transformer_blocks.0.self_attention.to_query"
    full = dict(t.named_modules())[name].weight.detach().clone()
    quantize_model(t, precision)
    weight = dict(t.named_modules())[name].weight
    assert is_quantized_tensor(weight)
    (got,) = base_weights_of(t, [name]).values()
    assert not is_quantized_tensor(got) and type(got) is torch.Tensor and got.shape == full.shape
    assert torch.equal(got, weight.dequantize())
    assert 0 < (got - full).abs().max() < 0.01 * full.abs().max()


@pytest.mark.parametrize(
    ("algo", "tucker_keys"),
    [("locon", {"lora_mid.weight"}), ("lokr", {"lokr_t2"}), ("loha", {"hada_t1", "hada_t2"})],
)
def test_stand_in_conv_tucker_rules_agree_with_lycoris(algo, tucker_keys):
    """The stand-in's (and the exporter's) lora_mid / lokr_t2 / hada_t1-t2 rules, which only 3x3 convs produce.

    No family adapts a conv today; this keeps those branches of ComfyUI's rules honest anyway.
    Alpha equals the dim (scale 1), where LyCORIS's get_merged_weight is reliable.
    """
    from lycoris import LycorisNetwork, create_lycoris

    toy = torch.nn.Module()
    toy.conv = torch.nn.Conv2d(32, 48, 3, padding=1)
    base = {"conv.weight": toy.conv.weight.detach().clone(), "conv.bias": toy.conv.bias.detach().clone()}
    LycorisNetwork.apply_preset({"target_module": ["Conv2d"], "target_name": [], "module_algo_map": {}})
    net = create_lycoris(toy, 1.0, 2, 2.0, algo=algo, conv_dim=2, conv_alpha=2.0, use_tucker=True)
    net.apply_to()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sd = net.state_dict()
    assert tucker_keys <= {k.split(".", 1)[1] for k in sd}
    (lora,) = net.loras
    assert lora.scale == 1.0
    comfy = lycoris_to_comfyui("kandinsky5-image", sd, {"lycoris_conv": "conv"}, {})
    if algo == "lokr":  # ComfyUI cannot apply lokr_t2 (ERROR, weight skipped): the file holds the rebuilt w2
        raw = {P + k.replace("lycoris_conv", "conv"): v for k, v in sd.items()}
        assert any("ERROR" in e for e in comfy_merge(base, raw)[2])
        assert "diffusion_model.conv.lokr_w2" in comfy and not any("lokr_t2" in k for k in comfy)
    merged, patched, unconsumed = comfy_merge(base, comfy)
    assert not unconsumed and patched == {"conv.weight"}
    want = lora.get_merged_weight()[0].detach()
    assert (want - base["conv.weight"]).abs().max() > 1e-2
    assert torch.allclose(merged["conv.weight"], want, atol=ATOL)
