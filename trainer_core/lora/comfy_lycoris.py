"""LyCORIS state dicts <-> the keys stock ComfyUI's weight adapters read.

A LyCORIS network's ``state_dict()`` names each adapted module ``lycoris_<diffusers name with
'.' -> '_'>`` and holds its tensors under LyCORIS's own parameter names. ComfyUI reads the same
parameter names (``comfy/weight_adapter/{lora,lokr,loha}.py`` and ``comfy/lora.py``'s
``load_lora``, identical in 0.8.0 and 0.33.0), but under its own module names with the
``diffusion_model.`` prefix; its Lumina 2 key map knows no diffusers names at all. So the
conversion renames modules (``comfy_keys.diffusers_to_comfyui_module``) and keeps tensors, except
where ComfyUI's arithmetic differs from LyCORIS's:

* **scale.** ComfyUI multiplies LoCon by ``alpha / lora_down.shape[0]``, LoHa by
  ``alpha / hada_w1_b.shape[0]`` and LoKr by ``alpha / dim`` where ``dim`` is the rank of the
  factorised side (``lokr_w2_b.shape[0]``, else ``lokr_w1_b.shape[0]``), and by 1.0 when neither
  side is factorised. LyCORIS stores ``alpha * lora_dim / r_factor`` and scales by
  ``alpha / r_factor``, and forces scale 1 when both LoKr factors are full matrices, so the
  stored alpha gives ComfyUI exactly LyCORIS's forward. (``rs_lora`` with two full LoKr factors
  is the exception: LyCORIS then scales by sqrt(lora_dim), which no ComfyUI key can say; refused.)
  Note: LyCORIS 4.1.3's ``get_diff_weight``/``get_merged_weight`` of LoKr and LoHa apply the
  scale twice (``get_weight`` already includes it), so they disagree with the module's own
  forward whenever alpha != dim; our reference is the forward, i.e. what was trained.
* **DoRA.** An output-axis ``dora_scale`` is baked against the base weight (see
  :mod:`trainer_core.lora.dora`, LyCORIS adds float32 eps to its norm); an input-axis one
  (``wd_on_output`` false, shape (1, in)) is ComfyUI's rule already.
* **Lumina 2 attention.** ComfyUI has one fused ``attention.qkv``. LyCORIS adapters are trained
  on the fused ``attn.to_qkv`` (rows [q | k | v], as ComfyUI's), which maps one to one. On the
  unfused ``to_q``/``to_k``/``to_v`` only a plain LoCon can be written exactly (block-diagonal,
  as ``comfy_keys`` does for PEFT LoRA); anything else is refused, never written wrongly.

* **Tucker LoKr** (``lokr_t2``, only on convs with a kernel): ComfyUI rebuilds w2 with an einsum
  whose result ``torch.kron`` cannot view, logs ``ERROR`` and leaves the weight unpatched (0.8.0
  and 0.33.0 on torch 2.14). The file gets the rebuilt w2 as a plain ``lokr_w2`` instead (with the
  scale folded in when w1 is a full matrix, where ComfyUI then scales by 1).

``full`` writes ``diff``/``diff_b`` and the norm algorithm ``w_norm``/``b_norm``, which ComfyUI
adds to the weight/bias. Algorithms ComfyUI cannot read this way (GLoRA, OFT, BOFT, IA3, ...)
and any tensor ComfyUI would not consume are errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError
from .comfy_keys import (  # the qkv helpers are shared with the PEFT LoRA conversion
    _QKV_COMFY,
    _QKV_DIFFUSERS,
    LUMINA2,
    PREFIX,
    _check_family,
    _fuse_qkv,
    _split_qkv,
    comfyui_to_diffusers_module,
    diffusers_to_comfyui_module,
    lumina2_qkv_rows,
)
from .dora import EPS, bake_output_axis, require_base, unbake_output_axis

LYCORIS_PREFIX = "lycoris"

# ComfyUI's parameter names per adapter kind (what its loaders consume).
KIND_KEYS: dict[str, frozenset[str]] = {
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "locon": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
    "full": frozenset({"diff", "diff_b"}),
    "norm": frozenset({"w_norm", "b_norm"}),
}
SCALED = ("lokr", "loha", "locon")  # kinds that carry alpha and may carry dora_scale
_EXTRA = frozenset({"alpha", "dora_scale"})
_ALL_PARAMS = sorted(set().union(*KIND_KEYS.values()) | _EXTRA, key=len, reverse=True)


def lycoris_name(diffusers_name: str, prefix: str = LYCORIS_PREFIX) -> str:
    """LyCORIS's name for a module: ``<prefix>_<name with '.' -> '_'>``."""
    return f"{prefix}_{diffusers_name}".replace(".", "_")


def lycoris_module_names(transformer: torch.nn.Module, prefix: str = LYCORIS_PREFIX) -> dict[str, str]:
    """LyCORIS module name -> diffusers module name, for every module of ``transformer``.

    Two diffusers names that give the same LyCORIS name (``a_b.c`` / ``a.b_c``) cannot be told
    apart; such a name is left out, so a state dict using it fails as unmappable.
    """
    out: dict[str, str] = {}
    clashes: set[str] = set()
    for name, _ in transformer.named_modules():
        if not name:
            continue
        key = lycoris_name(name, prefix)
        if key in out and out[key] != name:
            clashes.add(key)
        out[key] = name
    for key in clashes:
        del out[key]
    return out


def group_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {param: tensor}}`` from keys ``<module>.<param>`` (params may hold a dot: lora_up.weight)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for param in _ALL_PARAMS:
            if key.endswith("." + param):
                out.setdefault(key[: -len(param) - 1], {})[param] = value
                break
        else:
            raise ConfigError(
                f"LyCORIS tensor {key!r} is not one ComfyUI reads (lokr_*, hada_*, lora_up/down/mid, diff, "
                "w_norm/b_norm, alpha, dora_scale)",
                "only the LoKr, LoHa, LoCon/LoRA, full and norm algorithms can be exported to ComfyUI",
            )
    return out


def adapter_kind(module: str, params: Mapping[str, torch.Tensor]) -> str:
    """Which ComfyUI adapter reads ``params``: lokr, loha, locon, full or norm; anything else is an error."""
    names = set(params)
    for kind, keys in KIND_KEYS.items():
        if names & keys:
            allowed = keys | (_EXTRA if kind in SCALED else frozenset())
            extra = names - allowed
            if extra:
                raise ConfigError(f"{module}: {kind} tensors mixed with {sorted(extra)}, which ComfyUI would not load")
            _check_complete(module, kind, names)
            return kind
    raise ConfigError(f"{module} holds only {sorted(names)}: no adapter weights")


def _check_complete(module: str, kind: str, names: set[str]) -> None:
    need: list[set[str]] = []
    if kind == "lokr":
        if "lokr_t1" in names:
            raise ConfigError(f"{module}: lokr_t1 is not read by ComfyUI")
        need = [{"lokr_w1"} if "lokr_w1" in names else {"lokr_w1_a", "lokr_w1_b"}]
        need.append({"lokr_w2"} if "lokr_w2" in names else {"lokr_w2_a", "lokr_w2_b"})
    elif kind == "loha":
        need = [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}]
        if names & {"hada_t1", "hada_t2"}:
            need.append({"hada_t1", "hada_t2"})
    elif kind == "locon":
        need = [{"lora_up.weight", "lora_down.weight"}]
    elif kind == "full":
        need = [{"diff"}]
    elif kind == "norm":
        need = [{"w_norm"}]
    missing = sorted(set().union(*need) - names)
    if missing:
        raise ConfigError(f"{module}: {kind} adapter lacks {missing}; the file would be applied wrongly")


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def comfyui_delta(kind: str, params: Mapping[str, torch.Tensor], shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The weight delta ComfyUI computes from ``params`` at strength 1 (before any dora_scale), float32.

    Written from ComfyUI's rules (see the module docstring); shared by the DoRA bake and its inverse.
    """
    alpha = params.get("alpha")
    if kind == "locon":
        up, down = _f(params["lora_up.weight"]), _f(params["lora_down.weight"])
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        if "lora_mid.weight" in params:
            mid = _f(params["lora_mid.weight"])
            down = (
                (down.transpose(0, 1).flatten(start_dim=1) @ mid.transpose(0, 1).flatten(start_dim=1))
                .reshape(down.shape[1], down.shape[0], mid.shape[2], mid.shape[3])
                .transpose(0, 1)
            )
        return (up.flatten(start_dim=1) @ down.flatten(start_dim=1)).reshape(shape) * scale
    if kind == "loha":
        w1b = _f(params["hada_w1_b"])
        scale = float(alpha) / w1b.shape[0] if alpha is not None else 1.0
        if "hada_t1" in params:
            cp = "i j k l, j r, i p -> p r k l"
            m1 = torch.einsum(cp, _f(params["hada_t1"]), w1b, _f(params["hada_w1_a"]))
            m2 = torch.einsum(cp, _f(params["hada_t2"]), _f(params["hada_w2_b"]), _f(params["hada_w2_a"]))
        else:
            m1 = _f(params["hada_w1_a"]) @ w1b
            m2 = _f(params["hada_w2_a"]) @ _f(params["hada_w2_b"])
        return (m1 * m2).reshape(shape) * scale
    if kind == "lokr":
        dim = None
        if "lokr_w1" in params:
            w1 = _f(params["lokr_w1"])
        else:
            dim = params["lokr_w1_b"].shape[0]
            w1 = _f(params["lokr_w1_a"]) @ _f(params["lokr_w1_b"])
        if "lokr_w2" in params:
            w2 = _f(params["lokr_w2"])
        else:
            dim = params["lokr_w2_b"].shape[0]
            if "lokr_t2" in params:
                w2 = torch.einsum(
                    "i j k l, j r, i p -> p r k l",
                    _f(params["lokr_t2"]),
                    _f(params["lokr_w2_b"]),
                    _f(params["lokr_w2_a"]),
                )
            else:
                w2 = _f(params["lokr_w2_a"]) @ _f(params["lokr_w2_b"])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        return torch.kron(w1, w2).reshape(shape) * scale
    if kind == "full":
        return _f(params["diff"]).reshape(shape)
    if kind == "norm":
        return _f(params["w_norm"]).reshape(shape)
    raise ConfigError(f"no ComfyUI rule for adapter kind {kind!r}")


def _delta_numel(kind: str, params: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(rows, elements) of the delta, read from the factor shapes (no base weight needed)."""
    if kind == "locon":
        up, down = params["lora_up.weight"], params["lora_down.weight"]
        rows = up.shape[0]
        mid = params.get("lora_mid.weight")
        inner = down[0].numel() if mid is None else down.shape[1] * mid[0, 0].numel()
        return rows, rows * inner
    if kind == "loha":
        a, b = params["hada_w1_a"], params["hada_w1_b"]
        if "hada_t1" in params:
            t = params["hada_t1"]
            return a.shape[1], a.shape[1] * b.shape[1] * t[0, 0].numel()
        return a.shape[0], a.shape[0] * b.shape[1]
    if kind == "lokr":
        if "lokr_w1" in params:
            w1 = tuple(params["lokr_w1"].shape)
        else:
            w1 = (params["lokr_w1_a"].shape[0], params["lokr_w1_b"].shape[1])
        if "lokr_w2" in params:
            w2 = tuple(params["lokr_w2"].shape)
        elif "lokr_t2" in params:
            t = params["lokr_t2"]
            w2 = (params["lokr_w2_a"].shape[1], params["lokr_w2_b"].shape[1], *t.shape[2:])
        else:
            w2 = (params["lokr_w2_a"].shape[0], params["lokr_w2_b"].shape[1])
        rows = w1[0] * w2[0]
        n = rows * w1[1]
        for d in w2[1:]:
            n *= d
        return rows, n
    key = "diff" if kind == "full" else "w_norm"
    return params[key].shape[0], params[key].numel()


def _scalar(value: torch.Tensor | float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def lycoris_to_comfyui(
    family: str,
    lycoris_sd: Mapping[str, torch.Tensor],
    module_names: Mapping[str, str],
    transformer_config: Mapping[str, Any],
    base_weights: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    rs_lora: bool = False,
) -> dict[str, torch.Tensor]:
    """A LyCORIS ``network.state_dict()`` -> the ComfyUI file's tensors (``diffusion_model.<module>.<param>``).

    ``module_names`` maps LyCORIS module names to diffusers ones (:func:`lycoris_module_names`).
    ``base_weights`` (diffusers name -> base weight, :func:`trainer_core.lora.dora.base_weights_of`)
    are needed for output-axis DoRA modules, and check every module's delta shape where given.
    Factor tensors are cast to ``dtype``; ``alpha`` and ``dora_scale`` stay float32 (a bf16
    dora_scale would rescale untouched rows by up to 0.4%). ``rs_lora``: the network's setting.
    """
    _check_family(family)
    groups = group_state_dict(lycoris_sd)
    out: dict[str, torch.Tensor] = {}
    unfused_qkv: dict[str, dict[str, tuple[str, dict[str, torch.Tensor]]]] = {}
    written: dict[str, str] = {}  # ComfyUI module -> lycoris module
    for lyco, params in groups.items():
        kind = adapter_kind(lyco, params)
        if lyco not in module_names:
            raise ConfigError(
                f"LyCORIS module {lyco!r} matches no module of the transformer, so ComfyUI could not apply it",
                "export with the transformer the adapter was trained on (lycoris_module_names(transformer))",
            )
        module = module_names[lyco]
        params = {k: v if k in _EXTRA else v.detach().to(dtype) for k, v in params.items()}
        if kind == "lokr" and rs_lora and "lokr_w1" in params and "lokr_w2" in params:
            raise ConfigError(
                f"{module}: a LoKr with two full factors and rs_lora scales by sqrt(linear_dim), which a ComfyUI "
                "file cannot express",
                "turn rs_lora off, or use a linear_dim small enough that lokr_w2 is factorised",
            )
        if kind == "lokr" and "lokr_t2" in params:
            params = _materialise_tucker_w2(params)
        m = _QKV_DIFFUSERS.fullmatch(module) if family == LUMINA2 else None
        if m:
            unfused_qkv.setdefault(m["blk"], {})[m["p"]] = (lyco, params)
            continue
        cname = diffusers_to_comfyui_module(family, module)
        _claim(written, cname, lyco)
        out.update(_module_tensors(cname, module, kind, params, base_weights))
    for blk, parts in unfused_qkv.items():
        cname = f"{blk}.attention.qkv"
        _claim(written, cname, ",".join(lyco for lyco, _ in parts.values()))
        out.update(_fuse_locon_qkv(blk, parts, transformer_config))
    return out


def _materialise_tucker_w2(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Tucker LoKr's w2 as one plain (contiguous) ``lokr_w2``, with the same ComfyUI result."""
    t2, w2a, w2b = params["lokr_t2"], params["lokr_w2_a"], params["lokr_w2_b"]
    w2 = torch.einsum("i j k l, j r, i p -> p r k l", _f(t2), _f(w2b), _f(w2a)).contiguous()
    out = {k: v for k, v in params.items() if k not in ("lokr_t2", "lokr_w2_a", "lokr_w2_b")}
    alpha = params.get("alpha")
    if "lokr_w1" in params and alpha is not None:  # no factorised side left: ComfyUI would scale by 1
        w2 = w2 * (float(alpha) / w2b.shape[0])
    out["lokr_w2"] = w2.to(t2.dtype)
    return out


def _claim(written: dict[str, str], cname: str, lyco: str) -> None:
    if cname in written:
        raise ConfigError(
            f"LyCORIS modules {written[cname]} and {lyco} both map to ComfyUI's {cname}; ComfyUI would apply only one",
            "adapt either the fused to_qkv or the separate projections, not both",
        )
    written[cname] = lyco


def _module_tensors(
    cname: str,
    module: str,
    kind: str,
    params: dict[str, torch.Tensor],
    base_weights: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    rows, numel = _delta_numel(kind, params)
    base = base_weights.get(module) if base_weights is not None else None
    if base is not None and (base.shape[0] != rows or base.numel() != numel):
        raise ConfigError(
            f"{module}: the {kind} adapter's delta has {rows} rows / {numel} elements but the weight is "
            f"{tuple(base.shape)}; ComfyUI would fail to reshape it and skip the module",
            "export with the transformer the adapter was trained on",
        )
    key = f"{PREFIX}{cname}."
    out: dict[str, torch.Tensor] = {}
    for param, value in params.items():
        if param == "alpha":
            out[key + param] = _scalar(value)
        elif param == "dora_scale":
            out[key + param] = _dora_to_comfyui(module, kind, params, rows, base_weights)
        else:
            out[key + param] = value
    return out


def _dora_axis(module: str, dora_scale: torch.Tensor, rows: int) -> str:
    if dora_scale.shape[0] == rows and dora_scale.numel() == rows and rows != 1:
        return "output"
    if dora_scale.shape[0] == 1 and rows != 1:
        return "input"
    raise ConfigError(
        f"{module}: dora_scale of shape {tuple(dora_scale.shape)} for a weight of {rows} rows is ambiguous in ComfyUI, "
        "which picks the axis by comparing its first dimension with the weight's"
    )


def _dora_to_comfyui(
    module: str,
    kind: str,
    params: Mapping[str, torch.Tensor],
    rows: int,
    base_weights: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    scale = params["dora_scale"]
    if _dora_axis(module, scale, rows) == "input":
        return scale.detach().float().clone()
    base = require_base(base_weights, module, "exporting an output-axis DoRA (dora_wd, wd_on_output)")
    delta = comfyui_delta(kind, params, base.shape)
    return bake_output_axis(scale, base, delta, trainer_eps=EPS).reshape(scale.shape)


def _fuse_locon_qkv(
    blk: str, parts: dict[str, tuple[str, dict[str, torch.Tensor]]], transformer_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Unfused Lumina 2 to_q/to_k/to_v: a plain LoCon fuses exactly (block-diagonal up); anything else is refused."""
    for p, (lyco, params) in parts.items():
        kind = adapter_kind(lyco, params)
        if kind != "locon" or "dora_scale" in params or "lora_mid.weight" in params:
            what = kind + (" with DoRA (dora_wd)" if "dora_scale" in params else "")
            raise ConfigError(
                f"{blk}.attn.to_{p}: a LyCORIS {what} on Lumina 2's separate q/k/v projections cannot be written "
                "into ComfyUI's fused attention.qkv exactly (k and v are narrower than q, and a Kronecker or "
                "Hadamard product is not block-diagonal)",
                "train LyCORIS on the fused qkv projection (attn.to_qkv), as the trainer does for Lumina 2, "
                "or leave to_q/to_k/to_v out of the LyCORIS targets",
            )
    scales = {}
    lora_parts = {}
    for p, (_, params) in parts.items():
        down, up = params["lora_down.weight"], params["lora_up.weight"]
        alpha = params.get("alpha")
        scales[p] = float(alpha) / down.shape[0] if alpha is not None else 1.0
        lora_parts[p] = (down, up)
    rows = lumina2_qkv_rows(transformer_config)
    down, up, n = _fuse_qkv(blk, lora_parts, rows)
    if len(set(scales.values())) == 1:
        alpha = next(iter(scales.values())) * down.shape[0]  # ComfyUI: alpha / (n * r) == each module's scale
    else:  # different scales: fold each into its block of up, ComfyUI scale 1
        up = up.clone()
        col = 0
        r = down.shape[0] // n
        for p in ("q", "k", "v"):
            if p in scales:
                up[:, col : col + r] *= scales[p]
                col += r
        alpha = float(down.shape[0])
    key = f"{PREFIX}{blk}.attention.qkv."
    return {key + "lora_down.weight": down, key + "lora_up.weight": up, key + "alpha": _scalar(alpha)}


# ---------------------------------------------------------------------- ComfyUI -> LyCORIS
def _group_comfy(comfy_sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    stripped = {}
    for key, value in comfy_sd.items():
        if not key.startswith(PREFIX):
            raise ConfigError(f"ComfyUI LyCORIS key {key!r} does not start with {PREFIX!r}")
        stripped[key[len(PREFIX) :]] = value
    return group_state_dict(stripped)


def comfyui_to_lycoris(
    family: str,
    comfy_sd: Mapping[str, torch.Tensor],
    module_names: Mapping[str, str],
    transformer_config: Mapping[str, Any],
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A ComfyUI LyCORIS file (as :func:`lycoris_to_comfyui` writes it) -> a LyCORIS state dict.

    ``module_names`` are the LyCORIS names of the network being loaded into (lycoris name ->
    diffusers name); ComfyUI's Lumina 2 ``attention.qkv`` goes to its ``attn.to_qkv`` when the
    network has one, else (a LoCon only) is split back into ``to_q``/``to_k``/``to_v``.
    Output-axis ``dora_scale`` is un-baked, which needs ``base_weights`` as for the export.
    """
    _check_family(family)
    by_diffusers = {d: lyco for lyco, d in module_names.items()}
    out: dict[str, torch.Tensor] = {}
    for cname, params in _group_comfy(comfy_sd).items():
        kind = adapter_kind(cname, params)
        qkv = _QKV_COMFY.fullmatch(cname) if family == LUMINA2 else None
        if qkv and f"{qkv['blk']}.attn.to_qkv" not in by_diffusers:
            out.update(_split_locon_qkv(qkv["blk"], kind, params, by_diffusers, transformer_config))
            continue
        module = comfyui_to_diffusers_module(family, cname)
        if module not in by_diffusers:
            raise ConfigError(
                f"ComfyUI module {cname} ({module}) is not adapted by the LyCORIS network being loaded into",
                "build the network with the same targets (preset) as the file was trained with",
            )
        lyco = by_diffusers[module]
        for param, value in params.items():
            if param == "dora_scale":
                value = _dora_from_comfyui(module, kind, params, base_weights)
            out[f"{lyco}.{param}"] = value
    return out


def _dora_from_comfyui(
    module: str, kind: str, params: Mapping[str, torch.Tensor], base_weights: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    scale = params["dora_scale"]
    rows, _ = _delta_numel(kind, params)
    if _dora_axis(module, scale, rows) == "input":
        return scale.detach().float().clone()
    base = require_base(base_weights, module, "reading an output-axis DoRA dora_scale")
    delta = comfyui_delta(kind, params, base.shape)
    return unbake_output_axis(scale, base, delta, trainer_eps=EPS).reshape(scale.shape)


def _split_locon_qkv(
    blk: str,
    kind: str,
    params: Mapping[str, torch.Tensor],
    by_diffusers: Mapping[str, str],
    transformer_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    targets = {p: by_diffusers.get(f"{blk}.attn.to_{p}") for p in "qkv"}
    if kind != "locon" or "dora_scale" in params or "lora_mid.weight" in params or not any(targets.values()):
        raise ConfigError(
            f"ComfyUI {blk}.attention.qkv holds a {kind} that the network being loaded into cannot take: it adapts "
            "neither the fused attn.to_qkv nor (for a plain LoCon) the separate to_q/to_k/to_v",
            "train LyCORIS on Lumina 2's fused qkv projection",
        )
    alpha = params.get("alpha")
    down, up = params["lora_down.weight"], params["lora_up.weight"]
    file_alpha = float(alpha) if alpha is not None else float(down.shape[0])
    expected = None  # ranks are read from the block-diagonal layout
    split = _split_qkv(blk, down, up, file_alpha, lumina2_qkv_rows(transformer_config), expected)
    out: dict[str, torch.Tensor] = {}
    for module, (a, b, al) in split.items():
        lyco = by_diffusers.get(module)
        if lyco is None:
            if torch.count_nonzero(b):
                raise ConfigError(f"{blk}.attention.qkv changes {module}, which the network does not adapt")
            continue
        out[f"{lyco}.lora_down.weight"], out[f"{lyco}.lora_up.weight"], out[f"{lyco}.alpha"] = a, b, _scalar(al)
    return out
