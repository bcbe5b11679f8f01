"""Lumina 2 attention with one fused ``to_qkv`` projection, exactly equivalent to diffusers' three.

Why: ComfyUI's Lumina 2 model (NextDiT) holds each attention's query, key and value projection as
ONE Linear, ``<blk>.attention.qkv``, rows ``[q | k | v]``; diffusers' Lumina2Transformer2DModel has
three, ``<blk>.attn.to_q/to_k/to_v``, and Lumina 2 uses grouped-query attention, so k and v are
narrower than q (``num_kv_heads * head_dim`` rows each). ComfyUI's key map for Lumina 2 only knows
the fused ``qkv`` (its diffusers map is Z-Image's, with equal q/k/v offsets), so an adapter on the
three separate projections has to be written as a delta of the fused weight. A plain LoRA can be:
stack the A matrices and make B block-diagonal over the row ranges (``lora/comfy_keys.py``). A
LyCORIS delta cannot in general: a Kronecker product ``w1 ⊗ w2`` (LoKr) or a Hadamard product of two
low-rank matrices (LoHa) of the fused shape is not block-diagonal, and three separate ones do not
add up to one. So for LyCORIS we train on the fused projection itself: its delta IS the delta of
ComfyUI's ``attention.qkv``, exported without any conversion and merged by ComfyUI's own rule.

How: :func:`fuse_qkv_projections` replaces each attention's to_q/to_k/to_v by one ``nn.Linear``
``to_qkv`` whose weight is the row concatenation (the originals are deleted, so memory does not
double) and installs :class:`FusedQKVLumina2AttnProcessor`, which computes qkv once, splits it, and
hands the slices to diffusers' own :class:`Lumina2AttnProcessor2_0` for everything else (qk-norm,
RoPE, GQA, softmax scale, output projection). The fused model gives the same output as the unfused
one (tests/test_lumina2_fused_qkv.py). Fuse right after loading and before quantising: int8 weight
quantisation (quanto, torchao) scales per output row, so the fused weight quantises to exactly the
rows the three separate weights would.

The module names change: ``<blk>.attn.to_qkv`` (blk = ``layers.N``, ``noise_refiner.N``,
``context_refiner.N``) corresponds to ComfyUI's ``<blk>.attention.qkv``; LoRA target suffixes are
mapped with :func:`fused_lora_targets`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0

from ..errors import ConfigError
from ..lora.comfy_keys import lumina2_qkv_rows

log = logging.getLogger(__name__)

FUSED = "to_qkv"
SEPARATE = ("to_q", "to_k", "to_v")


class _SlicedProjections:
    """``attn`` as diffusers' processor sees it, except that to_q/to_k/to_v return precomputed slices.

    Every other attribute (heads, scale, norm_q, norm_k, to_out, ...) is the real module's, so
    module hooks (group offload, LyCORIS/PEFT wrappers) run as they would without the proxy.
    """

    def __init__(self, attn: Attention, source: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self._attn = attn
        self._source = source
        self._out = {"to_q": q, "to_k": k, "to_v": v}

    def _projection(self, name: str):
        def project(x: torch.Tensor) -> torch.Tensor:
            if x is not self._source:  # diffusers changed what it projects: the slices would be wrong
                raise RuntimeError(
                    f"Lumina 2 fused qkv: diffusers' Lumina2AttnProcessor2_0 called {name} on another tensor "
                    "than the attention input; this diffusers version is not supported by the fused projection"
                )
            return self._out[name]

        return project

    def __getattr__(self, name: str) -> Any:
        if name in SEPARATE:
            return self._projection(name)
        return getattr(self._attn, name)


class FusedQKVLumina2AttnProcessor:
    """Lumina 2 self-attention on a fused ``attn.to_qkv``: one matmul, then diffusers' processor."""

    def __init__(self, rows: dict[str, int]) -> None:
        self.rows = (rows["q"], rows["k"], rows["v"])
        self.inner = Lumina2AttnProcessor2_0()

    # The parameter names must be diffusers' (Attention.forward passes only the keywords a
    # processor's __call__ names); fuse_qkv_projections checks that they still are.
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        base_sequence_length: int | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None and encoder_hidden_states is not hidden_states:
            raise RuntimeError(
                "Lumina 2 fused qkv projection: got cross-attention (encoder_hidden_states is not hidden_states); "
                "the fused projection only supports Lumina 2's self-attention. Train without the fused qkv "
                "(standard LoRA) or use a diffusers version whose Lumina 2 blocks call self-attention"
            )
        q, k, v = attn.to_qkv(hidden_states).split(self.rows, dim=-1)
        proxy = _SlicedProjections(attn, hidden_states, q, k, v)
        return self.inner(
            proxy,  # type: ignore[arg-type]
            hidden_states,
            hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
            base_sequence_length=base_sequence_length,
        )


def _check_diffusers_signature() -> None:
    theirs = list(inspect.signature(Lumina2AttnProcessor2_0.__call__).parameters)
    ours = list(inspect.signature(FusedQKVLumina2AttnProcessor.__call__).parameters)
    if theirs != ours:
        raise ConfigError(
            f"diffusers' Lumina2AttnProcessor2_0 takes {theirs[1:]}, the fused qkv processor {ours[1:]}",
            "install the diffusers version this trainer pins, or train Lumina 2 with a standard LoRA",
        )


_TOO_LATE = (
    "the Lumina 2 qkv projections must be fused right after loading, before quantisation, adapters or offloading"
)
_TOO_LATE_HINT = "call fuse_qkv_projections before quantize_transformer, the adapter and place_transformer"


def _plain_linear(module: Any, where: str) -> torch.nn.Linear:
    """The projection as a plain, unquantised, real nn.Linear; else a clear error (fuse too late)."""
    from ..memory.quantize import is_quantized_tensor

    if type(module) is not torch.nn.Linear:
        raise ConfigError(f"{where} is a {type(module).__name__}, not a plain Linear: {_TOO_LATE}", _TOO_LATE_HINT)
    if hasattr(module, "_lycoris_wrappers"):
        raise ConfigError(f"{where} already carries a LyCORIS adapter: {_TOO_LATE}", _TOO_LATE_HINT)
    for tensor in (module.weight, module.bias):
        if tensor is not None and (is_quantized_tensor(tensor) or tensor.device.type == "meta"):
            raise ConfigError(f"{where} holds a quantised or offloaded weight: {_TOO_LATE}", _TOO_LATE_HINT)
    return module


def _checked(attn: Attention, name: str, rows: dict[str, int]) -> tuple[torch.nn.Linear, ...]:
    """The three projections, checked to be fusable into the ``rows`` layout."""
    q, k, v = (_plain_linear(getattr(attn, p), f"{name}.{p}") for p in SEPARATE)
    got = {"q": q.out_features, "k": k.out_features, "v": v.out_features}
    if got != rows or not q.in_features == k.in_features == v.in_features:
        raise ConfigError(
            f"{name}: q/k/v projections have {got} output rows, the transformer config says {rows}",
            "check the transformer's config.json (hidden_size, num_attention_heads, num_kv_heads)",
        )
    if len({p.bias is None for p in (q, k, v)}) != 1:
        raise ConfigError(f"{name}: only some of to_q/to_k/to_v have a bias; they cannot be fused")
    return q, k, v


def _fuse(attn: Attention, projections: tuple[torch.nn.Linear, ...], rows: dict[str, int]) -> None:
    q, k, v = projections
    has_bias = q.bias is not None
    fused = torch.nn.Linear(q.in_features, sum(rows.values()), bias=has_bias, device="meta", dtype=q.weight.dtype)
    with torch.no_grad():
        weight = torch.cat([q.weight, k.weight, v.weight], dim=0)
        fused.weight = torch.nn.Parameter(weight, requires_grad=q.weight.requires_grad)
        if has_bias:
            fused.bias = torch.nn.Parameter(torch.cat([q.bias, k.bias, v.bias]), requires_grad=q.bias.requires_grad)
    fused.train(q.training)
    for p in SEPARATE:
        delattr(attn, p)  # the originals go: memory holds one copy of the weights
    attn.to_qkv = fused
    attn.set_processor(FusedQKVLumina2AttnProcessor(rows))


def fuse_qkv_projections(transformer: torch.nn.Module) -> int:
    """Replace every Lumina 2 attention's to_q/to_k/to_v by one Linear ``to_qkv``; the number fused.

    Applies to each diffusers ``Attention`` that runs ``Lumina2AttnProcessor2_0`` (``layers``,
    ``noise_refiner``, ``context_refiner``). The fused Linear ``<blk>.attn.to_qkv`` has the weight
    ``cat([q, k, v])`` (rows as :func:`~trainer_core.lora.comfy_keys.lumina2_qkv_rows`) and the
    originals' dtype, device and bias. Idempotent: a second call finds nothing left and returns 0.
    Must run before quantisation, adapters and group offload (a clear error otherwise).
    """
    rows = lumina2_qkv_rows(transformer.config)  # type: ignore[arg-type]
    targets = [
        (name, m)
        for name, m in transformer.named_modules()
        if isinstance(m, Attention) and type(m.processor) is Lumina2AttnProcessor2_0
    ]
    if targets:
        _check_diffusers_signature()
        hooked = [n for n, m in transformer.named_modules() if hasattr(m, "_diffusers_hook")]
        if hooked:  # group offload (or another diffusers hook) already holds these weights
            raise ConfigError(
                f"the transformer already has diffusers hooks (group offload?) on {hooked[0]!r}: the Lumina 2 qkv "
                "projections must be fused before the transformer is placed",
                "call fuse_qkv_projections before place_transformer",
            )
    checked = [(attn, _checked(attn, name, rows)) for name, attn in targets]  # all, before changing any
    for attn, projections in checked:
        _fuse(attn, projections, rows)
    if targets:
        log.info("Lumina 2: fused q/k/v into one to_qkv projection in %d attention layers", len(targets))
    return len(targets)


def has_fused_qkv(transformer: torch.nn.Module) -> bool:
    """True when ``transformer``'s attentions run on a fused ``to_qkv`` (after :func:`fuse_qkv_projections`)."""
    return any(isinstance(getattr(m, "processor", None), FusedQKVLumina2AttnProcessor) for m in transformer.modules())


def fused_lora_targets(targets: list[str]) -> list[str]:
    """The family's LoRA target suffixes for a fused model: to_q/to_k/to_v become ``to_qkv`` (once).

    A target whose last dotted part is to_q, to_k or to_v (``"to_k"``, ``"attn.to_v"``) becomes the
    same name ending in ``to_qkv``, at the place of its first such target; everything else stays, in
    order. A set with only some of q/k/v (say ``["to_q", "to_out.0"]``) also becomes ``to_qkv``:
    there is no separate k or v projection any more, so the adapter then covers the whole fused weight
    (q, k and v rows alike); a warning says so.
    """
    out: list[str] = []
    present: dict[str, set[str]] = {}
    for target in targets:
        head, _, last = target.rpartition(".")
        if last in SEPARATE or last == FUSED:
            fused = f"{head}.{FUSED}" if head else FUSED
            present.setdefault(fused, set()).add(last)
            target = fused
        if target not in out:
            out.append(target)
    for fused, seen in present.items():
        partial = [p for p in SEPARATE if p not in seen]
        if FUSED not in seen and partial:
            log.warning(
                "LoRA targets name %s but not %s: with Lumina 2's fused qkv projection the adapter on %s "
                "covers all of q, k and v",
                ", ".join(p for p in SEPARATE if p in seen),
                ", ".join(partial),
                fused,
            )
    return out
