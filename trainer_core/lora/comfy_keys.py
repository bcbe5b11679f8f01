"""LoRA key conversion between PEFT/diffusers module names and what ComfyUI reads.

ComfyUI has no diffusers -> native key map for Lumina 2 (its only Lumina map is Z-Image's, which
assumes n_kv_heads == n_heads), so a LoRA saved with diffusers names is silently ignored there
("lora key not loaded"). We therefore write native names ourselves: ``diffusion_model.<module>``
with ``.lora_A.weight`` / ``.lora_B.weight`` and a 0-dim ``.alpha`` (without ``.alpha`` ComfyUI
scales by 1.0 instead of alpha/rank).

Lumina 2's native attention has one fused ``attention.qkv`` Linear where diffusers has
``to_q``/``to_k``/``to_v``. The three LoRAs are fused exactly: A stacks the present projections'
A matrices, B is block-diagonal over the [q | k | v] row ranges (zero blocks for projections
that were not trained) and alpha is multiplied by the number of present projections, so that
ComfyUI's ``alpha / rank`` equals ``lora_alpha / r``. :func:`from_comfyui` undoes this exactly
for files written by :func:`to_comfyui`, and also reads the "shared A" layout other tools write.

DoRA (PEFT ``use_dora``): each module's ``lora_magnitude_vector`` is written as ComfyUI's
``.dora_scale``, baked against the base weight because ComfyUI normalises by the norm of the
original weight (see :mod:`trainer_core.lora.dora`); for the fused qkv the three projections'
scales are stacked over the same [q | k | v] rows, and rows of projections that were not trained
get ``||W_row|| + eps`` so that ComfyUI leaves them unchanged.

A LyCORIS adapter trained on the fused Lumina 2 projection (``attn.to_qkv``, rows [q | k | v])
maps to ``attention.qkv`` one to one: its delta is the fused weight's delta, no offsets needed.

Kandinsky 5 uses the same module names in diffusers and ComfyUI, so only the prefix changes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError
from .dora import EPS, bake_output_axis, require_base, row_norm, unbake_output_axis

log = logging.getLogger(__name__)

PREFIX = "diffusion_model."
_A = ".lora_A.weight"
_B = ".lora_B.weight"
_ALPHA = ".alpha"
_MAG = ".lora_magnitude_vector"  # PEFT's DoRA magnitude in get_peft_model_state_dict (shape (out,))
_DORA = ".dora_scale"

LUMINA2 = "lumina2"
IDENTITY_FAMILIES = ("kandinsky5-image", "kandinsky5-video")
FAMILIES = (LUMINA2, *IDENTITY_FAMILIES)

_QKV = ("q", "k", "v")
_BLOCK = r"(?P<blk>(?:layers|noise_refiner|context_refiner)\.\d+)"
_MOD_BLOCK = r"(?P<blk>(?:layers|noise_refiner)\.\d+)"  # blocks with adaLN modulation

# (diffusers regex, ComfyUI template, ComfyUI regex, diffusers template). q/k/v are handled apart.
_LUMINA2_RULES: list[tuple[str, str, str, str]] = [
    # the fused projection a LyCORIS adapter trains on (trainer_core.families.lumina2_qkv)
    (rf"{_BLOCK}\.attn\.to_qkv", r"\g<blk>.attention.qkv", rf"{_BLOCK}\.attention\.qkv", r"\g<blk>.attn.to_qkv"),
    (rf"{_BLOCK}\.attn\.to_out\.0", r"\g<blk>.attention.out", rf"{_BLOCK}\.attention\.out", r"\g<blk>.attn.to_out.0"),
    (rf"{_BLOCK}\.attn\.norm_q", r"\g<blk>.attention.q_norm", rf"{_BLOCK}\.attention\.q_norm", r"\g<blk>.attn.norm_q"),
    (rf"{_BLOCK}\.attn\.norm_k", r"\g<blk>.attention.k_norm", rf"{_BLOCK}\.attention\.k_norm", r"\g<blk>.attn.norm_k"),
    (
        rf"{_BLOCK}\.feed_forward\.linear_(?P<i>[123])",
        r"\g<blk>.feed_forward.w\g<i>",
        rf"{_BLOCK}\.feed_forward\.w(?P<i>[123])",
        r"\g<blk>.feed_forward.linear_\g<i>",
    ),
    (
        rf"{_MOD_BLOCK}\.norm1\.linear",
        r"\g<blk>.adaLN_modulation.1",
        rf"{_MOD_BLOCK}\.adaLN_modulation\.1",
        r"\g<blk>.norm1.linear",
    ),
    (
        rf"{_MOD_BLOCK}\.norm1\.norm",
        r"\g<blk>.attention_norm1",
        rf"{_MOD_BLOCK}\.attention_norm1",
        r"\g<blk>.norm1.norm",
    ),
    (
        r"(?P<blk>context_refiner\.\d+)\.norm1",
        r"\g<blk>.attention_norm1",
        r"(?P<blk>context_refiner\.\d+)\.attention_norm1",
        r"\g<blk>.norm1",
    ),
    (rf"{_BLOCK}\.norm2", r"\g<blk>.attention_norm2", rf"{_BLOCK}\.attention_norm2", r"\g<blk>.norm2"),
    (rf"{_BLOCK}\.(?P<n>ffn_norm[12])", r"\g<blk>.\g<n>", rf"{_BLOCK}\.(?P<n>ffn_norm[12])", r"\g<blk>.\g<n>"),
    (r"x_embedder", "x_embedder", r"x_embedder", "x_embedder"),
    (
        r"time_caption_embed\.caption_embedder\.(?P<i>[01])",
        r"cap_embedder.\g<i>",
        r"cap_embedder\.(?P<i>[01])",
        r"time_caption_embed.caption_embedder.\g<i>",
    ),
    (
        r"time_caption_embed\.timestep_embedder\.linear_1",
        "t_embedder.mlp.0",
        r"t_embedder\.mlp\.0",
        "time_caption_embed.timestep_embedder.linear_1",
    ),
    (
        r"time_caption_embed\.timestep_embedder\.linear_2",
        "t_embedder.mlp.2",
        r"t_embedder\.mlp\.2",
        "time_caption_embed.timestep_embedder.linear_2",
    ),
    (r"norm_out\.linear_1", "final_layer.adaLN_modulation.1", r"final_layer\.adaLN_modulation\.1", "norm_out.linear_1"),
    (r"norm_out\.linear_2", "final_layer.linear", r"final_layer\.linear", "norm_out.linear_2"),
]
_QKV_DIFFUSERS = re.compile(rf"{_BLOCK}\.attn\.to_(?P<p>[qkv])")
_QKV_COMFY = re.compile(rf"{_BLOCK}\.attention\.qkv")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"no LoRA key conversion for model family {family!r}", f"use one of: {', '.join(FAMILIES)}")


def _unknown_module(name: str) -> ConfigError:
    return ConfigError(
        f"Lumina 2 module {name!r} has no ComfyUI name, so ComfyUI would ignore its LoRA",
        "target only attention (to_q/to_k/to_v/to_out.0), feed_forward.linear_1/2/3, norm1.linear, x_embedder, "
        "time_caption_embed.caption_embedder.1, time_caption_embed.timestep_embedder.linear_1/2 or norm_out.linear_1/2",
    )


def diffusers_to_comfyui_module(family: str, name: str) -> str:
    """ComfyUI module name (without ``diffusion_model.``) of a diffusers module.

    For Lumina 2 ``attn.to_q``/``to_k``/``to_v`` all map to the fused ``attention.qkv`` (they are
    row slices of it: see :func:`lumina2_qkv_rows`). Raises for modules ComfyUI does not have.
    """
    _check_family(family)
    if family != LUMINA2:
        return name
    m = _QKV_DIFFUSERS.fullmatch(name)
    if m:
        return f"{m['blk']}.attention.qkv"
    for d_pat, c_tpl, _, _ in _LUMINA2_RULES:
        m = re.fullmatch(d_pat, name)
        if m:
            return m.expand(c_tpl)
    raise _unknown_module(name)


def comfyui_to_diffusers_module(family: str, name: str) -> str:
    """Inverse of :func:`diffusers_to_comfyui_module`; ``attention.qkv`` gives the fused ``attn.to_qkv``.

    (A PEFT LoRA on the unfused to_q/to_k/to_v is split back by :func:`from_comfyui` itself.)
    """
    _check_family(family)
    if family != LUMINA2:
        return name
    for _, _, c_pat, d_tpl in _LUMINA2_RULES:
        m = re.fullmatch(c_pat, name)
        if m:
            return m.expand(d_tpl)
    raise ConfigError(f"ComfyUI Lumina 2 module {name!r} is not one this trainer can map back to diffusers")


def lumina2_qkv_rows(transformer_config: Mapping[str, Any]) -> dict[str, int]:
    """Rows of q, k and v inside the fused qkv weight: [n_heads·hd | n_kv·hd | n_kv·hd]."""
    hidden = int(transformer_config["hidden_size"])
    heads = int(transformer_config["num_attention_heads"])
    kv_heads = int(transformer_config.get("num_kv_heads") or heads)
    head_dim = hidden // heads
    return {"q": hidden, "k": kv_heads * head_dim, "v": kv_heads * head_dim}


def _split_peft_keys(
    peft_sd: Mapping[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """'<module>.lora_A.weight' / '.lora_B.weight' (/ '.lora_magnitude_vector') -> {module: (A, B, m)}.

    Anything else is an error: a tensor ComfyUI would not read must not be dropped silently.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_sd.items():
        for suffix, slot in ((_A, "A"), (_B, "B"), (_MAG, "M")):
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[slot] = value
                break
        else:
            raise ConfigError(
                f"LoRA tensor {key!r} is not a lora_A/lora_B weight or a DoRA lora_magnitude_vector; "
                "ComfyUI export supports LoRA and DoRA (LyCORIS adapters go through comfy_lycoris)"
            )
    for module, parts in out.items():
        if not {"A", "B"} <= set(parts):
            raise ConfigError(f"LoRA module {module!r} has only {', '.join(parts)}; both lora_A and lora_B are needed")
    return {m: (p["A"], p["B"], p.get("M")) for m, p in out.items()}


def _peft_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The LoRA's weight delta as ComfyUI computes it: float32 ``scale * B @ A``."""
    return (b.float() @ a.float()) * scale


def _check_base(module: str, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if tuple(base.shape) != (b.shape[0], a.shape[1]):
        raise ConfigError(
            f"{module}: base weight {tuple(base.shape)} does not fit the LoRA ({b.shape[0]}x{a.shape[1]})",
            "pass the base weights of the transformer the LoRA was trained on",
        )


def _alpha_tensor(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def to_comfyui(
    family: str,
    peft_sd: Mapping[str, torch.Tensor],
    alpha: float,
    transformer_config: Mapping[str, Any],
    base_weights: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT state dict (keys '<module>.lora_A.weight') -> ComfyUI LoRA state dict.

    Every module gets ``diffusion_model.<name>.lora_A.weight``, ``.lora_B.weight`` and a float32
    0-dim ``.alpha``; a DoRA module (``.lora_magnitude_vector``) also a float32 ``.dora_scale``
    of shape (out, 1), baked from ``base_weights`` (diffusers module name -> base weight; see
    :func:`trainer_core.lora.dora.base_weights_of`). A and B are cast to ``dtype`` when given
    (before the bake, so that it matches the tensors ComfyUI reads), else keep their dtype.
    """
    _check_family(family)
    mods = _split_peft_keys(peft_sd)
    if dtype is not None:
        mods = {k: (a.detach().to(dtype), b.detach().to(dtype), m) for k, (a, b, m) in mods.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
    for module, (a, b, mag) in mods.items():
        m = _QKV_DIFFUSERS.fullmatch(module) if family == LUMINA2 else None
        if m:
            qkv.setdefault(m["blk"], {})[m["p"]] = (a, b, mag)
            continue
        name = PREFIX + diffusers_to_comfyui_module(family, module)
        out[name + _A], out[name + _B], out[name + _ALPHA] = a, b, _alpha_tensor(alpha)
        if mag is not None:
            base = require_base(base_weights, module, "exporting a DoRA magnitude")
            _check_base(module, base, a, b)
            delta = _peft_delta(a, b, alpha / a.shape[0])
            out[name + _DORA] = bake_output_axis(mag, base, delta, trainer_eps=0.0)
    if qkv:
        rows = lumina2_qkv_rows(transformer_config)
        for blk, parts in qkv.items():
            name = f"{PREFIX}{blk}.attention.qkv"
            a, b, n = _fuse_qkv(blk, {p: (pa, pb) for p, (pa, pb, _) in parts.items()}, rows)
            out[name + _A], out[name + _B], out[name + _ALPHA] = a, b, _alpha_tensor(n * alpha)
            if any(mag is not None for _, _, mag in parts.values()):
                out[name + _DORA] = _fused_dora_scale(blk, parts, alpha, base_weights)
    return out


def _fused_dora_scale(
    blk: str,
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    alpha: float,
    base_weights: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """The qkv ``dora_scale``: each projection's baked rows; ``||W_row|| + eps`` (no change) for untrained ones."""
    scales = []
    for p in _QKV:
        module = f"{blk}.attn.to_{p}"
        base = require_base(base_weights, module, "exporting a DoRA on the fused qkv")
        if p not in parts:
            scales.append(row_norm(base) + EPS)
            continue
        a, b, mag = parts[p]
        if mag is None:
            raise ConfigError(f"{module} has no DoRA magnitude but its siblings do; the qkv cannot be fused")
        _check_base(module, base, a, b)
        scales.append(bake_output_axis(mag, base, _peft_delta(a, b, alpha / a.shape[0]), trainer_eps=0.0))
    return torch.cat(scales)


def _fuse_qkv(
    blk: str, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A = cat(A_p), B = block-diag over the [q | k | v] row ranges; returns (A, B, #present)."""
    present = [p for p in _QKV if p in parts]
    ranks = {parts[p][0].shape[0] for p in present}
    if len(ranks) != 1:
        raise ConfigError(f"{blk}: to_q/to_k/to_v have different LoRA ranks {sorted(ranks)}; they cannot be fused")
    r = ranks.pop()
    ref = parts[present[0]][1]
    b = torch.zeros(sum(rows.values()), r * len(present), dtype=ref.dtype, device=ref.device)
    row0 = 0
    col = 0
    for p in _QKV:
        if p in parts:
            bp = parts[p][1]
            if bp.shape[0] != rows[p]:
                raise ConfigError(
                    f"{blk}.attn.to_{p}: lora_B has {bp.shape[0]} rows but the transformer config says {rows[p]}",
                    "pass the config of the transformer the LoRA was trained on",
                )
            b[row0 : row0 + rows[p], col : col + r] = bp
            col += r
        row0 += rows[p]
    a = torch.cat([parts[p][0] for p in present], dim=0)
    return a, b, len(present)


def from_comfyui(
    family: str,
    comfy_sd: Mapping[str, torch.Tensor],
    transformer_config: Mapping[str, Any],
    expected_ranks: Mapping[str, int] | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """ComfyUI LoRA state dict -> (PEFT state dict, lora_alpha).

    Exact inverse of :func:`to_comfyui`. ``expected_ranks`` (diffusers module -> rank of the
    adapter being loaded into) settles which of q/k/v a fused qkv holds when that cannot be read
    from the tensors (an all-zero B). If modules carry different alpha/rank scales, B is rescaled
    so that one lora_alpha reproduces every module's effect. A ``.dora_scale`` becomes PEFT's
    ``lora_magnitude_vector`` (undoing the bake needs ``base_weights``, as for :func:`to_comfyui`).
    """
    _check_family(family)
    stripped: dict[str, torch.Tensor] = {}
    for key, value in comfy_sd.items():
        if not key.startswith(PREFIX):
            raise ConfigError(f"ComfyUI LoRA key {key!r} does not start with {PREFIX!r}")
        stripped[key[len(PREFIX) :]] = value
    alphas = {k[: -len(_ALPHA)]: float(v.item()) for k, v in stripped.items() if k.endswith(_ALPHA)}
    doras = {k[: -len(_DORA)]: v for k, v in stripped.items() if k.endswith(_DORA)}
    rest = {k: v for k, v in stripped.items() if not k.endswith((_ALPHA, _DORA, _MAG))}
    pairs = {m: (a, b) for m, (a, b, _) in _split_peft_keys(rest).items()}
    leftover = (set(alphas) | set(doras)) - set(pairs)
    if leftover:
        raise ConfigError(f"ComfyUI LoRA has .alpha/.dora_scale without weights for: {', '.join(sorted(leftover))}")

    # module -> (A, B, alpha in peft terms: the scale is alpha / A.shape[0])
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for cname, (a, b) in pairs.items():
        file_alpha = alphas.get(cname, float(a.shape[0]))  # no .alpha: ComfyUI scale 1.0
        m = _QKV_COMFY.fullmatch(cname) if family == LUMINA2 else None
        if m:
            rows = lumina2_qkv_rows(transformer_config)
            split = _split_qkv(m["blk"], a, b, file_alpha, rows, expected_ranks)
            modules.update(split)
            if cname in doras:
                magnitudes.update(_split_qkv_dora(m["blk"], doras[cname], split, rows, base_weights))
        else:
            module = comfyui_to_diffusers_module(family, cname)
            modules[module] = (a, b, file_alpha)
            if cname in doras:
                magnitudes[module] = _magnitude(module, doras[cname], a, b, file_alpha, base_weights)
    if not modules:
        raise ConfigError("the ComfyUI LoRA file holds no LoRA weights")

    values = [al for _, _, al in modules.values()]
    alpha = max(set(values), key=values.count)
    peft_sd: dict[str, torch.Tensor] = {}
    rescaled = 0
    for name, (a, b, al) in modules.items():
        if abs(al - alpha) > 1e-6 * alpha:  # float32 storage of n*alpha must not trigger a rescale
            b = b * (al / alpha)
            rescaled += 1
        peft_sd[name + _A], peft_sd[name + _B] = a, b
        if name in magnitudes:
            peft_sd[name + _MAG] = magnitudes[name]
    if rescaled:
        log.info("rescaled lora_B of %d module(s) to a common lora_alpha of %g", rescaled, alpha)
    return peft_sd, alpha


def _magnitude(
    module: str,
    dora_scale: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    file_alpha: float,
    base_weights: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """PEFT's lora_magnitude_vector (shape (out,)) from a ComfyUI output-axis ``dora_scale``."""
    if dora_scale.shape[0] != b.shape[0] or dora_scale.numel() != b.shape[0]:
        raise ConfigError(
            f"{module}: dora_scale of shape {tuple(dora_scale.shape)} is not per output row; "
            "PEFT's DoRA has one magnitude per output row",
            "load an input-axis DoRA as a LyCORIS adapter (dora_wd with wd_on_output false)",
        )
    base = require_base(base_weights, module, "reading a DoRA dora_scale")
    _check_base(module, base, a, b)
    delta = _peft_delta(a, b, file_alpha / a.shape[0])
    return unbake_output_axis(dora_scale, base, delta, trainer_eps=0.0).reshape(-1)


def _split_qkv_dora(
    blk: str,
    dora_scale: torch.Tensor,
    split: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    rows: dict[str, int],
    base_weights: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Per-projection magnitudes from the fused qkv ``dora_scale`` rows."""
    if dora_scale.shape[0] != sum(rows.values()):
        raise ConfigError(f"{blk}.attention.qkv: dora_scale {tuple(dora_scale.shape)} does not fit the qkv rows")
    out, start = {}, 0
    for p in _QKV:
        module = f"{blk}.attn.to_{p}"
        chunk = dora_scale[start : start + rows[p]]
        start += rows[p]
        if module in split:
            a, b, al = split[module]
            out[module] = _magnitude(module, chunk, a, b, al, base_weights)
    return out


def _split_qkv(
    blk: str,
    a: torch.Tensor,
    b: torch.Tensor,
    file_alpha: float,
    rows: dict[str, int],
    expected_ranks: Mapping[str, int] | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Undo the qkv fusion: block-diagonal B (ours) or a dense B with one shared A (other tools)."""
    total_rank = a.shape[0]
    if b.shape != (sum(rows.values()), total_rank):
        raise ConfigError(
            f"{blk}.attention.qkv: lora_B shape {tuple(b.shape)} does not fit a qkv of {sum(rows.values())} rows "
            f"and rank {total_rank}",
            "the LoRA was made for a different model size",
        )
    offsets, start = {}, 0
    for p in _QKV:
        offsets[p] = (start, start + rows[p])
        start += rows[p]
    row_block = {p: b[s:e] for p, (s, e) in offsets.items()}
    nonzero = [p for p in _QKV if torch.count_nonzero(row_block[p]) > 0]

    if expected_ranks is not None:
        present = [p for p in _QKV if f"{blk}.attn.to_{p}" in expected_ranks]
        extra = [p for p in nonzero if p not in present]
        if extra:
            raise ConfigError(
                f"{blk}.attention.qkv changes to_{'/to_'.join(extra)}, which the adapter does not target",
                "add those projections to the LoRA targets",
            )
    else:
        present = nonzero or list(_QKV)
        if not nonzero:
            log.warning("%s.attention.qkv has an all-zero lora_B; assuming it holds q, k and v", blk)
    if not present:
        raise ConfigError(f"{blk}.attention.qkv holds a LoRA but the adapter targets none of to_q/to_k/to_v")

    n = len(present)
    if total_rank % n == 0:
        r = total_rank // n
        cols = {p: (j * r, (j + 1) * r) for j, p in enumerate(present)}
        block_diag = all(
            torch.count_nonzero(row_block[p][:, :c0]) == 0 and torch.count_nonzero(row_block[p][:, c1:]) == 0
            for p, (c0, c1) in cols.items()
        )
        wanted = {expected_ranks[f"{blk}.attn.to_{p}"] for p in present} if expected_ranks is not None else {r}
        if block_diag and wanted == {r}:
            return {
                f"{blk}.attn.to_{p}": (a[c0:c1], row_block[p][:, c0:c1], file_alpha / n) for p, (c0, c1) in cols.items()
            }
    # shared A: every projection uses the whole A; scale alpha/total_rank is unchanged
    return {f"{blk}.attn.to_{p}": (a, row_block[p], file_alpha) for p in present}
