"""What a person reads on the terminal: only this project's lines, and each warning once.

The README's commands run here as a user runs them (a subprocess, stderr not a terminal): the demo,
and ``train`` on a SimpleTuner config with a key we do not support. Every stderr line must be one
that the CLI's terminal sink writes; import chatter of torchao, triton, torch, peft, diffusers or
transformers, Python warnings from site-packages and third-party progress bars are all failures, as
is a warning printed twice (once as an event and once as a log record, say).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

from helpers.datasets import write_dataset

from trainer_core.simpletuner import UNSUPPORTED_MESSAGE

REPO = Path(__file__).resolve().parent.parent

# The lines trainer_core.events.TerminalSink writes (progress bars are "[###---] n/N ...").
OURS = re.compile(
    r"^(warning: |error: |  how to fix: |started: |cache \w+: \d+ entries ready$|memory: |validation: |"
    r"checkpoint: |resumed: |cancelled: |done: |\[[#-]+\] \d+/\d+ )"
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONWARNINGS", None)  # Python's own defaults, as a user has them
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_core", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_terminal(stderr: str) -> list[str]:
    """Assert every line is ours and none says the same thing twice; return the warnings."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    foreign = [line for line in lines if not OURS.match(line)]
    assert not foreign, "lines on stderr that this project did not write:\n" + "\n".join(foreign)
    said = [re.sub(r"^warning: ", "", line) for line in lines]
    repeated = sorted({line for line in said if said.count(line) > 1})
    assert not repeated, "printed more than once:\n" + "\n".join(repeated)
    return [line[len("warning: ") :] for line in lines if line.startswith("warning: ")]


def test_the_demo_prints_only_its_own_lines(tmp_path):
    proc = run_cli("demo", "--output", str(tmp_path / "demo"), "--steps", "2")
    check_terminal(proc.stderr)
    assert "done: " in proc.stderr  # the run did happen, and said so


def test_train_reports_an_unsupported_key_once_and_nothing_from_other_libraries(tiny_lumina2, tmp_path):
    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle"})
    shutil.copy(data / "a.png", data / "c.png")  # the dataset scan reports the copy, and so does the run
    (data / "c.txt").write_text("a red circle again\n")
    (tmp_path / "multidatabackend.json").write_text(
        json.dumps(
            [
                {
                    "id": "shapes",
                    "type": "local",
                    "instance_data_dir": str(data),
                    "caption_strategy": "textfile",
                    "resolution": 64,
                    "resolution_type": "pixel_area",
                },
                {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True},
            ]
        )
    )
    config = {
        "model_family": "lumina2",
        "pretrained_model_name_or_path": str(tiny_lumina2),
        "output_dir": str(tmp_path / "out"),
        "data_backend_config": str(tmp_path / "multidatabackend.json"),
        "max_train_steps": 2,
        "train_batch_size": 1,
        "mixed_precision": "bf16",  # on the CPU: the run warns that it trains in fp32
        # a torchao base is where PEFT warns (TorchaoLoraLinear); quanto where torchao is not installed
        "base_model_precision": "int8-torchao" if find_spec("torchao") else "int8-quanto",
        "validation_steps": 100,
        "disable_tf32": True,  # the one SimpleTuner key we do not support
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run_cli("train", "--config", str(tmp_path / "config.json"), "--events", "jsonl")

    warnings = check_terminal(proc.stderr)
    assert [w for w in warnings if "disable_tf32" in w] == [UNSUPPORTED_MESSAGE + "disable_tf32"]
    assert any("identical" in w for w in warnings)  # logged by the scan and reported by the run: shown once
    assert any("training on CPU" in w for w in warnings)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["message"] for e in events if e["type"] == "warning"] == warnings  # the node sees the same, once
    assert events[-1]["type"] == "done"


def test_a_warning_logged_when_the_terminal_is_gone_raises_nowhere():
    """The stdin watcher logs "parent gone" into a closed stderr pipe; the warning must not raise
    into it (it would die before cancelling, and the orphan would train on)."""
    import io
    import logging

    from trainer_core.events import LogWarningsAsEvents, TerminalSink, WarnOnce

    class GonePipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    sink = TerminalSink(GonePipe(), warnings_only=True)
    sink.emit("warning", message="first")  # the sink notices, and stays quiet from then on
    assert sink.broken
    logger = logging.getLogger("trainer_core.test_gone_terminal")
    handler = LogWarningsAsEvents(WarnOnce(TerminalSink(GonePipe())))
    logger.addHandler(handler)
    try:
        logger.warning("stdin closed: the parent process is gone")
    finally:
        logger.removeHandler(handler)


def test_main_in_process_leaves_logging_as_it_found_it(tmp_path, capsys):
    """The CLI routes trainer_core's log warnings into its events only while it runs."""
    import logging

    from trainer_core.cli import main

    project = logging.getLogger("trainer_core")
    handlers = list(project.handlers)
    assert main(["run", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert project.propagate and project.handlers == handlers
