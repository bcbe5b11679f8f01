"""The child-process worker against the real CLI on the tiny Lumina 2: live events, cancel, errors, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers.datasets import lumina_spec, write_dataset

from trainer_core.worker import EXIT_CANCELLED, EXIT_USER_ERROR, WorkerProcess, describe_exit


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
