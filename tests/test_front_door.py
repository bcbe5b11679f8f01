"""The front door: a mistake in what the user hands us stops the run at once, with the fix.

Every entry point (``python -m trainer_core train`` with SimpleTuner files, ``run`` with a
TrainSpec, the Import SimpleTuner Config node, Train LoRA) must refuse a typo, an adapter we cannot
train, an unusable output_dir or a model that is not there before any model loads and before the
dataset is scanned, with one message that names the key or path and says what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.datasets import write_dataset

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_core", *args, "--events", "jsonl", "--quiet"],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, events, proc.stderr


def write_simpletuner_files(folder: Path, data: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend = [{"id": "pics", "instance_data_dir": str(data), "caption_strategy": "textfile"}]
    (folder / "multidatabackend.json").write_text(json.dumps(backend))
    base = {"model_family": "lumina2", "max_train_steps": 2, "data_backend_config": "multidatabackend.json"}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder / "config.json"


# ----------------------------------------------------------------------------- typos and adapters (CLI, node)
def test_cli_train_stops_on_a_typo_and_names_the_key_it_meant(tmp_path):
    data = write_dataset(tmp_path / "pics", {"a": "a red circle"})
    config = write_simpletuner_files(tmp_path / "st", data, learning_rat=1e-4, output_dir=str(tmp_path / "out"))
    code, events, _ = run_cli("train", "--config", str(config))
    assert code == 2
    (error,) = [e for e in events if e["type"] == "error"]
    assert "learning_rat (did you mean learning_rate?)" in error["message"]
    assert not [e for e in events if e["type"] == "started"]  # nothing was scanned or loaded
    assert not (tmp_path / "out").exists()


def test_cli_train_refuses_dora_instead_of_training_plain_lora(tmp_path):
    data = write_dataset(tmp_path / "pics", {"a": "a red circle"})
    config = write_simpletuner_files(tmp_path / "st", data, use_dora=True)
    code, events, _ = run_cli("train", "--config", str(config))
    (error,) = [e for e in events if e["type"] == "error"]
    assert code == 2 and "use_dora: true asks for DoRA" in error["message"]
    assert "remove use_dora" in error["hint"]


def test_the_import_node_shows_the_typo_error(tmp_path):
    from comfy_stub import harness

    data = write_dataset(tmp_path / "pics", {"a": "a red circle"})
    config = write_simpletuner_files(tmp_path / "st", data, learning_rat=1e-4)
    harness.install(tmp_path / "comfy")
    try:
        _, nodes = harness.load_pack()
        cls = nodes["TunerImportSimpleTunerConfig"]
        errors = __import__(harness.module_name() + ".trainer_core.errors", fromlist=["ConfigError"])
        with pytest.raises(errors.ConfigError, match=r"learning_rat \(did you mean learning_rate\?\)"):
            harness.run_node(cls, **{**harness.schema_defaults(cls), "config_path": str(config)})
    finally:
        harness.uninstall()
