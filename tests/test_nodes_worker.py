"""The child-process worker against the real CLI on the tiny Lumina 2: live events, cancel, errors, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.datasets import lumina_spec, write_dataset

from trainer_core.worker import EXIT_CANCELLED, EXIT_USER_ERROR, WORDINGS, WorkerProcess, describe_exit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data(tmp_path) -> Path:
    return write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle"})


def write_spec(tmp_path: Path, model_path: Path, data: Path, **overrides) -> Path:
    path = tmp_path / "run" / "spec.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lumina_spec(model_path, data, tmp_path / "run", **overrides)))
    return path


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not reaped by whoever adopted it) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def test_events_arrive_live_and_cancel_stops_with_a_checkpoint(tiny_lumina2, data, tmp_path):
    spec = write_spec(
        tmp_path,
        tiny_lumina2,
        data,
        training={"max_train_steps": 500, "mixed_precision": "no", "base_model_default_dtype": "fp32"},
        checkpointing={"checkpoint_step_interval": None},
    )
    seen: list[dict] = []
    with WorkerProcess(spec) as worker:
        for event in worker.events(poll=0.2):
            if event is None:
                continue
            seen.append(event)
            if event["type"] == "progress" and event["step"] >= 2:
                assert worker.running  # the event came while the child was still training
                code = worker.cancel(timeout=120)
                break
        rest = worker.drain()
    assert code == EXIT_CANCELLED
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "started" and "cache" in kinds and kinds[-1] == "progress"
    assert seen[0]["total_steps"] == 500
    cancelled = [e for e in rest if e["type"] == "cancelled"]
    assert cancelled and Path(cancelled[0]["checkpoint"]).is_dir()
    assert Path(cancelled[0]["checkpoint"]).name == f"step-{cancelled[0]['step']}"
    assert not worker.running and worker.returncode == EXIT_CANCELLED
    assert_gone(worker.pid)


def test_a_user_error_is_an_error_event_with_a_hint_and_exit_2(tiny_lumina2, data, tmp_path):
    spec = write_spec(tmp_path, tiny_lumina2, data, model={"model_family": "lumina2", "model_flavour": "9.9"})
    worker = WorkerProcess(spec).start()
    events = [e for e in worker.events() if e]
    code = worker.wait(timeout=120)
    assert code == EXIT_USER_ERROR
    error = [e for e in events if e["type"] == "error"][0]
    assert "9.9" in error["message"] and "neta-lumina" in error["hint"]
    message = str(worker.failure())
    assert message.startswith("Training could not start") and "How to fix:" in message and "neta-lumina" in message


def test_a_crash_gives_a_non_zero_exit_and_the_tail_of_the_log(tiny_lumina2, data, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_lumina2, broken)
    config = json.loads((broken / "transformer" / "config.json").read_text())
    config["axes_dim_rope"] = 5  # the transformer's constructor raises TypeError
    (broken / "transformer" / "config.json").write_text(json.dumps(config))
    spec = write_spec(tmp_path, broken, data)
    with WorkerProcess(spec) as worker:
        events = [e for e in worker.events(poll=1.0) if e]
    assert worker.returncode == 1
    assert events[-1]["type"] == "error" and "TypeError" in events[-1]["message"]
    assert "Traceback" in worker.log_tail() and "TypeError" in worker.log_tail()
    message = str(worker.failure())
    assert "exit code 1" in message and "TypeError" in message and "last lines of the training log" in message


def test_exit_descriptions_name_the_cause():
    killed = describe_exit(-signal.SIGKILL, None, "")
    assert "SIGKILL" in killed and "memory" in killed
    oom = describe_exit(1, {"message": "OutOfMemoryError: CUDA out of memory", "hint": "try a smaller batch"}, "x")
    assert "CUDA out of memory" in oom and "How to fix: try a smaller batch" in oom and "training log" in oom
    assert "cancelled" in describe_exit(EXIT_CANCELLED, None, "")


def test_the_child_imports_this_copy_of_trainer_core(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    worker = WorkerProcess(spec, device="cpu", env={"PYTHONPATH": "/elsewhere"})
    assert worker.command()[-2:] == ["--device", "cpu"]
    paths = worker._env()["PYTHONPATH"].split(os.pathsep)
    assert paths[0] == str(Path(__file__).resolve().parent.parent) and "/elsewhere" in paths
    with pytest.raises(FileNotFoundError):
        WorkerProcess(tmp_path / "missing.json").start()


def test_the_cache_subcommand_runs_the_same_child_and_its_errors_speak_of_caching(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    run, cache = WorkerProcess(spec), WorkerProcess(spec, subcommand="cache")
    assert run.command()[3] == "run" and cache.command()[3] == "cache"
    assert run.command()[4:] == cache.command()[4:] and "--watch-stdin" in cache.command()
    with pytest.raises(ValueError, match="subcommand"):
        WorkerProcess(spec, subcommand="train")
    caching = WORDINGS["cache"]
    user = describe_exit(EXIT_USER_ERROR, {"message": "no such model", "hint": "fix the path"}, "", wording=caching)
    assert user == "Caching could not start: no such model\nHow to fix: fix the path"
    crash = describe_exit(1, {"message": "TypeError: x"}, "Traceback\nTypeError: x", wording=caching)
    assert crash.startswith("The caching process failed (exit code 1): TypeError: x")
    assert "last lines of the caching log" in crash
    killed = describe_exit(-signal.SIGKILL, None, "", wording=caching)
    assert killed.startswith("The caching process was killed") and "entries written so far are kept" in killed
    assert describe_exit(EXIT_CANCELLED, None, "", wording=caching).startswith("Caching was cancelled")
    assert "without reporting what it cached" in describe_exit(0, None, "", wording=caching)
    for text in (user, crash, killed):
        assert "training" not in text.lower() and "checkpoint" not in text.lower()


def test_the_cli_sets_cancel_when_stdin_reaches_its_end():
    from trainer_core.cli import watch_stdin

    read_end, write_end = os.pipe()
    cancel = threading.Event()
    thread = watch_stdin(cancel, read_end)
    os.write(write_end, b"anything the parent writes is ignored\n")
    assert not cancel.wait(0.3)
    os.close(write_end)  # what the OS does when the parent dies
    assert cancel.wait(5)
    thread.join(5)
    os.close(read_end)


def test_events_are_dropped_not_raised_once_the_reader_is_gone():
    from trainer_core.events import JsonLinesSink

    class Broken:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    sink = JsonLinesSink(Broken())
    sink.emit("progress", step=1)  # the run goes on to its checkpoint instead of crashing
    sink.emit("cancelled", step=1)
    assert sink.broken


ORPHAN_PARENT = """
import os, sys
sys.path.insert(0, {root!r})
from trainer_core.worker import WorkerProcess
worker = WorkerProcess({spec!r}).start()
print(worker.pid, flush=True)
for event in worker.events():
    if event["type"] == "progress":
        break
os._exit(0)  # dies like a killed ComfyUI: no cancel, nothing closed by hand; the OS closes the pipes
"""


@pytest.mark.skipif(os.name == "nt", reason="reads /proc and waits on a POSIX orphan")
def test_an_orphaned_child_stops_with_a_checkpoint_when_its_parent_dies(tiny_lumina2, data, tmp_path):
    spec = write_spec(
        tmp_path,
        tiny_lumina2,
        data,
        training={"max_train_steps": 500, "mixed_precision": "no", "base_model_default_dtype": "fp32"},
        checkpointing={"checkpoint_step_interval": None},
    )
    parent = subprocess.run(
        [sys.executable, "-c", ORPHAN_PARENT.format(root=str(ROOT), spec=str(spec))],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert parent.returncode == 0, parent.stderr
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 120
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(child), "the orphaned trainer kept running after its parent died"
    checkpoints = sorted((spec.parent / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and (checkpoints[-1] / "state.json").is_file()  # written on the way out, as on Cancel
    assert int(checkpoints[-1].name.split("-")[1]) < 500  # stopped early, not trained to the end
