"""Our ComfyUI LoRA file, judged by ComfyUI's own code: opt-in, ``pytest -k comfyui`` with ``COMFYUI_DIR`` set.

``test_lora_export.py`` checks the ComfyUI file against ComfyUI's merge rule, but it takes the
expected module names from the exporter's own table, so a wrong name there passes it. Here every
expectation comes from ComfyUI itself, imported in-process from the checkout in ``COMFYUI_DIR`` (a
read-only tree is fine: nothing is written into it). For each family, Lumina 2, Kandinsky 5 image
and Kandinsky 5 video:

1. ComfyUI's own model class (``NextDiT``, ``Kandinsky5``) is built at the tiny shapes, holding the
   weights of the tiny diffusers transformer. Kandinsky 5 uses diffusers' module names, so its state
   dict is loaded as it is. For Lumina 2 the names come from diffusers' own converter of ComfyUI
   checkpoints (``convert_lumina2_to_diffusers``), and the fused ``attention.qkv`` is split at the
   rows ComfyUI's attention module splits it. The two models must agree before any LoRA: this is
   what makes the comparisons below mean something.
2. A LoRA with random, non-zero A and B on every Linear layer (attention, feed-forward, adaLN
   modulation, the patch/caption/time/text embedders and the final layer: a superset of every
   preset), rank 4 and alpha 8 so that a lost alpha shows, is written by ``save_lora``.
3. That file goes through ComfyUI's LoraLoaderModelOnly path (``comfy.utils.load_torch_file``, then
   ``comfy.sd.load_lora_for_models``), and then:

   - every module in the file is one ComfyUI's key map knows and ``load_lora`` consumes, with no
     "lora key not loaded";
   - every weight ComfyUI patches equals diffusers' ``fuse_lora`` weight, and exactly the targeted
     weights change;
   - ComfyUI's patched model gives diffusers' merged model's output, on inputs where the LoRA moves
     the output far beyond the tolerance.

The same checks run for LyCORIS files (LoKr factorised and full-matrix, LoHa, LoCon, full, DoRA via
``dora_wd`` on both axes) written by ``save_lycoris``, and for a PEFT DoRA file (``dora_scale``)
written by ``save_lora``, against the weights the adapter applies in training (within 1e-4).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from trainer_core.families import family_names, get_family_class
from trainer_core.lora.adapters import adapter_state_dict, add_lora, lora_config
from trainer_core.lora.export import lora_metadata, save_lora
from trainer_core.spec import LoraSpec

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
RANK, ALPHA = 4, 8.0
FAMILIES = ("lumina2", "kandinsky5-image", "kandinsky5-video")
WEIGHT_TOL = 1e-6  # the same arithmetic on both sides: measured 0.0
OUTPUT_TOL = 1e-3  # of the output's largest value; two implementations in fp32 differ by <= 1e-4 (measured)
CPU = torch.device("cpu")

pytestmark = [
    pytest.mark.skipif(
        not COMFYUI_DIR,
        reason="set COMFYUI_DIR to a ComfyUI checkout (e.g. ../shared/comfyui/v0.33.0) and run with a Python "
        "that has ComfyUI's requirements (torchvision)",
    ),
    pytest.mark.usefixtures("one_cpu_thread"),
]


# ---------------------------------------------------------------------- ComfyUI, in-process
def _under(module: Any, root: Path) -> bool:
    """Whether ``module`` was imported from under ``root`` (a package by its search path, too)."""
    spec = getattr(module, "__spec__", None)
    paths = [getattr(module, "__file__", None), *(getattr(spec, "submodule_search_locations", None) or [])]
    return any(isinstance(p, str) and Path(p).resolve().is_relative_to(root) for p in paths)


@pytest.fixture(scope="module")
def comfy() -> Iterator[SimpleNamespace]:
    """ComfyUI's ``comfy`` package from ``COMFYUI_DIR``, on the CPU; removed from ``sys.modules`` afterwards.

    The node tests put stand-ins named ``comfy``/``comfy_api``/``folder_paths``/``server`` on the path
    (tests/comfy_stub); any that are loaded are set aside while the real ones are in use, then restored.
    """
    root = Path(COMFYUI_DIR or "").resolve()
    if not (root / "comfy" / "lora.py").is_file():
        pytest.fail(f"COMFYUI_DIR={root} is not a ComfyUI checkout (no comfy/lora.py)")
    stand_ins = ("comfy", "comfy_api", "folder_paths", "server")
    aside = {n: m for n, m in sys.modules.items() if n.split(".")[0] in stand_ins and not _under(m, root)}
    for name in aside:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # read when model_management is first imported
        import comfy.lora
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sd
        import comfy.supported_models
        import comfy.utils

        yield SimpleNamespace(
            lora=comfy.lora,
            model_patcher=comfy.model_patcher,
            sd=comfy.sd,
            supported_models=comfy.supported_models,
            utils=comfy.utils,
        )
    finally:
        sys.path.remove(str(root))
        for name in [n for n, m in sys.modules.items() if _under(m, root)]:
            del sys.modules[name]
        sys.modules.update(aside)


# ---------------------------------------------------------------------- the two models of one family
@dataclass
class Pair:
    """A tiny diffusers transformer, ComfyUI's model with the same weights, and how to compare them."""

    family: str
    diffusers: torch.nn.Module
    comfy_model: Any  # comfy.model_base.BaseModel
    to_comfy: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # diffusers state dict -> ComfyUI's
    run_diffusers: Callable[[torch.nn.Module], torch.Tensor]
    run_comfy: Callable[[torch.nn.Module], torch.Tensor]  # ComfyUI's output, in diffusers' layout and sign


def _lumina2_pair(comfy: SimpleNamespace, tiny_lumina2: Path) -> Pair:
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    t = Lumina2Transformer2DModel.from_pretrained(tiny_lumina2, subfolder="transformer").float().eval()
    c = t.config
    unet_config = {
        "image_model": "lumina2",
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
        # diffusers widens the feed-forward from 4 * dim, ComfyUI from dim (the real model's 4.0 is its multiplier)
        "ffn_dim_multiplier": 4.0 * (c.ffn_dim_multiplier or 1.0),
        "norm_eps": c.norm_eps,
        "axes_dims": list(c.axes_dim_rope),
        "axes_lens": list(c.axes_lens),
        "rope_theta": 10000.0,
    }
    model = _comfy_model(comfy, "Lumina2", unet_config)
    net = model.diffusion_model
    comfy_keys = list(net.state_dict())

    # diffusers' converter for everything but the fused qkv, whose split it hard-codes at full size
    plain = [k for k in comfy_keys if ".attention.qkv." not in k]
    renamed = convert_lumina2_to_diffusers({k: torch.tensor(i) for i, k in enumerate(plain)})
    comfy_by_diffusers = {d: plain[int(i)] for d, i in renamed.items()}
    qkv_rows = {}  # ComfyUI key -> (diffusers q/k/v keys, rows), from ComfyUI's attention modules
    for name, module in net.named_modules():
        if name.endswith(".attention"):
            rows = [module.n_local_heads * module.head_dim] + [module.n_local_kv_heads * module.head_dim] * 2
            for leaf in ("weight", "bias"):
                if f"{name}.qkv.{leaf}" in comfy_keys:
                    stem = name[: -len(".attention")]
                    qkv_rows[f"{name}.qkv.{leaf}"] = ([f"{stem}.attn.to_{p}.{leaf}" for p in "qkv"], rows)

    def to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {ck: sd[dk] for dk, ck in comfy_by_diffusers.items()}
        for ck, (dks, rows) in qkv_rows.items():
            assert [sd[k].shape[0] for k in dks] == rows, f"{ck}: q/k/v rows differ from ComfyUI's {rows}"
            out[ck] = torch.cat([sd[k] for k in dks])
        return out

    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, c.in_channels, 8, 8, generator=g)
    cap = torch.randn(1, 5, c.cap_feat_dim, generator=g)
    sigma = 0.4

    def run_diffusers(m: torch.nn.Module) -> torch.Tensor:
        mask = torch.ones(1, cap.shape[1], dtype=torch.bool)
        return m(x, torch.tensor([1.0 - sigma]), cap, mask, return_dict=False)[0]

    def run_comfy(m: torch.nn.Module) -> torch.Tensor:
        # ComfyUI's NextDiT takes sigma and returns the negated prediction (it does 1 - t and -img itself)
        return -m(x, torch.tensor([sigma]), cap, cap.shape[1])

    return Pair("lumina2", t, model, to_comfy, run_diffusers, run_comfy)


def _kandinsky5_pair(comfy: SimpleNamespace, family: str) -> Pair:
    from trainer_core.testing.tiny import build_kandinsky5_transformer, kandinsky5_transformer_config

    video = family == "kandinsky5-video"
    # the tiny video transformer has visual_cond (33 input channels), as every published K5 video checkpoint
    t = build_kandinsky5_transformer(kandinsky5_transformer_config(visual_cond=video)).float().eval()
    c = t.config
    patch = list(c.patch_size)
    in_dim = c.in_visual_dim * (2 if c.visual_cond else 1) + int(c.visual_cond)
    scale = (1.0, 2.0, 2.0) if video else (1.0, 1.0, 1.0)  # the Lite video flavours' RoPE scale; images: none
    unet_config = {
        "image_model": "kandinsky5",
        "in_visual_dim": c.in_visual_dim,
        "out_visual_dim": c.out_visual_dim,
        "in_text_dim": c.in_text_dim,
        "in_text_dim2": c.in_text_dim2,
        "time_dim": c.time_dim,
        "model_dim": c.model_dim,
        "ff_dim": c.ff_dim,
        "visual_embed_dim": in_dim * patch[0] * patch[1] * patch[2],
        "patch_size": patch,
        "num_text_blocks": c.num_text_blocks,
        "num_visual_blocks": c.num_visual_blocks,
        "axes_dims": list(c.axes_dims),
        "rope_scale_factor": list(scale),
    }
    model = _comfy_model(comfy, "Kandinsky5" if video else "Kandinsky5Image", unet_config)
    model.diffusion_model.load_state_dict(t.state_dict(), strict=True)  # ComfyUI's names are diffusers'

    g = torch.Generator().manual_seed(7)
    frames = 2 if video else 1
    x = torch.randn(1, frames, 8, 8, in_dim, generator=g)  # diffusers' (B, T, H, W, C)
    text = torch.randn(1, 5, c.in_text_dim, generator=g)
    pooled = torch.randn(1, c.in_text_dim2, generator=g)
    timestep = torch.tensor([400.0])  # 1000 * sigma, as both pass it

    def run_diffusers(m: torch.nn.Module) -> torch.Tensor:
        rope = [torch.arange(frames // patch[0]), torch.arange(8 // patch[1]), torch.arange(8 // patch[2])]
        return m(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            visual_rope_pos=rope,
            text_rope_pos=torch.arange(text.shape[1]),
            scale_factor=scale,
            return_dict=False,
        )

    def run_comfy(m: torch.nn.Module) -> torch.Tensor:
        return m(x.movedim(-1, 1), timestep, text, pooled).movedim(1, -1)  # ComfyUI's (B, C, T, H, W)

    return Pair(family, t, model, lambda sd: dict(sd), run_diffusers, run_comfy)


def _comfy_model(comfy: SimpleNamespace, kind: str, unet_config: dict[str, Any]) -> Any:
    config = getattr(comfy.supported_models, kind)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.eval()
    return model


def _load_into_comfy(pair: Pair) -> None:
    net = pair.comfy_model.diffusion_model
    sd = pair.to_comfy(pair.diffusers.state_dict())
    missing = sorted(set(net.state_dict()) - set(sd))
    assert not missing, f"the test gives ComfyUI's {pair.family} model no value for {missing}"
    net.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------- the LoRA
def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def _with_random_lora(t: torch.nn.Module, targets: list[str]) -> tuple[torch.nn.Module, Any]:
    """A copy of ``t`` with a LoRA on ``targets``: random A and B, B scaled to a trained LoRA's size."""
    t = copy.deepcopy(t)
    cfg = lora_config(LoraSpec(lora_rank=RANK, lora_alpha=ALPHA), targets, init_weights=False)
    torch.manual_seed(1)
    params = add_lora(t, cfg)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    assert params and all(torch.count_nonzero(p) for p in params)
    return t, cfg


@dataclass
class Applied:
    """What ComfyUI made of our file, next to what diffusers made of the same LoRA."""

    pair: Pair
    targets: list[str]  # diffusers Linear modules the LoRA is on
    file_modules: list[str]  # '<module>' of each '<module>.<tensor>' in our ComfyUI file
    key_map: dict[str, Any]  # comfy.lora.model_lora_keys_unet: LoRA module name -> model weight
    patched_keys: set[str]  # model weights load_lora_for_models patches
    warnings: list[str]  # everything ComfyUI logged at WARNING or above while loading the LoRA
    comfy_base: dict[str, torch.Tensor]
    comfy_patched: dict[str, torch.Tensor]
    expected_patched: dict[str, torch.Tensor]  # diffusers' fuse_lora weights, under ComfyUI's names
    out_base: torch.Tensor  # diffusers, no LoRA
    out_comfy_base: torch.Tensor
    out_expected: torch.Tensor  # diffusers, LoRA merged
    out_comfy: torch.Tensor  # ComfyUI, LoRA applied by ComfyUI
    bias_modules: list[str] = field(default_factory=list)  # modules whose bias the file changes (diff_b)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _pair_for(comfy: SimpleNamespace, family: str, tiny_lumina2: Path) -> Pair:
    pair = _lumina2_pair(comfy, tiny_lumina2) if family == "lumina2" else _kandinsky5_pair(comfy, family)
    _load_into_comfy(pair)
    return pair


def _apply_file(
    comfy: SimpleNamespace,
    pair: Pair,
    path: Path,
    targets: list[str],
    expected_sd: dict[str, torch.Tensor],
) -> Applied:
    """ComfyUI's LoraLoaderModelOnly path on the file at ``path``, next to diffusers with ``expected_sd`` loaded.

    ``expected_sd`` is the diffusers state dict the adapter makes (diffusers' names, unfused).
    """
    net = pair.comfy_model.diffusion_model
    with torch.no_grad():
        out_base, out_comfy_base = pair.run_diffusers(pair.diffusers), pair.run_comfy(net)
    comfy_base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    expected_model = copy.deepcopy(pair.diffusers)
    expected_model.load_state_dict(expected_sd, strict=True)
    with torch.no_grad():
        out_expected = pair.run_diffusers(expected_model)
    expected_patched = pair.to_comfy(expected_sd)

    # LoraLoaderModelOnly: load_torch_file, then load_lora_for_models (strength 1.0), then sampling patches
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        key_map = comfy.lora.model_lora_keys_unet(pair.comfy_model, {})
        patcher = comfy.model_patcher.ModelPatcher(pair.comfy_model, load_device=CPU, offload_device=CPU)
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
        patched.patch_model(device_to=CPU)
    finally:
        logging.getLogger().removeHandler(records)
    try:
        comfy_patched = {k: v.detach().clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            out_comfy = pair.run_comfy(net)
    finally:
        patched.unpatch_model(device_to=CPU)
    return Applied(
        pair=pair,
        targets=targets,
        file_modules=_file_modules(lora),
        key_map=key_map,
        patched_keys={k.removeprefix("diffusion_model.") for k in patched.patches},
        warnings=records.lines,
        comfy_base=comfy_base,
        comfy_patched=comfy_patched,
        expected_patched=expected_patched,
        out_base=out_base,
        out_comfy_base=out_comfy_base,
        out_expected=out_expected,
        out_comfy=out_comfy,
        bias_modules=sorted(k[: -len(".diff_b")] for k in lora if k.endswith(".diff_b")),
    )


# the tensor names ComfyUI's loaders read after '<module>.'
_PARAMS = sorted(
    [
        "lora_A.weight", "lora_B.weight", "lora_up.weight", "lora_down.weight", "lora_mid.weight",
        "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "diff", "diff_b", "w_norm", "b_norm", "alpha", "dora_scale",
    ],
    key=len,
    reverse=True,
)  # fmt: skip


def _file_modules(lora: dict[str, torch.Tensor]) -> list[str]:
    """'<module>' of every key of the file (a key with no known tensor name is its own module)."""
    out = set()
    for key in lora:
        param = next((p for p in _PARAMS if key.endswith("." + p)), None)
        out.add(key[: -len(param) - 1] if param else key)
    return sorted(out)


@pytest.fixture(scope="module", params=FAMILIES)
def applied(request, comfy, tiny_lumina2, tmp_path_factory) -> Applied:
    family = request.param
    pair = _pair_for(comfy, family, tiny_lumina2)
    targets = _linear_names(pair.diffusers)
    lora_model, cfg = _with_random_lora(pair.diffusers, targets)
    meta = lora_metadata(family=family, flavour="tiny", rank=RANK, alpha=ALPHA, steps=1, target_modules=targets)
    out_dir = tmp_path_factory.mktemp(f"lora-{family}")
    files = save_lora(out_dir, "tiny", family, adapter_state_dict(lora_model), cfg, dict(lora_model.config), meta)
    lora_model.fuse_lora()
    lora_model.unload_lora()
    return _apply_file(comfy, pair, files.comfyui, targets, lora_model.state_dict())


def _weight_key(target: Any) -> str:
    """A key-map value (a weight key, or (key, slice) for sliced targets) as a state-dict key."""
    key = target[0] if isinstance(target, tuple) else target
    return key.removeprefix("diffusion_model.")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# ---------------------------------------------------------------------- the tests
def test_comfyui_and_diffusers_tiny_models_agree_without_a_lora(applied: Applied):
    """The weight correspondence the other tests rely on: same weights, same output, before any LoRA."""
    err = _rel_err(applied.out_comfy_base, applied.out_base)
    assert applied.out_comfy_base.shape == applied.out_base.shape
    assert err < OUTPUT_TOL, f"{applied.pair.family}: ComfyUI's model differs from diffusers' by {err:.2e}"


def test_comfyui_loads_every_module_of_our_lora_file(applied: Applied):
    """Every module name in the file is one ComfyUI's key map knows, and nothing is left unloaded."""
    unknown = [m for m in applied.file_modules if m not in applied.key_map]
    nearest = {m: difflib.get_close_matches(m, list(applied.key_map), n=1) for m in unknown[:5]}
    assert not unknown, f"{applied.pair.family}: ComfyUI has no module for {unknown}; nearest ComfyUI names: {nearest}"
    not_loaded = [w for w in applied.warnings if "not loaded" in w.lower()]
    assert not not_loaded, not_loaded
    targets = {_weight_key(applied.key_map[m]) for m in applied.file_modules}
    assert applied.patched_keys == targets, sorted(applied.patched_keys ^ targets)
    # one ComfyUI weight per diffusers Linear, except Lumina 2's q/k/v, which share ComfyUI's fused qkv
    fused = sum(1 for t in applied.targets if t.endswith(("attn.to_k", "attn.to_v")))
    assert len(applied.patched_keys) == len(applied.targets) - fused


def test_comfyui_patched_weights_equal_diffusers_merged_lora(applied: Applied):
    """ComfyUI's patched weights are diffusers' fuse_lora weights, and only the LoRA's weights change."""
    base, got, want = applied.comfy_base, applied.comfy_patched, applied.expected_patched
    assert set(got) == set(want)
    should_change = {k for k in want if not torch.equal(want[k], base[k])}
    did_change = {k for k in got if not torch.equal(got[k], base[k])}
    assert did_change == should_change, (
        f"ComfyUI left unpatched: {sorted(should_change - did_change)}; "
        f"patched without cause: {sorted(did_change - should_change)}"
    )
    wrong = {k: (got[k] - want[k]).abs().max().item() for k in should_change}
    wrong = {k: e for k, e in wrong.items() if e > WEIGHT_TOL}
    assert not wrong, f"{applied.pair.family}: ComfyUI's patched weights differ from diffusers' merge: {wrong}"
    assert should_change == applied.patched_keys


# A layer of each kind the LoRA must reach in ComfyUI, per family (diffusers names).
KINDS = {
    "lumina2": {
        "attention": ["layers.0.attn.to_q", "layers.0.attn.to_k", "layers.0.attn.to_v", "layers.0.attn.to_out.0"],
        "feed-forward": ["layers.0.feed_forward.linear_1", "layers.0.feed_forward.linear_3"],
        "adaLN": ["layers.0.norm1.linear", "noise_refiner.0.norm1.linear", "norm_out.linear_1"],
        "embedders": [
            "x_embedder",
            "time_caption_embed.caption_embedder.1",
            "time_caption_embed.timestep_embedder.linear_1",
        ],
        "final layer": ["norm_out.linear_2"],
    },
    "kandinsky5": {
        "attention": [
            "visual_transformer_blocks.0.self_attention.to_query",
            "visual_transformer_blocks.0.cross_attention.to_value",
            "text_transformer_blocks.0.self_attention.out_layer",
        ],
        "feed-forward": ["visual_transformer_blocks.0.feed_forward.in_layer"],
        "adaLN": ["visual_transformer_blocks.0.visual_modulation.out_layer", "out_layer.modulation.out_layer"],
        "embedders": [
            "visual_embeddings.in_layer",
            "text_embeddings.in_layer",
            "pooled_text_embeddings.in_layer",
            "time_embeddings.in_layer",
        ],
        "final layer": ["out_layer.out_layer"],
    },
}


def test_comfyui_check_covers_each_kind_of_layer_and_every_preset(applied: Applied):
    """The LoRA checked above reaches attention, feed-forward, adaLN, embedders and the final layer, and every
    module each of the family's target presets can select (PEFT matches a target as a name suffix)."""
    assert set(FAMILIES) == set(family_names()), "a new family needs its ComfyUI model here"
    kinds = KINDS["lumina2" if applied.pair.family == "lumina2" else "kandinsky5"]
    missing = {kind: [m for m in mods if m not in applied.targets] for kind, mods in kinds.items()}
    assert not any(missing.values()), missing
    presets = get_family_class(applied.pair.family).lora_presets
    for preset, patterns in presets.items():
        unmatched = [p for p in patterns if not any(t == p or t.endswith("." + p) for t in applied.targets)]
        assert not unmatched, f"{applied.pair.family} preset {preset!r}: {unmatched} match no Linear layer"


def test_comfyui_output_with_our_lora_equals_diffusers_with_it_merged(applied: Applied):
    """The whole point: the LoRA does in ComfyUI what it does in diffusers (and it does something)."""
    effect = _rel_err(applied.out_expected, applied.out_base)
    assert effect > 100 * OUTPUT_TOL, f"the LoRA barely changes the output ({effect:.2e}); the test would be blind"
    err = _rel_err(applied.out_comfy, applied.out_expected)
    assert err < OUTPUT_TOL, f"{applied.pair.family}: ComfyUI with our LoRA differs from diffusers' merge by {err:.2e}"


# ---------------------------------------------------------------------- LyCORIS and DoRA files
# Each adapter on every Linear layer, every tensor random (tests/helpers/lycoris_models.py), written by
# save_lycoris / save_lora, and applied by ComfyUI's own loader. Lumina 2's LyCORIS adapters are trained
# on the fused attn.to_qkv (rows [q | k | v]); the expected weights are split back into diffusers' to_q/k/v,
# so that ComfyUI's names still come from diffusers' converter, not from our exporter.
LYCORIS = {
    "lokr": {"algo": "lokr", "linear_dim": 2, "linear_alpha": 4.0, "factor": 8, "decompose_both": True},
    "lokr-full-matrix": {"algo": "lokr", "linear_dim": 4, "linear_alpha": 8.0, "full_matrix": True},
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0},
    "locon": {"algo": "locon", "linear_dim": 4, "linear_alpha": 8.0},
    "full": {"algo": "full", "linear_dim": 4, "linear_alpha": 1.0},
    "locon-dora": {"algo": "locon", "linear_dim": 4, "linear_alpha": 8.0, "dora_wd": True},
    "lokr-dora-input-axis": {
        "algo": "lokr",
        "linear_dim": 2,
        "linear_alpha": 4.0,
        "factor": 8,
        "dora_wd": True,
        "wd_on_output": False,
    },  # fmt: skip
    "loha-dora": {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0, "dora_wd": True},
}
ADAPTERS = [*LYCORIS, "peft-dora"]
LYCORIS_TOL = 1e-4  # ComfyUI's kron/Hadamard/DoRA arithmetic against LyCORIS's forward, in fp32


def _lycoris_file(pair: Pair, settings: dict, out_dir: Path) -> tuple[Path, list[str], dict[str, torch.Tensor]]:
    from helpers.lycoris_models import effective_weights, fuse_lumina2_qkv, with_lycoris

    from trainer_core.lora.comfy_lycoris import lycoris_module_names
    from trainer_core.lora.dora import base_weights_of
    from trainer_core.lora.export import save_lycoris

    t = copy.deepcopy(pair.diffusers)
    if pair.family == "lumina2":
        fuse_lumina2_qkv(t)
    net = with_lycoris(t, settings)
    names = lycoris_module_names(t)
    meta = lora_metadata(family=pair.family, flavour="tiny", rank=4, alpha=4.0, steps=1, target_modules=["Linear"])
    files = save_lycoris(
        out_dir, "tiny", pair.family, net.state_dict(), names, settings, dict(t.config),
        base_weights_of(t, list(names.values())), meta,
    )  # fmt: skip
    expected = {k: v.detach().clone() for k, v in pair.diffusers.state_dict().items()}
    targets = []
    for lyco, (w, b) in effective_weights(net).items():
        module = names[lyco]
        if module.endswith(".attn.to_qkv"):  # back to diffusers' q/k/v rows
            stem, start = module[: -len("to_qkv")], 0
            for p in ("to_q", "to_k", "to_v"):
                rows = expected[f"{stem}{p}.weight"].shape[0]
                expected[f"{stem}{p}.weight"] = w[start : start + rows]
                targets.append(stem + p)
                start += rows
            assert start == w.shape[0] and b is None
            continue
        expected[module + ".weight"] = w
        if b is not None:
            expected[module + ".bias"] = b
        targets.append(module)
    return files.comfyui, sorted(targets), expected


def _peft_dora_file(pair: Pair, out_dir: Path) -> tuple[Path, list[str], dict[str, torch.Tensor]]:
    from trainer_core.lora.dora import base_weights_of

    targets = _linear_names(pair.diffusers)
    t = copy.deepcopy(pair.diffusers)
    cfg = lora_config(LoraSpec(lora_rank=RANK, lora_alpha=ALPHA), targets, init_weights=False)
    cfg.use_dora = True
    torch.manual_seed(1)
    add_lora(t, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "lora_B" in name:
                p.normal_(0.0, 0.05, generator=g)
    meta = lora_metadata(family=pair.family, flavour="tiny", rank=RANK, alpha=ALPHA, steps=1, target_modules=targets)
    files = save_lora(
        out_dir, "tiny", pair.family, adapter_state_dict(t), cfg, dict(t.config), meta,
        base_weights=base_weights_of(t, targets),
    )  # fmt: skip
    t.fuse_lora()
    t.unload_lora()
    return files.comfyui, targets, t.state_dict()


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ADAPTERS], ids=lambda p: f"{p[0]}-{p[1]}")
def adapted(request, comfy, tiny_lumina2, tmp_path_factory) -> Applied:
    family, adapter = request.param
    pair = _pair_for(comfy, family, tiny_lumina2)
    out_dir = tmp_path_factory.mktemp(f"{adapter}-{family}")
    if adapter == "peft-dora":
        path, targets, expected = _peft_dora_file(pair, out_dir)
    else:
        path, targets, expected = _lycoris_file(pair, LYCORIS[adapter], out_dir)
    return _apply_file(comfy, pair, path, targets, expected)


def test_comfyui_loads_every_key_of_our_lycoris_and_dora_files(adapted: Applied):
    """Every module is one ComfyUI's key map knows; lokr/hada/lora/diff/dora_scale keys are all consumed."""
    unknown = [m for m in adapted.file_modules if m not in adapted.key_map]
    assert not unknown, f"{adapted.pair.family}: ComfyUI has no module for {unknown}"
    not_loaded = [w for w in adapted.warnings if "not loaded" in w.lower() or "error" in w.lower()]
    assert not not_loaded, not_loaded
    weights = {_weight_key(adapted.key_map[m]) for m in adapted.file_modules}
    biases = {_weight_key(adapted.key_map[m])[: -len(".weight")] + ".bias" for m in adapted.bias_modules}
    assert adapted.patched_keys == weights | biases, sorted(adapted.patched_keys ^ (weights | biases))


def test_comfyui_patched_weights_equal_the_trained_lycoris_and_dora_weights(adapted: Applied):
    base, got, want = adapted.comfy_base, adapted.comfy_patched, adapted.expected_patched
    should_change = {k for k in want if not torch.equal(want[k], base[k])}
    did_change = {k for k in got if not torch.equal(got[k], base[k])}
    assert did_change == should_change == adapted.patched_keys, sorted(did_change ^ should_change)
    wrong = {k: (got[k] - want[k]).abs().max().item() for k in should_change}
    wrong = {k: e for k, e in wrong.items() if e > LYCORIS_TOL}
    assert not wrong, f"{adapted.pair.family}: ComfyUI's patched weights differ from the trained ones: {wrong}"


def test_comfyui_output_with_our_lycoris_and_dora_files_equals_the_trained_model(adapted: Applied):
    effect = _rel_err(adapted.out_expected, adapted.out_base)
    assert effect > 100 * OUTPUT_TOL, f"the adapter barely changes the output ({effect:.2e}); the test would be blind"
    err = _rel_err(adapted.out_comfy, adapted.out_expected)
    assert err < OUTPUT_TOL, f"{adapted.pair.family}: ComfyUI with our file differs from the trained model by {err:.2e}"
