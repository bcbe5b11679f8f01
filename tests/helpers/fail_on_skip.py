"""A pytest plugin: with ``TUNER_FAIL_ON_SKIP`` set, any skipped test fails the run.

The opt-in groups (``-k comfyui`` against a real ComfyUI, ``-m torchvision``) skip, saying why, where
their environment is missing, which suits a developer's machine. ``scripts/test_comfyui.sh`` builds
that environment and sets the variable: there a skip means a group that did not run, so it must fail
CI rather than close on a green line. ``tests/conftest.py`` registers this plugin.
"""

from __future__ import annotations

import os

import pytest

ENV = "TUNER_FAIL_ON_SKIP"


def _enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def _skipped(config: pytest.Config) -> list:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter is not None else []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _enabled() and _skipped(session.config) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = _skipped(config)
    if not (_enabled() and skipped):
        return
    terminalreporter.section(f"{ENV} is set: {len(skipped)} skipped test(s) fail this run", sep="=", red=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        terminalreporter.line(f"SKIPPED {report.nodeid}: {reason}", red=True)
