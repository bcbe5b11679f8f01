"""TREAD for diffusers' ``Kandinsky5Transformer3DModel`` (image and video).

What a visual block sees (diffusers 0.42, ``transformer_kandinsky.py``): after the text blocks the
visual tokens are flattened frame-major to ``(B, T*H*W, D)`` (NABLA's tiled "fractal" order is
frame-major too), the 3D RoPE table is built and flattened the same way to ``(B, T*H*W, 1, F, 2, 2)``,
and every visual block is called as ``block(visual_embed, text_embed, time_embed, rope,
sparse_params)``. The time embedding and the modulation computed from it are per sample and
broadcast over tokens, and cross-attention reads the text stream, so only ``visual_embed`` and
``rope`` are per token: both are routed with the same sorted indices. Text blocks are never routed.

Where the routing hooks in. diffusers runs each block through
``transformer._gradient_checkpointing_func(block, *args)`` whenever grad is enabled and
``transformer.gradient_checkpointing`` is set. While routing, that function is replaced by
:meth:`Kandinsky5Router._dispatch` (and the flag forced on; without real checkpointing the
dispatcher just calls the block). The gather before a route and the scatter after it therefore run
*outside* the checkpointed call: activation recomputation in backward re-runs the block on the
already-routed tensors it saved and never consults routing state. That matters because the state
does not outlive the forward pass: ``Kandinsky5Base.predict`` makes one forward pass per caption
length and backward comes only after the last, so state read during recomputation would belong to
the wrong pass. A forward pre-hook on ``visual_rope_embeddings`` (called once per forward, just
before the visual blocks, with the post-patch ``(B, T, H, W)`` shape) gives the token grid.

NABLA (``sparse_params``) cannot see a routed sequence: its block mask is built for whole 64-token
tiles of the full grid. Routed blocks therefore attend densely over the kept tokens (one of the two
options in the K5 conventions); blocks outside routes keep NABLA.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .tokens import gather_tokens, scatter_tokens
from .tread import ForceKeep, TokenGrid, TreadRoute, generator_from_global_rng, parse_routes, route_warnings
from .tread import select_kept_tokens as select

log = logging.getLogger(__name__)

BLOCK_PARAMS = ("visual_embed", "text_embed", "time_embed", "rope", "sparse_params")
_warned: set[str] = set()


@dataclass
class _OpenRoute:
    """A route between its first and last block: what the scatter at its end needs."""

    route: TreadRoute
    ids: torch.Tensor  # (B, kept), sorted
    saved: torch.Tensor  # the full pre-route tokens; dropped tokens come back from here
    rope: torch.Tensor  # the RoPE table gathered with ``ids``


class Kandinsky5Router:
    """Routes one transformer's visual tokens while entered (a context manager; see the module doc).

    ``kept`` lists the indices each route kept in the latest forward call, in route order (tests
    and logging read it). Routing happens only for calls made in training mode with grad enabled.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        routes: list[TreadRoute],
        generator: torch.Generator,
        force_keep: ForceKeep | None = None,
    ) -> None:
        self.transformer = transformer
        self.routes = routes
        self.generator = generator
        self.force_keep = force_keep
        blocks = transformer.visual_transformer_blocks
        self._index = {id(b): i for i, b in enumerate(blocks)}
        self._route_at = {i: r for r in routes for i in range(r.start, r.end + 1)}
        self.grid: TokenGrid | None = None
        self.kept: list[torch.Tensor] = []
        self._open: _OpenRoute | None = None
        self._checkpoint: Any = None
        self._saved: tuple[bool, Any] | None = None
        self._hook: Any = None
        _check_block_signature(blocks[0])

    # ------------------------------------------------------------------ install
    def __enter__(self) -> Kandinsky5Router:
        t = self.transformer
        if isinstance(getattr(t._gradient_checkpointing_func, "__self__", None), Kandinsky5Router):
            raise RuntimeError("this transformer is already routing tokens (TREAD contexts do not nest)")
        self._saved = (t.gradient_checkpointing, t._gradient_checkpointing_func)
        self._checkpoint = t._gradient_checkpointing_func if t.gradient_checkpointing else None
        t.gradient_checkpointing = True
        t._gradient_checkpointing_func = self._dispatch
        self._hook = t.visual_rope_embeddings.register_forward_pre_hook(self._on_rope, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        t = self.transformer
        self._hook.remove()
        assert self._saved is not None
        t.gradient_checkpointing, t._gradient_checkpointing_func = self._saved
        self._open = None

    # ------------------------------------------------------------------ per forward call
    def _on_rope(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        shape = args[0] if args else kwargs["shape"]
        batch, frames, height, width = (int(v) for v in shape)
        self.grid = TokenGrid(batch, frames, height * width)
        self.kept = []
        self._open = None

    def _active(self) -> bool:
        return self.transformer.training and torch.is_grad_enabled()

    def _dispatch(self, fn: Any, *args: Any) -> Any:
        if self._checkpoint is not None:
            checkpoint = self._checkpoint

            def call(*a: Any) -> Any:
                return checkpoint(fn, *a)
        else:
            call = fn
        i = self._index.get(id(fn))
        route = self._route_at.get(i) if i is not None else None
        if route is None or not self._active():
            return call(*args)
        x, text_embed, time_embed, rope, sparse_params = args
        if sparse_params is not None and "nabla" not in _warned:
            _warned.add("nabla")
            log.warning("TREAD: routed blocks attend densely over the kept tokens (NABLA needs the full grid)")
        if i == route.start:
            self._open = self._start(route, x, rope)
            x = gather_tokens(x, self._open.ids)
        op = self._open
        if op is None or op.route is not route:
            raise RuntimeError(f"TREAD: visual block {i} ran outside its route {route.start}..{route.end}")
        out = call(x, text_embed, time_embed, op.rope, None)
        if i == route.end:
            out = scatter_tokens(op.saved, op.ids, out)
            self._open = None
        return out

    def _start(self, route: TreadRoute, x: torch.Tensor, rope: torch.Tensor) -> _OpenRoute:
        grid = self.grid
        if grid is None or grid.batch != x.shape[0] or grid.tokens != x.shape[1]:
            raise RuntimeError(f"TREAD: visual tokens {tuple(x.shape)} do not match the RoPE grid {grid}")
        forced = self.force_keep(grid) if self.force_keep is not None else None
        ids = select(route, grid, self.generator, forced).to(x.device)
        self.kept.append(ids)
        return _OpenRoute(route, ids, x, gather_tokens(rope, ids))


def _check_block_signature(block: torch.nn.Module) -> None:
    """Fail loudly if diffusers changes what a visual block takes, instead of routing the wrong tensor."""
    names = tuple(inspect.signature(type(block).forward).parameters)[1:]  # the class's: hooks may wrap the instance's
    if names != BLOCK_PARAMS:
        raise RuntimeError(
            f"TREAD expects Kandinsky 5 visual blocks to take {BLOCK_PARAMS}, but {type(block).__name__} takes "
            f"{names}; this diffusers version is not supported by trainer_core.routing"
        )


@contextmanager
def tread_routing(
    transformer: torch.nn.Module,
    tread_config: Mapping[str, Any] | None,
    *,
    generator: torch.Generator | None = None,
    force_keep: ForceKeep | None = None,
) -> Iterator[Kandinsky5Router | None]:
    """Route tokens in every forward call of ``transformer`` made inside the block.

    A no-op (yields None) without a config, in eval mode or with grad disabled: routing is a
    training-time speed-up and must never change inference. ``generator`` picks the tokens; by
    default it is seeded from torch's global generator, which the engine seeds per step, so a
    resumed run routes exactly as the uninterrupted one. ``force_keep`` is the i2v / masked-loss
    hook (e.g. :func:`~trainer_core.routing.tread.keep_first_frame`).
    """
    if not tread_config or not (transformer.training and torch.is_grad_enabled()):
        yield None
        return
    num_blocks = len(transformer.visual_transformer_blocks)
    routes = parse_routes(tread_config, num_blocks)
    for message in route_warnings(tread_config, num_blocks):
        if message not in _warned:
            _warned.add(message)
            log.warning(message)
    router = Kandinsky5Router(transformer, routes, generator or generator_from_global_rng(), force_keep)
    with router:
        yield router
