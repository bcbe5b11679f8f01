"""Shared pytest set-up: make ``trainer_core`` importable when pytest runs from a checkout.

Nothing is installed into the virtualenv, and ``pytest`` puts only ``tests/`` on ``sys.path``,
so the repository root is added here. Fixtures belong in the test files that use them.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lumina2(tmp_path_factory) -> Path:
    """A tiny random Lumina 2 pipeline in diffusers layout, built once per test session."""
    from trainer_core.testing.tiny import build_tiny_lumina2

    return build_tiny_lumina2(tmp_path_factory.mktemp("models"))


def pytest_configure(config: pytest.Config) -> None:
    from helpers import fail_on_skip  # where TUNER_FAIL_ON_SKIP is set, a skipped test fails the run

    if not config.pluginmanager.is_registered(fail_on_skip):
        config.pluginmanager.register(fail_on_skip, "tuner-fail-on-skip")
    config.addinivalue_line(
        "markers",
        "torchvision: needs a torchvision that imports (Kandinsky 5 i2i's Qwen2VLProcessor); skipped without one. "
        "Run them in a venv with `pip install torch==2.14.1 torchvision==0.29.1`.",
    )


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CPU OpenMP threads that wait for
    each other make tiny-model tests ~10x slower (measured: 72 s vs 7 s for a K5 training run).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
