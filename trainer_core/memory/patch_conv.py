"""Patch convolution for the HunyuanVideo VAE (``vae_enable_patch_conv``): its 3D convolutions in chunks.

Why. Caching latents of long, large clips is where Kandinsky 5 video runs out of memory first: the
VAE's first and last layers run 128-channel 3D convolutions at full pixel resolution, and each
``HunyuanVideoCausalConv3d`` first builds a padded copy of its whole input (``F.pad``), then hands
the padded tensor to the convolution, whose kernel may need a large workspace on top (on CPU the
fallback ``slow_conv3d`` unfolds a ``C*k^3 x T*H*W`` column buffer). diffusers offers tiling, which
cuts the picture into overlapping tiles and blends the seams (so the latents change), but no way
to split a single convolution. SimpleTuner ships ``vae_enable_patch_conv``; this is our own.

How. A patched convolution computes its output in slabs along time (and, if one frame is still
over budget, along height): for output rows ``[a, b)`` along an axis with kernel ``k`` and stride
``s`` it needs padded input rows ``[a*s, (b-1)*s + k)``, i.e. a halo of ``k - s`` rows shared with
the next slab. The padding is rebuilt per slab instead of padding the whole input: the causal
time padding (``k_t - 1`` copies of the first frame, ``replicate`` mode) and the spatial padding
only appear on slabs that touch the border, which is exactly where the whole-input padding puts
them, so every output element sees the same input values as before. Results go straight into one
preallocated output, so nothing is concatenated. The outputs equal the unsplit VAE's up to
floating-point summation order (``tests/test_kandinsky5_video.py`` pins it, encoder and decoder).
On CPU the slabs run through oneDNN directly (see :func:`_conv3d`).

The budget should be well below the largest activation (a quarter or less): a tensor just over the
budget is cut into two big slabs whose temporaries cost about what the whole-input padding saved.

What it does not do: the mid-block attention and the GroupNorms still see whole tensors, and the
output of every convolution still exists in full. Tiling (diffusers) bounds those; the two combine.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

DEFAULT_BUDGET_BYTES = 512 * 2**20
"""Largest padded input slab a patched convolution hands to ``conv3d`` at once (512 MiB)."""

_ATTR = "_patch_conv_budget"
_SPLIT_AXES = (0, 1)  # time, then height (indices into the (T, H, W) axes)


def _causal_convs(vae: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The VAE's ``HunyuanVideoCausalConv3d`` modules (found by shape, so a compatible copy works too)."""
    for module in vae.modules():
        conv = getattr(module, "conv", None)
        if isinstance(conv, torch.nn.Conv3d) and hasattr(module, "time_causal_padding"):
            yield module


def enable_patch_conv(vae: torch.nn.Module, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """Make every causal 3D convolution of ``vae`` run in slabs of at most ``budget_bytes`` of padded
    input; returns how many convolutions were patched. Calling it again changes the budget."""
    if budget_bytes < 1:
        raise ValueError(f"budget_bytes must be >= 1, got {budget_bytes}")
    count = 0
    for module in _causal_convs(vae):
        setattr(module, _ATTR, int(budget_bytes))
        module.forward = types.MethodType(_patched_forward, module)
        count += 1
    return count


def disable_patch_conv(vae: torch.nn.Module) -> None:
    """Undo :func:`enable_patch_conv` (the class's own ``forward`` is used again)."""
    for module in _causal_convs(vae):
        if _ATTR in vars(module):
            delattr(module, _ATTR)
            module.__dict__.pop("forward", None)


def patch_conv_enabled(vae: torch.nn.Module) -> bool:
    return any(_ATTR in vars(m) for m in _causal_convs(vae))


def _patched_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    conv: torch.nn.Conv3d = self.conv
    if not _splittable(conv) or self.pad_mode not in ("replicate", "constant"):
        return conv(F.pad(hidden_states, self.time_causal_padding, mode=self.pad_mode))
    w_before, w_after, h_before, h_after, t_before, t_after = self.time_causal_padding
    pads = [(t_before, t_after), (h_before, h_after), (w_before, w_after)]
    out_shape = [
        (n + before + after - k) // s + 1
        for n, (before, after), k, s in zip(hidden_states.shape[2:], pads, conv.kernel_size, conv.stride)
    ]
    out = hidden_states.new_empty(hidden_states.shape[0], conv.out_channels, *out_shape)
    _run(conv, self.pad_mode, getattr(self, _ATTR), hidden_states, pads, out, _SPLIT_AXES)
    return out


def _splittable(conv: torch.nn.Conv3d) -> bool:
    """Only the plain case HunyuanVideo uses: no built-in padding, no dilation, no groups."""
    return (
        tuple(conv.padding) == (0, 0, 0)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _padded_bytes(x: torch.Tensor, pads: list[tuple[int, int]]) -> int:
    sizes = [n + before + after for n, (before, after) in zip(x.shape[2:], pads)]
    return x.shape[0] * x.shape[1] * math.prod(sizes) * x.element_size()


def _run(
    conv: torch.nn.Conv3d,
    mode: str,
    budget: int,
    x: torch.Tensor,
    pads: list[tuple[int, int]],
    out: torch.Tensor,
    axes: tuple[int, ...],
) -> None:
    """Fill ``out`` with ``conv(pad(x, pads))``, slicing along ``axes[0]`` while the padded input is over budget.

    ``x`` is a slab of the unpadded input and ``pads`` the padding it still needs per (T, H, W) axis:
    the whole-input padding on sides where the slab touches the border, none inside.
    """
    total = _padded_bytes(x, pads)
    axis = next((a for a in axes if out.shape[2 + a] > 1), None)
    if total <= budget or axis is None:
        flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad wants (W, H, T) pairs
        out.copy_(_conv3d(conv, F.pad(x, flat, mode=mode) if any(flat) else x))
        return
    rest = tuple(a for a in axes if a != axis)
    k, s = conv.kernel_size[axis], conv.stride[axis]
    n = x.shape[2 + axis]
    before, after = pads[axis]
    out_n = out.shape[2 + axis]
    row_bytes = total / (n + before + after)  # bytes of one padded input row along ``axis``
    rows = int(budget // row_bytes)
    chunk = max(1, (rows - k) // s + 1) if rows >= k else 1
    if chunk >= out_n:  # cannot get under budget along this axis (the halo alone is too big): go deeper
        _run(conv, mode, budget, x, pads, out, rest)
        return
    for a in range(0, out_n, chunk):
        b = min(a + chunk, out_n)
        lo, hi = a * s, (b - 1) * s + k  # rows of the padded input this slab reads
        start, stop = max(lo - before, 0), min(hi - before, n)
        sub_pads = list(pads)
        sub_pads[axis] = (max(before - lo, 0), max(hi - before - n, 0))
        _run(
            conv,
            mode,
            budget,
            x.narrow(2 + axis, start, stop - start),
            sub_pads,
            out.narrow(2 + axis, a, b - a),
            rest,
        )


def _conv3d(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, on CPU through oneDNN directly where that is safe.

    For some input shapes (small slabs among them) CPU PyTorch dispatches conv3d to ``slow_conv3d``,
    which unfolds a column buffer 27x the size of the input: a 9-frame 8-channel 256 px slab then
    peaks at 392 MiB instead of 42 MiB, and slabbing would cost memory instead of saving it. oneDNN
    needs no such buffer. It has no autograd formula here, so only inference (VAE caching) uses it.
    """
    fast = (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
    )
    if not fast:
        return conv(x)
    weight = conv.weight.to(x.dtype)
    bias = conv.bias.to(x.dtype) if conv.bias is not None else None
    return torch.mkldnn_convolution(x.contiguous(), weight, bias, [0, 0, 0], list(conv.stride), [1, 1, 1], 1)
