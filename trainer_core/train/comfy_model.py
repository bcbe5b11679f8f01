"""Diffusers transformer weights <-> the key names of a ComfyUI diffusion-model file.

ComfyUI's "Load Diffusion Model" detects the architecture from key names
(comfy/model_detection.py): Lumina 2 needs ``cap_embedder.1.weight`` and
``noise_refiner.0.attention.k_norm.weight``, i.e. the original NextDiT names, with q, k and v in one
fused ``attention.qkv`` (rows q | k | v). This is the inverse of diffusers'
``convert_lumina2_to_diffusers``. Kandinsky 5's ComfyUI names are diffusers' own, so its map is
the identity.

Conversions work on names and yield tensors one at a time from a mapping, so an exporter can
stream them into shards without a converted copy of the whole model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

_LUMINA2_GLOBAL = {
    "time_caption_embed.caption_embedder.": "cap_embedder.",
    "time_caption_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_caption_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "norm_out.linear_1.": "final_layer.adaLN_modulation.1.",
    "norm_out.linear_2.": "final_layer.linear.",
}
# inside a block (layers.N, noise_refiner.N, context_refiner.N): diffusers suffix -> ComfyUI suffix
_LUMINA2_BLOCK = {
    "attn.to_out.0.": "attention.out.",
    "attn.norm_q.": "attention.q_norm.",
    "attn.norm_k.": "attention.k_norm.",
    "feed_forward.linear_1.": "feed_forward.w1.",
    "feed_forward.linear_2.": "feed_forward.w2.",
    "feed_forward.linear_3.": "feed_forward.w3.",
    "norm1.linear.": "adaLN_modulation.1.",
    "norm1.norm.": "attention_norm1.",
    "norm1.": "attention_norm1.",  # context_refiner: no modulation, norm1 is the RMSNorm itself
    "norm2.": "attention_norm2.",
    "ffn_norm1.": "ffn_norm1.",
    "ffn_norm2.": "ffn_norm2.",
}
_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\.(.*)$")
_QKV = re.compile(r"^(.*)\.attn\.to_([qkv])\.(weight|bias)$")


def lumina2_name(key: str) -> str | None:
    """ComfyUI's name for one diffusers key; None for q/k/v (fused by :func:`lumina2_to_comfy`)."""
    if _QKV.match(key):
        return None
    for old, new in _LUMINA2_GLOBAL.items():
        if key.startswith(old):
            return new + key[len(old) :]
    m = _BLOCK.match(key)
    if m:
        block, rest = m.groups()
        for old, new in _LUMINA2_BLOCK.items():
            if rest.startswith(old):
                return f"{block}.{new}{rest[len(old) :]}"
        raise KeyError(f"no ComfyUI name for Lumina 2 key {key!r}")
    if key.startswith("x_embedder."):
        return key
    raise KeyError(f"no ComfyUI name for Lumina 2 key {key!r}")


def lumina2_plan(keys: list[str]) -> dict[str, list[str]]:
    """ComfyUI key -> the diffusers keys it is made of (three, concatenated, for a fused qkv)."""
    plan: dict[str, list[str]] = {}
    for key in keys:
        m = _QKV.match(key)
        if m:
            stem, _, leaf = m.groups()
            plan.setdefault(f"{stem}.attention.qkv.{leaf}", [f"{stem}.attn.to_{p}.{leaf}" for p in "qkv"])
        else:
            plan[lumina2_name(key)] = [key]  # type: ignore[index]
    for ck, parts in plan.items():
        missing = [p for p in parts if p not in keys]
        if missing:
            raise KeyError(f"{ck} needs {missing}, which the transformer lacks")
    return plan


class ComfyTensors(Mapping[str, torch.Tensor]):
    """A diffusers state dict seen under ComfyUI's names; each tensor made (a qkv concatenated) on lookup."""

    def __init__(self, source: Mapping[str, torch.Tensor], plan: dict[str, list[str]]) -> None:
        self._source = source
        self._plan = plan

    def __getitem__(self, key: str) -> torch.Tensor:
        parts = self._plan[key]
        if len(parts) == 1:
            return self._source[parts[0]]
        return torch.cat([self._source[p] for p in parts])

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` without making it (a fused qkv: the parts' rows added)."""
        shapes = [tuple(self._source[p].shape) for p in self._plan[key]]
        return (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]

    def __iter__(self):
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


def lumina2_to_comfy(sd: Mapping[str, torch.Tensor]) -> ComfyTensors:
    """``sd`` (diffusers Lumina2Transformer2DModel names) under ComfyUI's NextDiT names."""
    return ComfyTensors(sd, lumina2_plan(list(sd)))


def lumina2_from_comfy(sd: Mapping[str, torch.Tensor], q_rows: int, kv_rows: int) -> dict[str, torch.Tensor]:
    """The inverse: a ComfyUI Lumina 2 file's tensors under diffusers' names (qkv split q | k | v).

    ``q_rows`` = hidden size, ``kv_rows`` = num_kv_heads * head_dim (from the transformer's config).
    """
    by_comfy: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for key in sd:
        if ".attention.qkv." in key:
            stem, leaf = key.split(".attention.qkv.")
            q, k, v = torch.split(sd[key], [q_rows, kv_rows, kv_rows])
            out.update({f"{stem}.attn.to_q.{leaf}": q, f"{stem}.attn.to_k.{leaf}": k, f"{stem}.attn.to_v.{leaf}": v})
            continue
        by_comfy[key] = key
    inverse = {}
    for key in by_comfy:
        inverse[key] = _lumina2_diffusers_name(key)
    for ck, dk in inverse.items():
        out[dk] = sd[ck]
    return out


def _lumina2_diffusers_name(key: str) -> str:
    for old, new in _LUMINA2_GLOBAL.items():
        if key.startswith(new):
            return old + key[len(new) :]
    m = _BLOCK.match(key)
    if m:
        block, rest = m.groups()
        context = block.startswith("context_refiner")
        for old, new in _LUMINA2_BLOCK.items():
            if old == "norm1.norm." and context:
                continue
            if old == "norm1." and not context:
                continue
            if rest.startswith(new):
                return f"{block}.{old}{rest[len(new) :]}"
    if key.startswith("x_embedder."):
        return key
    raise KeyError(f"not a ComfyUI Lumina 2 key: {key!r}")


def kandinsky5_to_comfy(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Kandinsky 5: ComfyUI's detector reads diffusers' own names (identity)."""
    return sd


TO_COMFY: dict[str, Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]] = {
    "lumina2": lumina2_to_comfy,
    "kandinsky5-image": kandinsky5_to_comfy,
    "kandinsky5-video": kandinsky5_to_comfy,
}
