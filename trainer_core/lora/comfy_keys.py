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

Kandinsky 5 uses the same module names in diffusers and ComfyUI, so only the prefix changes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "diffusion_model."
_A = ".lora_A.weight"
_B = ".lora_B.weight"
_ALPHA = ".alpha"

LUMINA2 = "lumina2"
IDENTITY_FAMILIES = ("kandinsky5-image", "kandinsky5-video")
FAMILIES = (LUMINA2, *IDENTITY_FAMILIES)

_QKV = ("q", "k", "v")
_BLOCK = r"(?P<blk>(?:layers|noise_refiner|context_refiner)\.\d+)"
_MOD_BLOCK = r"(?P<blk>(?:layers|noise_refiner)\.\d+)"  # blocks with adaLN modulation

# (diffusers regex, ComfyUI template, ComfyUI regex, diffusers template). q/k/v are handled apart.
_LUMINA2_RULES: list[tuple[str, str, str, str]] = [
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
    """Inverse of :func:`diffusers_to_comfyui_module` for every module except the fused qkv."""
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


def _split_peft_keys(peft_sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """'<module>.lora_A.weight' / '.lora_B.weight' pairs -> {module: (A, B)}; anything else is an error."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_sd.items():
        if key.endswith(_A):
            out.setdefault(key[: -len(_A)], {})["A"] = value
        elif key.endswith(_B):
            out.setdefault(key[: -len(_B)], {})["B"] = value
        else:
            raise ConfigError(
                f"LoRA tensor {key!r} is not a plain lora_A/lora_B weight; ComfyUI export supports standard LoRA only"
            )
    for module, pair in out.items():
        if set(pair) != {"A", "B"}:
            raise ConfigError(f"LoRA module {module!r} has only {', '.join(pair)}; both lora_A and lora_B are needed")
    return {m: (p["A"], p["B"]) for m, p in out.items()}


def _alpha_tensor(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def to_comfyui(
    family: str, peft_sd: Mapping[str, torch.Tensor], alpha: float, transformer_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """PEFT state dict (keys '<module>.lora_A.weight') -> ComfyUI LoRA state dict.

    Every module gets ``diffusion_model.<name>.lora_A.weight``, ``.lora_B.weight`` and a float32
    0-dim ``.alpha``. Tensors keep their dtype; the caller casts.
    """
    _check_family(family)
    pairs = _split_peft_keys(peft_sd)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, (a, b) in pairs.items():
        m = _QKV_DIFFUSERS.fullmatch(module) if family == LUMINA2 else None
        if m:
            qkv.setdefault(m["blk"], {})[m["p"]] = (a, b)
            continue
        name = PREFIX + diffusers_to_comfyui_module(family, module)
        out[name + _A], out[name + _B], out[name + _ALPHA] = a, b, _alpha_tensor(alpha)
    if qkv:
        rows = lumina2_qkv_rows(transformer_config)
        for blk, parts in qkv.items():
            name = f"{PREFIX}{blk}.attention.qkv"
            a, b, n = _fuse_qkv(blk, parts, rows)
            out[name + _A], out[name + _B], out[name + _ALPHA] = a, b, _alpha_tensor(n * alpha)
    return out


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
) -> tuple[dict[str, torch.Tensor], float]:
    """ComfyUI LoRA state dict -> (PEFT state dict, lora_alpha).

    Exact inverse of :func:`to_comfyui`. ``expected_ranks`` (diffusers module -> rank of the
    adapter being loaded into) settles which of q/k/v a fused qkv holds when that cannot be read
    from the tensors (an all-zero B). If modules carry different alpha/rank scales, B is rescaled
    so that one lora_alpha reproduces every module's effect.
    """
    _check_family(family)
    stripped: dict[str, torch.Tensor] = {}
    for key, value in comfy_sd.items():
        if not key.startswith(PREFIX):
            raise ConfigError(f"ComfyUI LoRA key {key!r} does not start with {PREFIX!r}")
        stripped[key[len(PREFIX) :]] = value
    alphas = {k[: -len(_ALPHA)]: float(v.item()) for k, v in stripped.items() if k.endswith(_ALPHA)}
    pairs = _split_peft_keys({k: v for k, v in stripped.items() if not k.endswith(_ALPHA)})
    leftover = set(alphas) - set(pairs)
    if leftover:
        raise ConfigError(f"ComfyUI LoRA has .alpha without weights for: {', '.join(sorted(leftover))}")

    # module -> (A, B, alpha in peft terms: the scale is alpha / A.shape[0])
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for cname, (a, b) in pairs.items():
        file_alpha = alphas.get(cname, float(a.shape[0]))  # no .alpha: ComfyUI scale 1.0
        m = _QKV_COMFY.fullmatch(cname) if family == LUMINA2 else None
        if m:
            modules.update(_split_qkv(m["blk"], a, b, file_alpha, lumina2_qkv_rows(transformer_config), expected_ranks))
        else:
            modules[comfyui_to_diffusers_module(family, cname)] = (a, b, file_alpha)
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
    if rescaled:
        log.info("rescaled lora_B of %d module(s) to a common lora_alpha of %g", rescaled, alpha)
    return peft_sd, alpha


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
