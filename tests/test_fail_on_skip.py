"""The opt-in groups cannot pass by skipping where CI runs them (tests/helpers/fail_on_skip.py).

scripts/test_comfyui.sh sets ``TUNER_FAIL_ON_SKIP``: a group whose environment is missing must fail
there, naming the skip's reason, while the same skip stays a skip on a developer's machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = """
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="no ComfyUI here")
def test_skips():
    pass
"""


def run_pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    environ = {k: v for k, v in os.environ.items() if k != "TUNER_FAIL_ON_SKIP"}
    environ.update(env, PYTHONPATH=str(TESTS))
    plugins = ["-p", "helpers.fail_on_skip", "-p", "no:cacheprovider"]
    cmd = [sys.executable, "-m", "pytest", "-q", *plugins, "-c", "/dev/null", "test_sample.py"]
    return subprocess.run(cmd, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)


def test_with_tuner_fail_on_skip_a_skipped_test_fails_the_run_naming_why(tmp_path):
    out = run_pytest(tmp_path, TUNER_FAIL_ON_SKIP="1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "TUNER_FAIL_ON_SKIP is set: 1 skipped test(s) fail this run" in out.stdout
    assert "SKIPPED test_sample.py::test_skips: no ComfyUI here" in out.stdout


def test_without_it_a_skip_is_a_skip(tmp_path):
    for value in (None, "0"):
        out = run_pytest(tmp_path, **({} if value is None else {"TUNER_FAIL_ON_SKIP": value}))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "1 passed, 1 skipped" in out.stdout and "fail this run" not in out.stdout
