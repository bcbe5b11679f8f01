"""What the README and the nodes' words promise matches what the code does.

The README is the first thing a new user reads: every event the trainer emits and every command of
``python -m trainer_core`` is named there, it points at nothing outside this repository, and it
makes no promises about things that have already landed. The Kandinsky 5 loader's tooltip says what
each kind of flavour trains on, i2i included.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from comfy_stub import harness

from trainer_core.cli import _parser
from trainer_core.families.kandinsky5_image import Kandinsky5ImageFamily

PACK = harness.PACK_DIR
README = (PACK / "README.md").read_text()
STALE = ("(soon)", "(in progress)", "as they land", "cannot be trained yet", "../shared/")


def emitted_events() -> set[str]:
    """Every event type the trainer emits: each ``emit("type", ...)`` call in trainer_core."""
    found: set[str] = set()
    for path in (PACK / "trainer_core").rglob("*.py"):
        found |= set(re.findall(r"\.emit\(\s*\"([a-z_]+)\"", path.read_text()))
    return found


def test_the_readme_names_every_event_the_trainer_emits():
    events = emitted_events()
    assert {"started", "progress", "memory", "resumed", "cached", "done"} <= events  # the scan works
    assert [e for e in sorted(events) if f"`{e}`" not in README] == []


def test_the_readme_shows_every_command_line_command():
    commands = next(a for a in _parser()._actions if a.dest == "command").choices
    assert "cache" in commands
    assert [c for c in commands if f"python -m trainer_core {c}" not in README] == []


def test_the_readme_points_only_inside_the_repository():
    assert "../" not in README
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not re.match(r"[a-z]+://", target):
            assert (PACK / target).exists(), target


DOCS = [PACK / "README.md", *sorted((PACK / "web" / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_no_promise_about_what_has_already_landed(path: Path):
    text = path.read_text()
    assert [w for w in STALE if w in text] == []


def test_the_kandinsky5_loader_says_how_i2i_flavours_train(tmp_path):
    harness.install(tmp_path)
    try:
        _, nodes = harness.load_pack()
        schema = nodes["TunerLoadKandinsky5Flavour"].GET_SCHEMA()
    finally:
        harness.uninstall()
    (flavour,) = [i for i in schema.inputs if i.id == "flavour"]
    assert (
        {"i2i-lite-sft", "i2i-lite-pretrain"}
        <= set(flavour.options)
        <= set(flavour.tooltip.split()) | set(re.findall(r"[\w:-]+", flavour.tooltip))
    )
    assert "i2i-lite-sft" in Kandinsky5ImageFamily.flavours  # trained by the image family
    assert "cannot be trained" not in flavour.tooltip and "reference_folder" in flavour.tooltip
