"""TREAD Route: one route of TREAD token routing; chain several to build ``routing.tread_config``.

Each node adds one route to the routes it receives, in SimpleTuner's terms: ``selection_ratio`` is
the fraction of visual tokens that *skip* blocks ``start_layer_idx`` .. ``end_layer_idx`` (both
inclusive, negative counting from the last block). The chain's output is the whole ``routing``
section, ``{"tread_config": {"routes": [...]}}``, which Train LoRA merges over an imported config.

The routes are checked here with the engine's rules for a model that supports TREAD (a ratio in
(0, 1), integer indices, start before end, no overlapping routes), and the engine's advice (ratios
above 0.35, routes through the first or last blocks) is shown on the node. Whether the model has
TREAD at all (Lumina 2 does not) and whether the indices fit its block count is decided on Train
LoRA, which sees the model: it fails there with the engine's message before any child starts.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainer_core.errors import ConfigError
from ..trainer_core.spec import build_spec
from .run_spec import checked
from .sockets import CATEGORY_SETTINGS, TunerTread

MAX_INDEX = 256  # above any published model's block count; the exact bound is checked with the model


def routes_of(tread: dict | None) -> list[dict]:
    """The routes a TREAD socket carries (none when unconnected)."""
    config = ((tread or {}).get("routing") or {}).get("tread_config") or {}
    return [dict(route) for route in config.get("routes") or []]


def check_routes(config: dict) -> list[str]:
    """The engine's checks of ``tread_config`` for a model with TREAD; returns its advice (warnings)."""
    from ..trainer_core.families import family_names, get_family_class
    from ..trainer_core.routing.tread import check_tread

    families = [get_family_class(name) for name in family_names()]
    tread_families = [family for family in families if getattr(family, "supports_tread", False)]
    if not tread_families:
        raise ConfigError("no model family of this trainer supports TREAD token routing", "remove TREAD Route")
    spec = build_spec({"routing": {"tread_config": config}}, source="TREAD routes")
    return check_tread(spec, tread_families[0])


class TunerTreadRoute(io.ComfyNode):
    """TREAD Route: a share of the tokens skips a run of transformer blocks while training (chainable)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerTreadRoute",
            display_name="TREAD Route",
            category=CATEGORY_SETTINGS,
            description="Faster training steps: a random share of the image or video tokens skips a run of middle "
            "transformer blocks (TREAD). Chain several for several routes. Kandinsky 5 only.",
            inputs=[
                io.Float.Input(
                    "selection_ratio",
                    default=0.25,
                    min=0.01,
                    max=0.99,
                    step=0.01,
                    tooltip="Fraction of the tokens that SKIP the route (SimpleTuner's meaning). More is faster; "
                    "above 0.35 convergence suffers (0.1-0.25 is conservative).",
                ),
                io.Int.Input(
                    "start_layer_idx",
                    default=2,
                    min=-MAX_INDEX,
                    max=MAX_INDEX,
                    tooltip="First transformer block of the route (visual blocks only, counted from 0; negative "
                    "counts from the end). 2 or later is recommended.",
                ),
                io.Int.Input(
                    "end_layer_idx",
                    default=-2,
                    min=-MAX_INDEX,
                    max=MAX_INDEX,
                    tooltip="Last transformer block of the route, included (negative counts from the end: -1 is "
                    "the last block). -2 or earlier is recommended.",
                ),
                TunerTread.Input(
                    "routes",
                    optional=True,
                    tooltip="Routes so far (another TREAD Route): this one is added to them. Routes must not share "
                    "a block.",
                ),
            ],
            outputs=[TunerTread.Output("routes", tooltip="All routes so far; connect to Train LoRA's tread input.")],
        )

    @classmethod
    def execute(
        cls, selection_ratio: float, start_layer_idx: int, end_layer_idx: int, routes: dict | None = None
    ) -> io.NodeOutput:
        route = {
            "selection_ratio": round(float(selection_ratio), 6),
            "start_layer_idx": int(start_layer_idx),
            "end_layer_idx": int(end_layer_idx),
        }
        config = {"routes": [*routes_of(routes), route]}
        section = checked("routing", {"tread_config": config})
        warnings = check_routes(config)
        lines = [
            f"route {i + 1}: {r['selection_ratio']:g} of the tokens skip blocks {r['start_layer_idx']}.."
            f"{r['end_layer_idx']}"
            for i, r in enumerate(config["routes"])
        ]
        text = "\n".join(lines + [f"warning: {w}" for w in warnings])
        return io.NodeOutput({"routing": section}, ui=ui.PreviewText(text))


NODES = [TunerTreadRoute]
