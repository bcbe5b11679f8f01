"""The child's events, shown in ComfyUI: progress bar, preview, text under the node, websocket messages.

Event types are the engine's (``trainer_core/events.py``). What each one becomes:

- ``progress`` -> ComfyUI's progress bar (value/max, so the bar shows the ETA) and a
  ``comfyui-tuner.progress`` message that the web extension adds to the node's live loss chart
  (with CREPA's term and alignment score, and scheduled sampling's rollout passes, when the run has them);
- ``validation`` -> a ``comfyui-tuner.validation`` message: the extension shows the newest samples
  in the node's bounded live area;
- ``evaluation`` (``evaluation_type: clip``) -> a ``comfyui-tuner.evaluation`` message {step,
  clip_score, scores}: the extension draws the CLIP score as a second series on the loss chart;
- ``cache``/``resumed``/``checkpoint``/``warning`` -> a ``comfyui-tuner.status`` message, the one
  status line in that area;
- ``done``/``cancelled``/``error`` are kept for the caller, which decides the node's outcome.

Deliberately not used: ComfyUI's progress-bar preview image and ``send_progress_text``. The
frontend draws the preview up to 512 px under the node and the text as a widget of its own, both
outside the extension's area: the node grew over the nodes below it while it trained, and the
status showed twice (ComfyUI's copy stayed stale after the run on frontend 1.35.9). Issue 14,
items 16 and 17.

Every progress-bar update runs ComfyUI's hook, which raises InterruptProcessingException when
Cancel was pressed: the caller catches it, stops the child cleanly and re-raises.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import comfy_bridge as bridge

log = logging.getLogger(__name__)

# progress fields that only some runs have, passed on to the live chart as they are
CREPA_KEYS = ("crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_weight")  # CREPA on
ROLLOUT_KEYS = ("rollout_passes", "rollout_passes_total")  # scheduled sampling on


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class TrainMonitor:
    """State of one run as seen through its events, and their display in ComfyUI."""

    def __init__(self, node_id: str | None, total: int) -> None:
        self.node_id = node_id
        self.total = max(1, int(total))
        self.step = 0
        self.bar = bridge.progress_bar(self.total, node_id)
        self.history: list[list[float]] = []
        self.validation_files: list[str] = []
        self.evaluations: list[dict[str, Any]] = []  # {step, clip_score, scores}: evaluation runs only
        self.checkpoint: str | None = None
        self.warnings: list[str] = []
        self.done: dict[str, Any] | None = None
        self.cancelled: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    # ------------------------------------------------------------------ messages
    def send(self, event: str, **data: Any) -> None:
        bridge.send(event, {"node": self.node_id, **data})

    def status(self, text: str) -> None:
        """The node's status line, drawn by the extension only (see the module docstring)."""
        self.send("status", text=text)

    def announce(
        self, run_dir: Path, history: list[list[float]], mode: str, evaluations: list[dict[str, Any]] | None = None
    ) -> None:
        """Tell the browser a run starts, with the loss history (and CLIP scores) already on disk (resumed runs)."""
        self.history = [list(h) for h in history]
        self.evaluations = [dict(e) for e in evaluations or []]
        # a copy: the server serialises messages later, on its own thread, while history grows
        self.send(
            "started",
            total=self.total,
            output_dir=str(run_dir),
            history=[list(h) for h in history],
            mode=mode,
            **({"evaluations": [dict(e) for e in self.evaluations]} if self.evaluations else {}),
        )
        self.status("starting the trainer (ComfyUI's models were unloaded)")

    # ------------------------------------------------------------------ events
    def handle(self, event: dict[str, Any]) -> None:
        """Record ``event`` and show it. May raise ComfyUI's interruption (Cancel)."""
        self.record(event)
        kind = event["type"]
        show = getattr(self, f"_show_{kind}", None)
        if show is not None:
            show(event)

    def record(self, event: dict[str, Any]) -> None:
        """Only remember what ``event`` says (used after Cancel, when nothing may raise)."""
        kind = event["type"]
        if kind == "started":
            self.total = max(1, int(event.get("total_steps") or self.total))
        elif kind == "resumed":
            self.step = int(event["step"])
        elif kind == "progress":
            self.step = int(event["step"])
            self.total = max(1, int(event.get("total") or self.total))
            self.history.append([self.step, float(event["loss"])])
        elif kind == "validation":
            self.validation_files = list(event.get("files") or [])
        elif kind == "evaluation":
            self.evaluations.append({k: event.get(k) for k in ("step", "clip_score", "scores")})
        elif kind == "checkpoint":
            self.checkpoint = event.get("path")
        elif kind == "warning":
            self.warnings.append(str(event.get("message")))
            log.warning("comfyui-tuner: %s", event.get("message"))
        elif kind == "done":
            self.done = event
        elif kind == "cancelled":
            self.cancelled = event
        elif kind == "error":
            self.error = event

    def _show_started(self, e: dict[str, Any]) -> None:
        self.bar.update_absolute(self.step, self.total)
        buckets = ", ".join(e.get("buckets") or {})
        self.status(f"{e.get('samples')} images ({buckets}) on {e.get('device')}; {self.total} steps")

    def _show_cache(self, e: dict[str, Any]) -> None:
        self.status(f"caching {e.get('stage')}: {e.get('done')}/{e.get('total')}")

    def _show_resumed(self, e: dict[str, Any]) -> None:
        self.bar.update_absolute(self.step, self.total)
        self.status(f"resumed from step {self.step} ({Path(str(e.get('checkpoint'))).name})")

    def _show_progress(self, e: dict[str, Any]) -> None:
        self.bar.update_absolute(self.step, self.total)
        data = {k: e.get(k) for k in ("step", "total", "loss", "lr", "it_s", "eta_s", "epoch")}
        extra = {k: e[k] for k in CREPA_KEYS + ROLLOUT_KEYS if k in e}  # CREPA / scheduled sampling on
        self.send("progress", **data, **extra)
        self.status(
            f"step {self.step}/{self.total} · loss {float(e['loss']):.4f} · {float(e.get('it_s') or 0):.2f} it/s"
            f" · eta {_clock(e.get('eta_s'))}"
            + (
                f" · crepa {float(e['crepa_loss']):.4f} · align {float(e.get('crepa_alignment_score', 'nan')):.3f}"
                if "crepa_loss" in e
                else ""
            )
            + (f" · rollout passes {e['rollout_passes_total']}" if "rollout_passes_total" in e else "")
        )

    def _show_validation(self, e: dict[str, Any]) -> None:
        files = [Path(f) for f in self.validation_files if Path(f).suffix == ".png"]  # not the video .mp4s
        if not files:
            return
        self.send("validation", step=e.get("step"), images=[bridge.view_ref(f) for f in files])

    def _show_evaluation(self, e: dict[str, Any]) -> None:
        self.send("evaluation", step=e.get("step"), clip_score=e.get("clip_score"), scores=e.get("scores") or {})
        self.status(f"CLIP score {float(e['clip_score']):.2f} at step {e.get('step')}")

    def _show_checkpoint(self, e: dict[str, Any]) -> None:
        self.status(f"checkpoint saved at step {e.get('step')}")

    def _show_published(self, e: dict[str, Any]) -> None:  # push_to_hub: an upload went through
        self.status(f"uploaded the {e.get('what')} to {e.get('url')}")

    def _show_warning(self, e: dict[str, Any]) -> None:
        self.send("warning", message=e.get("message"))
