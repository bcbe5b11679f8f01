"""Gathering a subset of tokens out of a sequence and putting it back: the two halves of a route.

Both work on any tensor laid out ``(batch, tokens, ...)`` so that the tokens and everything that
is per token (RoPE tables, per-token modulation) are routed by the same indices; a tensor routed
with other indices than its tokens would silently give each token another token's position.
"""

from __future__ import annotations

import torch


def _index_like(ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, k = ids.shape
    return ids.view(b, k, *([1] * (len(shape) - 2))).expand(b, k, *shape[2:])


def gather_tokens(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``t`` (batch or 1, tokens, ...) -> (batch, kept, ...) at ``ids`` (batch, kept).

    A batch dimension of 1 (a table shared by the whole batch) is broadcast first.
    """
    if t.shape[0] != ids.shape[0]:
        t = t.expand(ids.shape[0], *t.shape[1:])
    return torch.gather(t, 1, _index_like(ids.to(t.device), t.shape))


def scatter_tokens(base: torch.Tensor, ids: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """``base`` with the rows at ``ids`` replaced by ``routed`` (out of place).

    Out of place so autograd sends the gradient of kept rows into ``routed`` (through the routed
    blocks) and that of the other rows into ``base`` (around them), never both.
    """
    return base.scatter(1, _index_like(ids.to(base.device), routed.shape), routed.to(base.dtype))
