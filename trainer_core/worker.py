"""Run a TrainSpec in a child process and read its events as they arrive.

Training never runs inside the caller's process (DESIGN.md, process model): the caller (the
ComfyUI node, or anything else) writes ``spec.json`` and starts ``python -m trainer_core run
spec.json --events jsonl --quiet --watch-stdin`` (or ``cache`` instead of ``run`` to fill the
caches only). The child owns the GPU and frees all of it when it exits, and an out-of-memory error
or a crash in it cannot take the caller down.

The child's stdin is a pipe the caller holds open and never writes to. If the caller dies (ComfyUI
killed, crashed, closed), the operating system closes that pipe, the child sees end of file on its
stdin and stops exactly as on Cancel (``--watch-stdin``: a checkpoint, then exit), so an orphaned
child never keeps the GPU.

The child's stdout carries one JSON event per line (``events.JsonLinesSink``); its stderr is the
log. Both are drained by background threads as they arrive, so neither pipe can fill up and block
the child, and the caller never blocks on a read: :meth:`WorkerProcess.events` yields an event as
soon as one arrives, and ``None`` every ``poll`` seconds without one, so the caller can check its
own cancel flag in between. :meth:`WorkerProcess.cancel` asks the child to stop (SIGTERM: the CLI
writes a checkpoint and exits with 130) and kills it only if it does not stop in time.

This module never imports ComfyUI, torch or anything heavy.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

EXIT_OK = 0
EXIT_USER_ERROR = 2  # cli.EXIT_USER_ERROR; not imported so that this module stays import-cheap
EXIT_CANCELLED = 130  # cli.EXIT_CANCELLED
SUBCOMMANDS = ("run", "cache")  # the CLI commands that take a spec file and emit events

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds trainer_core/
_EOF = object()


class WorkerError(RuntimeError):
    """The child failed. ``str()`` is a message meant for the user: cause, fix, and the log's tail."""

    def __init__(self, message: str, *, returncode: int | None, error_event: dict[str, Any] | None, log_tail: str):
        super().__init__(message)
        self.returncode = returncode
        self.error_event = error_event
        self.log_tail = log_tail


@dataclass(frozen=True)
class Wording:
    """How a failure of one kind of child is told: "Training could not start", "Caching could not start"."""

    activity: str  # "training": the word in "Training could not start", "the training log"
    kept: str  # what survives a cancel or a kill
    finished: str  # what a successful child reports, for "ended without reporting ..."


WORDINGS = {
    "run": Wording("training", "the last checkpoint is kept", "a finished LoRA"),
    "cache": Wording("caching", "the entries written so far are kept", "what it cached"),
}


@dataclass
class _Line:
    """A non-JSON line the child wrote on stdout (a library's print); kept for the log tail."""

    text: str


class WorkerProcess:
    """One ``python -m trainer_core run`` (or ``cache``) child.

    Use as a context manager, or call :meth:`start` and make sure :meth:`cancel` or :meth:`wait`
    runs: leaving the block with an exception cancels the child (with a checkpoint), so the
    caller's failure never leaves a training process behind. The child also stops on its own when
    this object's end of its stdin closes (the caller exited, or dropped the worker unwaited).
    """

    def __init__(
        self,
        spec_path: str | Path,
        *,
        device: str | None = None,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_lines: int = 200,
        extra_args: Sequence[str] = (),
        subcommand: str = "run",
    ) -> None:
        if subcommand not in SUBCOMMANDS:
            raise ValueError(f"subcommand must be one of {', '.join(SUBCOMMANDS)}, got {subcommand!r}")
        self.subcommand = subcommand
        self.wording = WORDINGS[subcommand]
        self.spec_path = Path(spec_path)
        self.device = device
        self.python = python or sys.executable
        self.extra_env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else self.spec_path.parent
        self.extra_args = list(extra_args)
        self._log: deque[str] = deque(maxlen=log_lines)
        self._log_lock = threading.Lock()
        self._events: queue.Queue[Any] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._proc: subprocess.Popen[str] | None = None
        self._finished = False
        self.last_error: dict[str, Any] | None = None  # the latest ``error`` event seen
        self.cancel_requested = False

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        cmd = [self.python, "-m", "trainer_core", self.subcommand, str(self.spec_path)]
        cmd += ["--events", "jsonl", "--quiet", "--watch-stdin"]
        if self.device:
            cmd += ["--device", self.device]
        return cmd + self.extra_args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        # the child must import this very copy of trainer_core, whatever the caller's sys.path is
        paths = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return env

    def start(self) -> WorkerProcess:
        if self._proc is not None:
            raise RuntimeError("this worker was already started")
        if not self.spec_path.is_file():
            raise FileNotFoundError(f"spec file {self.spec_path} does not exist")
        kwargs: dict[str, Any] = {}
        if os.name == "nt":  # a console-less group, so CTRL_BREAK reaches the child alone
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,  # held open, never written: its end of file tells the child we are gone
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(self.cwd),
            env=self._env(),
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self._proc.stdout,), daemon=True, name="tuner-events"),
            threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True, name="tuner-log"),
        ]
        for t in self._threads:
            t.start()
        return self

    def __enter__(self) -> WorkerProcess:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.running:
            if exc_type is not None:
                self.cancel()
            else:
                self.wait()
        self._join_readers(timeout=5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    # ------------------------------------------------------------------ readers
    def _read_stdout(self, stream: IO[str]) -> None:
        try:
            for raw in stream:
                line = raw.rstrip("\r\n")
                if not line:
                    continue
                event = _parse_event(line)
                if event is None:
                    self._append_log(line)
                    continue
                if event.get("type") == "error":
                    self.last_error = event
                self._events.put(event)
        finally:
            self._events.put(_EOF)

    def _read_stderr(self, stream: IO[str]) -> None:
        for raw in stream:
            self._append_log(raw.rstrip("\r\n"))

    def _append_log(self, line: str) -> None:
        with self._log_lock:
            self._log.append(line)

    def _join_readers(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    def log_tail(self, lines: int | None = None) -> str:
        """The last lines the child wrote to stderr (and any stray stdout), oldest first."""
        with self._log_lock:
            tail = list(self._log)
        return "\n".join(tail[-lines:] if lines else tail)

    # ------------------------------------------------------------------ events
    def events(self, poll: float | None = None) -> Iterator[dict[str, Any] | None]:
        """Yield each event as it arrives; with ``poll``, also ``None`` after ``poll`` quiet seconds.

        Ends when the child closes its stdout (it exited). Events still queued after a
        :meth:`cancel` are yielded too, so the caller sees the ``cancelled`` event and the last
        ``checkpoint``.
        """
        if self._proc is None:
            raise RuntimeError("start the worker first")
        while not self._finished:
            try:
                item = self._events.get(timeout=poll) if poll is not None else self._events.get()
            except queue.Empty:
                yield None
                continue
            if item is _EOF:
                self._finished = True
                break
            yield item

    def drain(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every event not consumed yet, waiting up to ``timeout`` s for the child's stdout to close."""
        out: list[dict[str, Any]] = []
        if self._proc is None:
            return out
        deadline = _now() + timeout
        while not self._finished:
            remaining = deadline - _now()
            if remaining <= 0:
                break
            try:
                item = self._events.get(timeout=remaining)
            except queue.Empty:
                break
            if item is _EOF:
                self._finished = True
                break
            out.append(item)
        return out

    # ------------------------------------------------------------------ stopping
    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit and return its exit code (negative: killed by that signal)."""
        if self._proc is None:
            raise RuntimeError("start the worker first")
        code = self._proc.wait(timeout)
        self._close_stdin()
        self._join_readers(timeout=5)
        return code

    def _close_stdin(self) -> None:
        """Let go of the child's stdin once it has exited (closing it earlier would stop the child)."""
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def cancel(self, timeout: float = 300.0) -> int:
        """Ask the child to stop with a checkpoint; kill it if it has not exited after ``timeout`` s.

        Returns the exit code: 130 after a clean stop, negative if it had to be killed, or whatever
        it exited with if it had already finished.
        """
        if self._proc is None:
            raise RuntimeError("start the worker first")
        if self._proc.poll() is None:
            self.cancel_requested = True
            try:
                if os.name == "nt":
                    self._proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
                else:
                    self._proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.wait()

    def kill(self) -> None:
        """Stop the child at once (no checkpoint). The last complete checkpoint stays usable."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    # ------------------------------------------------------------------ reporting
    def failure(self, returncode: int | None = None) -> WorkerError:
        """A :class:`WorkerError` describing why the child did not finish, for the user."""
        code = self.returncode if returncode is None else returncode
        tail = self.log_tail()
        return WorkerError(
            describe_exit(code, self.last_error, tail, wording=self.wording),
            returncode=code,
            error_event=self.last_error,
            log_tail=tail,
        )


def _now() -> float:
    return time.monotonic()


def _parse_event(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    return event


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(
    returncode: int | None,
    error_event: dict[str, Any] | None,
    log_tail: str,
    tail_lines: int = 25,
    wording: Wording = WORDINGS["run"],
) -> str:
    """One message for a child that did not finish: what happened, how to fix it, what the log said.

    User errors (exit 2) carry their own message and hint and need no log. Crashes show the
    error the child reported plus the end of its log, because that traceback is what a bug
    report needs. A child killed by SIGKILL without a word was almost always killed by the
    operating system for running out of memory. ``wording`` names what the child was doing
    (training, or caching for the ``cache`` command).
    """
    message = (error_event or {}).get("message")
    hint = (error_event or {}).get("hint")
    lines = log_tail.splitlines()[-tail_lines:] if log_tail else []
    activity = wording.activity
    if returncode == EXIT_USER_ERROR and message:
        text = f"{activity.capitalize()} could not start: {message}"
        return text + (f"\nHow to fix: {hint}" if hint else "")
    if returncode == EXIT_CANCELLED:
        return f"{activity.capitalize()} was cancelled; {wording.kept} and a re-run continues from there."
    if returncode is not None and returncode < 0:
        name = _signal_name(-returncode)
        text = f"The {activity} process was killed by {name}."
        if -returncode == getattr(signal, "SIGKILL", 9):
            text += (
                " This is usually the operating system stopping it for lack of memory (RAM): try a smaller"
                f" batch or resolution, or close other programs. {wording.kept.capitalize()}."
            )
    elif returncode == EXIT_OK:
        text = f"The {activity} process ended without reporting {wording.finished}."
    else:
        text = f"The {activity} process failed (exit code {returncode})"
        text += f": {message}" if message else "."
        if hint:
            text += f"\nHow to fix: {hint}"
    if lines:
        text += f"\n--- last lines of the {activity} log ---\n" + "\n".join(lines)
    return text
