"""DoRA magnitudes as ComfyUI reads them (``<module>.dora_scale``), and the base weights they need.

ComfyUI applies a ``dora_scale`` with one rule for every adapter (``weight_decompose`` in
``comfy/weight_adapter/base.py``, the same in 0.8.0 and 0.33.0). With ``W`` the layer's weight
in float32, ``D`` the adapter's delta (alpha/rank already applied) and ``s`` the file's
``dora_scale``, at strength 1 it computes ``W' = (W + D) * s / (n + eps)`` where ``eps`` is
float32's machine epsilon and ``n`` depends on the *shape* of ``s``:

* ``s.shape[0] == out_features`` (output axis, shape ``(out, 1)``): ``n`` is the row norm of the
  **original** weight ``W``, not of ``W + D``;
* otherwise (input axis, shape ``(1, in)``): ``n`` is the column norm of ``W + D``.

The trainers normalise by the merged weight instead: PEFT's DoRA keeps a per-output-row
magnitude ``m`` (``lora_magnitude_vector``) and computes ``m * (W + D) / ||W + D||_row`` (no eps);
LyCORIS's ``dora_wd`` computes ``m * (W + D) / (||W + D|| + eps)`` per row (``wd_on_output``
True) or per column (False). The input-axis case is therefore ComfyUI's rule already and its
``dora_scale`` is written unchanged. For the output axis the magnitude is *baked* at export:

    s = m * (||W||_row + eps) / (||W + D||_row + eps_trainer)

so that ComfyUI's division by ``||W||_row + eps`` gives exactly the trainer's weight. This
needs the base weights at export and at import (:func:`unbake_output_axis` inverts it). A
quantised base (optimum-quanto, torchao) is dequantised first: ComfyUI patches the full
precision checkpoint, and the dequantised weight is the closest the trainer has to it. Rows
of ``W`` the adapter does not change (Lumina 2's fused qkv with only some projections trained)
get ``s = ||W||_row + eps``, which ComfyUI turns into a factor of 1.

At strengths other than 1 ComfyUI blends ``W + strength * (W' - W)``; LyCORIS's ``multiplier``
scales its own way, so files agree with the trainer exactly at strength 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from ..errors import ConfigError

EPS = torch.finfo(torch.float32).eps  # ComfyUI patches in float32 and adds finfo(weight.dtype).eps


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each output row (every axis but the first), shape ``(out, 1)``, float32."""
    w = weight.float()
    return w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True)


def bake_output_axis(
    magnitude: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, trainer_eps: float
) -> torch.Tensor:
    """ComfyUI ``dora_scale`` (shape ``(out, 1)``, float32) for a trainer's per-row magnitude."""
    m = magnitude.detach().float().reshape(-1, 1)
    merged = base.float() + delta.float().reshape(base.shape)
    return m * (row_norm(base) + EPS) / (row_norm(merged) + trainer_eps)


def unbake_output_axis(
    dora_scale: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, trainer_eps: float
) -> torch.Tensor:
    """Inverse of :func:`bake_output_axis`: the trainer's magnitude, shape ``(out, 1)``, float32."""
    s = dora_scale.detach().float().reshape(-1, 1)
    merged = base.float() + delta.float().reshape(base.shape)
    return s * (row_norm(merged) + trainer_eps) / (row_norm(base) + EPS)


def is_quantized(weight: torch.Tensor) -> bool:
    module = type(weight).__module__
    return module.startswith("optimum.quanto") or module.startswith("torchao")


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``weight``'s values (quanto / torchao tensors are dequantised)."""
    w = weight.detach()
    if is_quantized(w):
        w = w.dequantize()
    return w


_QKV_SIBLING = re.compile(r"(?P<stem>.*\.attn)\.to_[qkv]")


def base_weights_of(transformer: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The base weight of each named module (dequantised if quantised), for the DoRA bake.

    ``names`` are diffusers module names. Lumina 2's unfused ``attn.to_q``/``to_k``/``to_v`` bring
    their siblings along: a DoRA on one of them is written into ComfyUI's fused qkv, whose rows of
    the other projections must be kept as they are. Modules without a weight (LyCORIS ``full``
    moves it into its own module) are left out. The tensors are not copied unless dequantised.
    """
    modules = dict(transformer.named_modules())
    wanted: list[str] = []
    for name in names:
        wanted.append(name)
        m = _QKV_SIBLING.fullmatch(name)
        if m:
            wanted.extend(f"{m['stem']}.to_{p}" for p in "qkv")
    out: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(wanted):
        module = modules.get(name)
        if module is None:
            if name in names:
                raise ConfigError(f"the transformer has no module {name!r} to read a base weight from")
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            out[name] = dequantized(weight)
    return out


def require_base(base_weights: Mapping[str, torch.Tensor] | None, module: str, why: str) -> torch.Tensor:
    if base_weights is None or module not in base_weights:
        raise ConfigError(
            f"{module}: {why} needs the base weight of this module",
            "pass base_weights (trainer_core.lora.dora.base_weights_of(transformer, names))",
        )
    return base_weights[module]
