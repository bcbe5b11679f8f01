"""Events a run emits: the one channel from the engine to whoever is watching.

Types (DESIGN.md): ``started``, ``cache`` {stage, done, total}, ``progress`` {step, total, loss,
lr, it_s, eta_s; grad_norm when clipping by norm; with CREPA also crepa_loss, crepa_alignment_score,
crepa_similarity_self, crepa_weight; with scheduled sampling also rollout_passes, rollout_passes_total},
``validation`` {step, files}, ``evaluation`` {step, clip_score, scores} (``evaluation_type: clip``),
``checkpoint`` {step, path}, ``warning`` {message}, ``error`` {message, hint}, ``cancelled`` {step,
checkpoint}, ``resumed`` {step, checkpoint}, ``memory`` {device, dtype, parameter counts, bytes},
``step_skipped`` {step, reason, loss_scale, next_loss_scale} (fp16: an update skipped on inf/NaN
gradients), ``cached`` {text, latents} (the ``cache`` command), ``done`` {lora paths, loss plot,
validation files, loss history; evaluations when scored}, ``published`` {what, repo_id, url, files}
(``push_to_hub``: an upload went through; sent by trainer_core/publish, not the engine).
The worker writes them as JSON lines; the ComfyUI node turns them into its progress bar,
previews and websocket messages; tests collect them in a list.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol


class EventSink(Protocol):
    def emit(self, type: str, **payload: Any) -> None: ...


class ListSink:
    """Keeps every event; for tests and in-process callers."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, type: str, **payload: Any) -> None:
        self.events.append({"type": type, **payload})

    def of(self, type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type]


class JsonLinesSink:
    """One JSON object per line, flushed at once so a parent process sees it live.

    If the reader is gone (the parent died: a broken pipe), later events are dropped instead of
    raising, so the run can still stop cleanly with a checkpoint (``--watch-stdin`` stops it).
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self.broken = False

    def emit(self, type: str, **payload: Any) -> None:
        line = json.dumps({"type": type, "time": round(time.time(), 3), **payload}, default=str)
        with self._lock:
            if self.broken:
                return
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ConnectionResetError, ValueError):  # ValueError: the stream was closed
                self.broken = True


class TerminalSink:
    """A human-readable progress line on a terminal (stderr), plus notable events.

    With ``warnings_only`` it prints the warnings alone (the CLI's ``--quiet``): a warning is
    something to act on, and it has no other way to a person who reads the terminal.
    """

    def __init__(self, stream: IO[str] | None = None, warnings_only: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.warnings_only = warnings_only
        self.broken = False
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def _line(self, text: str, transient: bool = False) -> None:
        if self.broken:
            return
        try:
            if self._tty:
                self.stream.write("\r\033[K" + text + ("" if transient else "\n"))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ConnectionResetError, ValueError):  # the reader is gone (as JsonLinesSink)
            self.broken = True

    def emit(self, type: str, **p: Any) -> None:
        if self.warnings_only and type != "warning":
            return
        if type == "progress":
            total = p.get("total") or 0
            done = p.get("step", 0)
            width = 30
            filled = int(width * done / total) if total else 0
            bar = "#" * filled + "-" * (width - filled)
            eta = p.get("eta_s")
            eta_s = f" eta {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else ""
            text = f"[{bar}] {done}/{total} loss {p.get('loss', float('nan')):.4f} lr {p.get('lr', 0):.2e}"
            if "crepa_loss" in p:  # CREPA runs only: its term and the alignment score
                text += f" crepa {p['crepa_loss']:.4f} align {p.get('crepa_alignment_score', float('nan')):.3f}"
            text += f" {p.get('it_s', 0):.2f} it/s{eta_s}"
            if "rollout_passes_total" in p:  # scheduled sampling on: its extra forward passes so far
                text += f" rollout {p['rollout_passes_total']}"
            # on a pipe, print every 10th step only
            if self._tty or done == total or done % 10 == 0:
                self._line(text, transient=done != total)
        elif type == "cache":
            if p.get("done") == p.get("total"):
                self._line(f"cache {p.get('stage')}: {p.get('total')} entries ready")
        elif type in ("warning", "error"):
            hint = f"\n  how to fix: {p['hint']}" if p.get("hint") else ""
            self._line(f"{type}: {p.get('message')}{hint}")
        elif type == "step_skipped":
            self._line(
                f"step {p.get('step')} skipped: {p.get('reason')} (loss scale {p.get('loss_scale')} -> "
                f"{p.get('next_loss_scale')})"
            )
        elif type == "evaluation":  # evaluation_type clip: the mean and each prompt's CLIP score
            scores = ", ".join(f"{k} {v:.2f}" for k, v in (p.get("scores") or {}).items())
            self._line(f"evaluation: step {p.get('step')} CLIP score {p.get('clip_score', 0):.2f} ({scores})")
        elif type in ("started", "validation", "checkpoint", "done", "cancelled", "memory", "cached", "resumed"):
            hidden = ("spec", "loss_history", "validation_files", "evaluations")
            shown = {k: v for k, v in p.items() if k not in hidden}
            self._line(f"{type}: {json.dumps(shown, default=str)}")


class FanOut:
    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def emit(self, type: str, **payload: Any) -> None:
        for s in self.sinks:
            s.emit(type, **payload)


class WarnOnce:
    """Passes every event on, except a warning whose message was already passed on.

    Several layers may report the same finding (the dataset scan logs what it skipped, the engine
    reports the scan's warnings); a person, and the node's warning list, should see it once.
    """

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def emit(self, type: str, **payload: Any) -> None:
        if type == "warning":
            message = str(payload.get("message"))
            with self._lock:
                if message in self._seen:
                    return
                self._seen.add(message)
        self.sink.emit(type, **payload)


class LogWarningsAsEvents(logging.Handler):
    """Hands this project's log warnings to the event sinks, as ``warning`` events.

    Installed by the CLI on the ``trainer_core`` logger (which then stops propagating to the root
    handler): a warning logged deep in a module reaches the terminal and the ComfyUI node the same
    way as one the engine emits, in one format and once (with :class:`WarnOnce`).
    """

    def __init__(self, sink: EventSink) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        # Never raise into the code that logged: a warning must not stop, say, the stdin watcher
        # from cancelling the run because the terminal it would be printed on is gone.
        try:
            self.sink.emit("warning", message=record.getMessage())
        except Exception:
            self.handleError(record)


class CallbackSink:
    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def emit(self, type: str, **payload: Any) -> None:
        self.fn({"type": type, **payload})
