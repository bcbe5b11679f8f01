"""Command line: ``python -m trainer_core {train,run,demo,import-config,export-config}``.

``train`` takes SimpleTuner files, ``run`` takes a TrainSpec JSON (what the ComfyUI nodes
write), ``demo`` trains a tiny model offline. With ``--events jsonl`` every event is printed to
stdout as one JSON line (the ComfyUI node reads these); a progress bar goes to stderr.
SIGTERM or Ctrl-C stops at the next step with a checkpoint (exit code 130); a second Ctrl-C
aborts at once. With ``--watch-stdin`` the end of stdin does the same: the worker that started us
holds our stdin open, so end of file means it is gone, and an orphaned run must not keep the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import CancelledError, TunerError
from .events import EventSink, FanOut, JsonLinesSink, LogWarningsAsEvents, TerminalSink, WarnOnce

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer_core", description="LoRA training for Kandinsky 5 and Lumina 2")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--events", choices=["jsonl", "none"], default="none", help="machine-readable events on stdout")
        sp.add_argument("--quiet", action="store_true", help="on stderr, warnings only (no progress bar)")
        sp.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
        sp.add_argument(
            "--watch-stdin",
            action="store_true",
            help="stop as on SIGTERM (checkpoint, exit 130) when stdin closes, i.e. when the parent process is gone",
        )

    t = sub.add_parser("train", help="train from a SimpleTuner config.json (+ multidatabackend.json)")
    t.add_argument("--config", required=True, type=Path)
    t.add_argument("--backend", type=Path, default=None, help="multidatabackend.json (default: data_backend_config)")
    t.add_argument("--output-dir", default=None, help="override output_dir")
    common(t)

    r = sub.add_parser("run", help="train from a TrainSpec JSON file")
    r.add_argument("spec", type=Path)
    common(r)

    c = sub.add_parser("cache", help="fill the text-embedding and latent caches of a TrainSpec, then stop")
    c.add_argument("spec", type=Path)
    common(c)

    d = sub.add_parser("demo", help="build a tiny Lumina 2 model and dataset, train a LoRA offline")
    d.add_argument("--output", type=Path, default=Path("tuner-demo"))
    d.add_argument("--steps", type=int, default=40)
    common(d)

    i = sub.add_parser("import-config", help="convert SimpleTuner config files into a TrainSpec JSON")
    i.add_argument("--config", required=True, type=Path)
    i.add_argument("--backend", type=Path, default=None)
    i.add_argument("--out", required=True, type=Path)

    e = sub.add_parser("export-config", help="write a TrainSpec as SimpleTuner config.json + multidatabackend.json")
    e.add_argument("spec", type=Path)
    e.add_argument("--out", required=True, type=Path)
    return p


def _sinks(args: argparse.Namespace) -> EventSink:
    """Events as JSON lines on stdout (``--events jsonl``) and as text on stderr.

    The terminal sink is the one place a person reads a run's warnings: each is an event, printed
    once (:class:`WarnOnce`), never also as a log line. ``--quiet`` drops the progress bar and the
    status lines but keeps the warnings.
    """
    sinks: list[EventSink] = []
    if args.events == "jsonl":
        sinks.append(JsonLinesSink(sys.stdout))
    sinks.append(TerminalSink(sys.stderr, warnings_only=args.quiet))
    return WarnOnce(FanOut(*sinks))


@contextlib.contextmanager
def _project_log_to_events(events: EventSink) -> Iterator[None]:
    """Route the ``trainer_core`` loggers' warnings into the events, instead of a second log line.

    Undone on exit, so that calling :func:`main` in-process (tests do) leaves logging as it was.
    """
    project = logging.getLogger(__name__.split(".")[0])
    handler = LogWarningsAsEvents(events)
    propagate = project.propagate
    project.addHandler(handler)
    project.propagate = False
    try:
        yield
    finally:
        project.removeHandler(handler)
        project.propagate = propagate


def _install_cancel_handlers(cancel: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        if cancel.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        cancel.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGBREAK"):  # Windows: the parent stops us with CTRL_BREAK_EVENT
        signal.signal(signal.SIGBREAK, handler)


def watch_stdin(cancel: threading.Event, fd: int | None = None) -> threading.Thread | None:
    """Set ``cancel`` when ``fd`` (stdin) reaches end of file, from a daemon thread.

    Nothing is ever written to the pipe; the only thing read from it is its end, which comes when
    every writer has closed it, i.e. when the parent process has exited or died. Returns None when
    there is no stdin to watch.
    """
    if fd is None:
        if sys.stdin is None:
            return None
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError):
            return None

    def watch() -> None:
        try:
            while os.read(fd, 65536):
                pass  # a parent that writes something is still a parent; only end of file counts
        except OSError:
            pass  # an unreadable stdin is as good as a closed one
        first = not cancel.is_set()
        cancel.set()  # before the warning: reporting it must never keep an orphan running
        if first:
            log.warning("stdin closed: the parent process is gone; stopping with a checkpoint")

    thread = threading.Thread(target=watch, daemon=True, name="tuner-stdin-watch")
    thread.start()
    return thread


def _cancel_event(args: argparse.Namespace) -> threading.Event:
    """The event that stops a run: set by SIGTERM / Ctrl-C, and with ``--watch-stdin`` by stdin's end."""
    cancel = threading.Event()
    _install_cancel_handlers(cancel)
    if getattr(args, "watch_stdin", False):
        watch_stdin(cancel)
    return cancel


def _run_spec(spec, args: argparse.Namespace, events: EventSink) -> int:
    from .publish import publishing
    from .tracking import tracked
    from .train.engine import Trainer

    cancel = _cancel_event(args)
    # report_to's trackers read the events, closed however the run ends; push_to_hub uploads in the
    # background and is waited for at the end
    with tracked(spec, events) as run_events, publishing(spec, run_events, stop=cancel) as sink:
        result = Trainer(spec, sink, device=args.device, cancel=cancel).run()
    return EXIT_CANCELLED if result.cancelled else 0


def _cache_only(spec, args: argparse.Namespace, events: EventSink) -> int:
    """Discover and check the data, fill both caches, report; no transformer is loaded."""
    from .train.engine import Trainer

    cancel = _cancel_event(args)
    trainer = Trainer(spec, events, device=args.device, cancel=cancel)
    trainer.prepare()
    memory = trainer.spec.memory
    if memory.vae_cache_disable:
        trainer.warn("vae_cache_disable: latents are encoded while training and never cached; only captions were")
    trainer.fill_caches(latents="skip" if memory.vae_cache_disable else "cache")
    events.emit(
        "cached",
        text={"total": trainer.text_report.total, "encoded": trainer.text_report.encoded},
        latents={
            "total": trainer.latent_report.total,
            "encoded": trainer.latent_report.encoded,
            "skipped": memory.vae_cache_disable,
        },
        seconds=round(trainer.text_report.seconds + trainer.latent_report.seconds, 3),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command not in ("train", "run", "demo", "cache"):
        return _main(args, FanOut())
    from .quiet import quiet_third_party

    quiet_third_party()
    events = _sinks(args)
    with _project_log_to_events(events):
        return _main(args, events)


def _main(args: argparse.Namespace, events: EventSink) -> int:
    try:
        if args.command == "train":
            from .simpletuner import import_simpletuner

            imported = import_simpletuner(args.config, args.backend)
            for w in imported.warnings:
                events.emit("warning", message=w)
            spec = imported.spec
            if args.output_dir:
                spec = spec.model_copy(update={"output_dir": args.output_dir})
            return _run_spec(spec, args, events)
        if args.command == "run":
            from .spec import TrainSpec

            return _run_spec(TrainSpec.load(args.spec), args, events)
        if args.command == "cache":
            from .spec import TrainSpec

            return _cache_only(TrainSpec.load(args.spec), args, events)
        if args.command == "demo":
            from .demo import demo_spec

            return _run_spec(demo_spec(args.output, steps=args.steps), args, events)
        if args.command == "import-config":
            from .simpletuner import import_simpletuner

            imported = import_simpletuner(args.config, args.backend)
            for w in imported.warnings:
                print(f"warning: {w}", file=sys.stderr)
            imported.spec.save(args.out)
            print(f"wrote {args.out}", file=sys.stderr)
            return 0
        if args.command == "export-config":
            from .simpletuner import write_simpletuner
            from .spec import TrainSpec

            cfg, backend = write_simpletuner(TrainSpec.load(args.spec), args.out)
            print(f"wrote {cfg} and {backend}", file=sys.stderr)
            return 0
    except CancelledError as e:
        events.emit("cancelled", message=e.message)
        return EXIT_CANCELLED
    except TunerError as e:
        events.emit("error", message=e.message, hint=e.hint, kind=type(e).__name__)
        if args.command in ("import-config", "export-config") or getattr(args, "quiet", False):
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        hint = "out of memory: try a smaller batch or resolution" if "out of memory" in str(e).lower() else None
        events.emit("error", message=f"{type(e).__name__}: {e}", hint=hint, kind="InternalError")
        raise
    return 1
