"""TREAD token routing: the ``tread_config`` routes and the random choice of the tokens they keep.

TREAD (SimpleTuner's ``tread_config``) lets a random subset of the visual tokens skip a run of
transformer blocks while training: at block ``start`` only the kept tokens go on, and after block
``end`` the dropped tokens rejoin unchanged (their pre-route values), so a step costs fewer
token-blocks and gradients reach the routed blocks through the kept tokens only. Meanings follow
SimpleTuner so that imported configs behave the same:

- ``selection_ratio`` is the fraction of tokens **dropped**, in (0, 1);
- ``start_layer_idx`` / ``end_layer_idx`` index the visual blocks only (text blocks are a separate
  stream), both inclusive, negative counting from the end;
- several routes may be chained as long as they do not overlap.

This module holds what does not depend on a model: parsing and checking the routes
(:func:`parse_routes`, :func:`check_tread`, called before any model loads) and the token choice
(:func:`select_kept_tokens`). How the tokens of one architecture are gathered and put back lives
next to it (``kandinsky5.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..families.base import ModelFamily
    from ..spec import TrainSpec

ROUTE_KEYS = ("selection_ratio", "start_layer_idx", "end_layer_idx")
MAX_RECOMMENDED_RATIO = 0.35  # SimpleTuner's TREAD doc: above this convergence suffers
_EXAMPLE = '{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}'


@dataclass(frozen=True)
class TreadRoute:
    """One route. ``start`` / ``end`` are resolved (non-negative) once the block count is known."""

    selection_ratio: float
    start: int
    end: int

    def keep_count(self, tokens: int) -> int:
        """Tokens kept out of ``tokens``: ``tokens - round(tokens * ratio)`` as SimpleTuner, at least one."""
        return max(1, tokens - round(tokens * self.selection_ratio))


@dataclass(frozen=True)
class TokenGrid:
    """The visual token layout of one forward call: ``frames`` latent frames of ``per_frame`` tokens.

    Tokens are frame-major in the transformer's flattened sequence (true for Kandinsky 5 both in
    row-major and in NABLA's tiled order), so frame ``f`` is ``[f * per_frame, (f + 1) * per_frame)``.
    """

    batch: int
    frames: int
    per_frame: int

    @property
    def tokens(self) -> int:
        return self.frames * self.per_frame


ForceKeep = Callable[[TokenGrid], "torch.Tensor | None"]
"""Returns a (batch, tokens) bool mask of tokens every route must keep (or None), in sequence order."""


# ---------------------------------------------------------------------- config
def _fail(message: str) -> ConfigError:
    return ConfigError(f"tread_config: {message}", f"expected e.g. {_EXAMPLE}")


def _overlap(s1: int, e1: int, s2: int, e2: int) -> ConfigError:
    return _fail(f"routes overlap: blocks {s1}..{e1} and {s2}..{e2}; chained routes must not share a block")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _raw_routes(config: Mapping[str, Any]) -> list[tuple[float, int, int]]:
    """Type- and range-check each route on its own: (ratio, start, end) as written."""
    if not isinstance(config, Mapping):
        raise _fail(f"must be a mapping with a 'routes' list, got {type(config).__name__}")
    extra = sorted(set(config) - {"routes"})
    if extra:
        raise _fail(f"unknown key(s) {', '.join(map(repr, extra))}; only 'routes' is read")
    routes = config.get("routes")
    if not isinstance(routes, list) or not routes:
        raise _fail("'routes' must be a non-empty list of routes")
    out = []
    for i, route in enumerate(routes):
        where = f"routes[{i}]"
        if not isinstance(route, Mapping):
            raise _fail(f"{where} must be a mapping, got {type(route).__name__}")
        unknown = sorted(set(route) - set(ROUTE_KEYS))
        missing = [k for k in ROUTE_KEYS if k not in route]
        if unknown or missing:
            parts = ([f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else []) + (
                [f"missing {', '.join(map(repr, missing))}"] if missing else []
            )
            raise _fail(f"{where}: {'; '.join(parts)}")
        ratio = route["selection_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < float(ratio) < 1.0:
            raise _fail(f"{where}.selection_ratio must be a number in (0, 1) (the fraction dropped), got {ratio!r}")
        start, end = route["start_layer_idx"], route["end_layer_idx"]
        for key, v in (("start_layer_idx", start), ("end_layer_idx", end)):
            if not _is_int(v):
                raise _fail(f"{where}.{key} must be an integer block index, got {v!r}")
        if (start >= 0) == (end >= 0) and start > end:
            raise _fail(f"{where}: start_layer_idx {start} is after end_layer_idx {end}")
        out.append((float(ratio), start, end))
    return out


def parse_routes(config: Mapping[str, Any], num_blocks: int) -> list[TreadRoute]:
    """Validate ``config`` against a model with ``num_blocks`` visual blocks; routes sorted by start.

    Raises ConfigError naming ``tread_config`` for: a ratio outside (0, 1), an index outside the
    model, start after end (after resolving negative indices), and overlapping routes.
    """
    routes = []
    for i, (ratio, start, end) in enumerate(_raw_routes(config)):
        resolved = []
        for key, v in (("start_layer_idx", start), ("end_layer_idx", end)):
            r = v + num_blocks if v < 0 else v
            if not 0 <= r < num_blocks:
                raise _fail(
                    f"routes[{i}].{key} {v} is outside the model's {num_blocks} visual blocks "
                    f"(use 0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)"
                )
            resolved.append(r)
        if resolved[0] > resolved[1]:
            raise _fail(
                f"routes[{i}]: start_layer_idx {start} (block {resolved[0]}) is after "
                f"end_layer_idx {end} (block {resolved[1]}) in a model with {num_blocks} visual blocks"
            )
        routes.append(TreadRoute(ratio, resolved[0], resolved[1]))
    routes.sort(key=lambda r: r.start)
    for a, b in zip(routes, routes[1:]):
        if b.start <= a.end:
            raise _overlap(a.start, a.end, b.start, b.end)
    return routes


def route_warnings(config: Mapping[str, Any], num_blocks: int | None = None) -> list[str]:
    """Advice, not errors: ratios above 0.35, or routes that start before block 2 or end in the last block.

    The first and last blocks turn latents into features and back; routing through them costs
    quality for little speed. Without ``num_blocks`` only what the raw indices show is judged.
    """
    out = []
    for i, (ratio, start, end) in enumerate(_raw_routes(config)):
        if ratio > MAX_RECOMMENDED_RATIO:
            out.append(
                f"tread_config routes[{i}]: selection_ratio {ratio:g} drops more than {MAX_RECOMMENDED_RATIO:g} of "
                "the tokens; SimpleTuner's TREAD guide finds convergence suffers above that (0.1-0.25 is conservative)"
            )
        first = start + num_blocks if start < 0 and num_blocks else start  # stays negative when unknown
        last = end + num_blocks if end < 0 and num_blocks else end
        if 0 <= first < 2:
            out.append(
                f"tread_config routes[{i}]: start_layer_idx {start} routes through the first two blocks; "
                "2 or later is recommended"
            )
        if end == -1 or (num_blocks and last >= num_blocks - 1):
            out.append(
                f"tread_config routes[{i}]: end_layer_idx {end} routes through the last block; "
                "-2 or earlier is recommended"
            )
    return out


def check_tread(spec: TrainSpec, family_cls: type[ModelFamily]) -> list[str]:
    """Check ``routing.tread_config`` before any model loads; return warnings.

    Refuses families without TREAD (Lumina 2: SimpleTuner has no TREAD for it either) and malformed
    routes. Index ranges and overlaps that need the block count are checked again, exactly, when
    the transformer is known (the first training step).
    """
    config = spec.routing.tread_config
    if not config:
        return []
    if not getattr(family_cls, "supports_tread", False):
        raise ConfigError(
            f"tread_config: TREAD token routing is not available for {family_cls.name}",
            "remove routing.tread_config, or train kandinsky5-image / kandinsky5-video, which support it",
        )
    raw = _raw_routes(config)
    ordered = sorted((s, e) for _, s, e in raw if s >= 0 and e >= 0)
    for (s1, e1), (s2, e2) in zip(ordered, ordered[1:]):
        if s2 <= e1:
            raise _overlap(s1, e1, s2, e2)
    return route_warnings(config)


# ---------------------------------------------------------------------- token choice
def select_kept_tokens(
    route: TreadRoute,
    grid: TokenGrid,
    generator: torch.Generator,
    force_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted indices (batch, kept) of the tokens that go through ``route``; the rest skip it.

    Every latent frame keeps the same share (so no frame of a clip is starved), and the choice is
    uniform at random (SimpleTuner's K5 default, ``l1_reg`` 0) from ``generator``, which the caller
    seeds so that a resumed run draws the same tokens. ``force_keep`` (batch, tokens) marks tokens
    that are always kept (e.g. the clean first frame in i2v); a frame with more forced tokens than
    its share keeps them all, the same count in every sample so the batch stays rectangular.
    Indices are sorted so that kept tokens keep their relative order.
    """
    b, f, t = grid.batch, grid.frames, grid.per_frame
    device = generator.device
    scores = torch.rand((b, f, t), generator=generator, device=device)
    keep = torch.full((f,), route.keep_count(t), dtype=torch.long, device=device)
    if force_keep is not None:
        if tuple(force_keep.shape) != (b, f * t):
            raise ValueError(f"force_keep must be (batch, tokens) = {(b, f * t)}, got {tuple(force_keep.shape)}")
        forced = force_keep.detach().to(device, torch.bool).view(b, f, t)
        scores = scores.masked_fill(forced, -1.0)  # below every uniform draw: chosen first
        keep = torch.maximum(keep, forced.sum(-1).amax(0))
    order = scores.argsort(dim=-1)
    offsets = torch.arange(f, device=device) * t
    if bool((keep == keep[0]).all()):
        kept = order[..., : int(keep[0])].sort(dim=-1).values + offsets.view(1, f, 1)
        return kept.reshape(b, -1)
    parts = [order[:, i, : int(k)].sort(dim=-1).values + offsets[i] for i, k in enumerate(keep.tolist())]
    return torch.cat(parts, dim=1)


def keep_first_frame(grid: TokenGrid) -> torch.Tensor:
    """A :data:`ForceKeep` for i2v: every token of latent frame 0 (the clean conditioning frame) is kept."""
    mask = torch.zeros(grid.batch, grid.tokens, dtype=torch.bool)
    mask[:, : grid.per_frame] = True
    return mask


def generator_from_global_rng() -> torch.Generator:
    """A CPU generator seeded by one draw from torch's global generator.

    The engine seeds the global generator from (seed, step, micro-batch) before every micro-batch,
    so the routes' token choice is a function of the step: a resumed run draws the same tokens.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)
