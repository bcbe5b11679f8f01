"""Experiment trackers (TensorBoard, Weights & Biases): SimpleTuner's ``report_to``, as an event sink.

The engine knows nothing about trackers. A run's events already carry everything a tracker shows
(``progress``: loss, learning rate, gradient norm, CREPA and rollout fields; ``validation``: the
sample files; ``evaluation``: scores such as ``clip_score``), so :func:`tracked` wraps the run's
event sink in a :class:`TrackingSink` that passes every event on unchanged and also hands it to
each tracker ``report_to`` names. Whoever starts a run (the CLI, hence the ComfyUI node's child
process) wraps it; tests do the same in-process.

What a tracker writes, with SimpleTuner's metric names (``train_loss``, ``learning_rate``...):

- TensorBoard: ``<logging_dir>/<tracker_project_name>/events.out.tfevents.*`` (the folder
  accelerate's TensorBoard tracker uses for SimpleTuner), with a relative ``logging_dir`` inside
  ``output_dir``: one scalar per metric per step, every validation image (``validation/<file>``),
  and the spec as text (``spec``);
- wandb: ``wandb.init(project=tracker_project_name, name=tracker_run_name, config=<the spec>)``,
  one ``log`` per step, validation images as ``wandb.Image`` (videos as ``wandb.Video``). wandb
  reads ``WANDB_MODE`` itself: ``offline`` writes the run under ``<logging_dir>/wandb/`` (or
  ``WANDB_DIR``) for ``wandb sync`` to upload later; online needs ``wandb login`` (or
  ``WANDB_API_KEY``). wandb's console capture is off: the run's stdout carries JSON events.

A tracker never stops training. Its package missing is a configuration error raised before any
model loads (:func:`check_tracking`, from ``resolve_spec``), with the pip command. A tracker that
fails later (a full disk, a lost connection) is reported once as a ``warning`` event and switched
off; the run goes on. Trackers are closed when the run ends, also on Cancel or an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .events import EventSink
from .spec import TRACKERS, TrainSpec

logger = logging.getLogger(__name__)

# tracker -> (module to import, what pip installs); the version floors are the ones pyproject's extra names
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard>=2.15"),
    "wandb": ("wandb", "wandb>=0.17"),
}
DEFAULT_PROJECT = "comfyui-tuner"
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")

# progress fields -> the metric name trackers show (SimpleTuner's names where it has one)
PROGRESS_METRICS: dict[str, str] = {
    "loss": "train_loss",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
    "it_s": "iterations_per_second",
}
# progress fields that are no metric
_NOT_METRICS = {"step", "total", "eta_s", "type", "time"}


def installed(tracker: str) -> bool:
    return importlib.util.find_spec(PACKAGES[tracker][0]) is not None


def install_command(trackers: list[str]) -> str:
    return "pip install " + " ".join(f'"{PACKAGES[t][1]}"' for t in trackers)


def active_trackers(spec: TrainSpec) -> list[str]:
    """The trackers this run logs to: ``report_to``'s, and for ``all`` those whose package is installed."""
    wanted = spec.tracking.trackers()
    if spec.tracking.report_to == "all":
        return [t for t in wanted if installed(t)]
    return wanted


def check_tracking(spec: TrainSpec) -> None:
    """Refuse a ``report_to`` whose package is missing, naming the pip command; cheap, imports nothing."""
    wanted = spec.tracking.trackers()
    if not wanted:
        return
    if spec.tracking.report_to == "all":
        if not active_trackers(spec):
            raise ConfigError(
                "report_to 'all' logs to every installed tracker, and neither tensorboard nor wandb is installed",
                f"install them into the Python that trains ({install_command(list(TRACKERS))}), "
                "or set report_to to 'none'",
            )
        return
    missing = [t for t in wanted if not installed(t)]
    if missing:
        raise ConfigError(
            f"report_to {spec.tracking.report_to!r} needs the {' and '.join(missing)} package"
            f"{'s' if len(missing) > 1 else ''}, which {'are' if len(missing) > 1 else 'is'} not installed",
            f"install {'them' if len(missing) > 1 else 'it'} into the Python that trains ({install_command(missing)}), "
            "or set report_to to 'none'",
        )


def logging_folder(spec: TrainSpec) -> Path:
    """``logging_dir``, inside ``output_dir`` when relative (SimpleTuner joins them the same way)."""
    return Path(spec.output_dir) / Path(spec.tracking.logging_dir).expanduser()


def project_name(spec: TrainSpec) -> str:
    return (spec.tracking.tracker_project_name or "").strip() or DEFAULT_PROJECT


def run_name(spec: TrainSpec) -> str:
    """``tracker_run_name``, or the run folder's name (the node's ``<name>-<run id>``)."""
    return (spec.tracking.tracker_run_name or "").strip() or Path(spec.output_dir).absolute().name


def progress_metrics(payload: dict[str, Any]) -> dict[str, float]:
    """A ``progress`` event's numbers under the trackers' names: loss, lr, grad norm, CREPA, rollout..."""
    out: dict[str, float] = {}
    for key, value in payload.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[PROGRESS_METRICS.get(key, key)] = float(value)
    return out


def evaluation_metrics(payload: dict[str, Any]) -> dict[str, float]:
    """An ``evaluation`` event's scores (``clip_score``...), each under ``eval/``."""
    return {
        f"eval/{key}": float(value)
        for key, value in payload.items()
        if key not in _NOT_METRICS
        and not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
    }


def _image_tag(path: Path) -> str:
    return f"validation/{path.stem}"


# ----------------------------------------------------------------------------- trackers
class Tracker:
    """One tracker. Any method may raise: :class:`TrackingSink` then switches it off with a warning."""

    name = "tracker"

    def start(self, spec: TrainSpec, run: dict[str, Any]) -> None: ...

    def resumed(self, step: int) -> None: ...

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def media(self, step: int, files: list[Path]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    """``torch.utils.tensorboard.SummaryWriter`` in ``<logging_dir>/<project>``."""

    name = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None
        self.folder: Path | None = None

    def start(self, spec: TrainSpec, run: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = logging_folder(spec) / project_name(spec)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.folder))
        text = json.dumps({"run": run, "spec": spec.model_dump(mode="json")}, indent=2, default=str)
        self.writer.add_text("spec", "```\n" + text + "\n```", 0)  # markdown: keep the JSON's layout

    def resumed(self, step: int) -> None:
        """Continue after a checkpoint: steps after it that an interrupted run logged are dropped."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(str(self.folder), purge_step=step + 1)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def media(self, step: int, files: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for path in files:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                continue  # SummaryWriter.add_video needs moviepy; the file is in output_dir/validation
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(_image_tag(path), pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker(Tracker):
    """A wandb run; ``WANDB_MODE`` (online, offline, disabled) is wandb's own setting."""

    name = "wandb"

    def __init__(self) -> None:
        self.run: Any = None

    def start(self, spec: TrainSpec, run: dict[str, Any]) -> None:
        import wandb

        folder = None
        if not os.environ.get("WANDB_DIR"):
            folder = logging_folder(spec)
            folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project_name(spec),
                name=run_name(spec),
                dir=str(folder) if folder is not None else None,
                config={**spec.model_dump(mode="json"), "run": run},
                # console off: the run's stdout carries JSON events; git and code: the cwd is ComfyUI's, not the run's
                settings=wandb.Settings(console="off", silent=True, disable_git=True, disable_code=True),
            )
        except Exception as e:
            hint = ""
            if "api_key" in str(e).lower() or "login" in str(e).lower():
                hint = " (run `wandb login`, or set WANDB_MODE=offline to write the run for `wandb sync`)"
            raise RuntimeError(f"{e}{hint}") from e

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def media(self, step: int, files: list[Path]) -> None:
        import wandb

        logged = {}
        for path in files:
            kind = wandb.Video if path.suffix.lower() in VIDEO_SUFFIXES else wandb.Image
            logged[_image_tag(path)] = kind(str(path), caption=path.stem)
        if logged:
            self.run.log(logged, step=step)

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()


TRACKER_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


# ----------------------------------------------------------------------------- the sink
class TrackingSink:
    """Passes every event on to ``inner``, and the run's numbers and samples to each tracker.

    Trackers start on the ``started`` event: the spec has been checked and the data scanned by
    then, and no model has loaded yet, so a run that fails its checks leaves no empty tracker run.
    """

    def __init__(self, spec: TrainSpec, inner: EventSink, trackers: list[Tracker]) -> None:
        self.spec = spec
        self.inner = inner
        self.trackers = list(trackers)
        self.started = False
        self._lock = threading.Lock()

    def emit(self, type: str, **payload: Any) -> None:
        self.inner.emit(type, **payload)
        if not self.trackers:
            return
        with self._lock:
            if type == "started":
                run = {k: v for k, v in payload.items() if k != "buckets"}
                self._each("start", lambda t: t.start(self.spec, run))
                self.started = True
            elif not self.started:
                return
            elif type == "resumed":
                self._each("continue", lambda t: t.resumed(int(payload["step"])))
            elif type == "progress":
                values = progress_metrics(payload)
                self._each("log", lambda t: t.metrics(int(payload["step"]), values))
            elif type == "evaluation":
                values = evaluation_metrics(payload)
                if values:
                    self._each("log", lambda t: t.metrics(int(payload["step"]), values))
            elif type == "validation":
                files = [Path(f) for f in payload.get("files") or []]
                if files:
                    self._each("log", lambda t: t.media(int(payload["step"]), files))

    def _each(self, doing: str, call: Any) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:  # a tracker must never stop the training
                self.trackers.remove(tracker)
                self.inner.emit(
                    "warning",
                    message=f"{tracker.name} could not {doing} ({type(e).__name__}: {e}); "
                    f"it is switched off and the training goes on without it",
                )
                with contextlib.suppress(Exception):
                    tracker.close()

    def close(self) -> None:
        with self._lock:
            trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as e:
                self.inner.emit("warning", message=f"{tracker.name} could not close ({type(e).__name__}: {e})")


@contextlib.contextmanager
def tracked(spec: TrainSpec, events: EventSink) -> Iterator[EventSink]:
    """``events`` with the trackers of ``spec.tracking`` attached; they are closed on leaving, whatever happens.

    With ``report_to`` none it yields ``events`` itself. A missing package raises ConfigError here,
    before the run starts.
    """
    check_tracking(spec)
    names = active_trackers(spec)
    if not names:
        yield events
        return
    sink = TrackingSink(spec, events, [TRACKER_CLASSES[n]() for n in names])
    try:
        yield sink
    finally:
        sink.close()
