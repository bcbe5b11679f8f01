"""The example graphs in ComfyUI's real frontend: opt-in, ``pytest -k comfyui`` with ``COMFYUI_DIR`` set.

``tests/browser/check_templates.mjs`` starts that ComfyUI (``COMFYUI_PYTHON``, ``--cpu``, this pack
linked into a temp ``custom_nodes/``), loads every ``workflows/*.json`` in headless Chromium, once
with the classic LiteGraph canvas and once with Vue nodes, and reads the box the frontend draws for
each node after growing it to fit its widgets. Two boxes that share more than a pixel fail the
check: a widget would be hidden under the other node. So does a note whose text is scrolled out of
view, a page error, or a node type the server lacks.

It also loads a graph saved before Validation Settings' video widgets moved to Validation Video
Options (11 widget values, the last two ``video_frames`` and ``video_frame_rate``): it must still
load, with the other nine values in place and the CLIP evaluation widgets that now follow them at
their defaults (the frontend assigns values by position; the extension resets those three).

Needs Node.js, Chromium (``/usr/bin/chromium`` or ``$CHROMIUM``) and ``npm ci`` in tests/browser.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
SCRIPT = PACK_DIR / "tests" / "browser" / "check_templates.mjs"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
OLD_GRAPH = "old Validation Settings with video widgets"


def missing() -> str | None:
    if not COMFYUI_DIR:
        return "set COMFYUI_DIR (and COMFYUI_PYTHON) to check the templates in a real ComfyUI frontend"
    if shutil.which("node") is None:
        return "Node.js is not installed"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM}"
    if not (SCRIPT.parent / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules is missing (run `npm ci` in tests/browser)"
    return None


pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def old_style_video_graph(folder: Path) -> Path:
    """The T2V template as saved before the split: the video values on Validation Settings itself."""
    path = next(p for p in (PACK_DIR / "workflows").glob("*.json") if "text to video" in p.stem)
    wf = json.loads(path.read_text())
    (extra,) = [n for n in wf["nodes"] if n["type"] == "TunerValidationVideoOptions"]
    wf["nodes"].remove(extra)
    wf["links"] = [link for link in wf["links"] if link[1] != extra["id"]]
    (val,) = [n for n in wf["nodes"] if n["type"] == "TunerValidationSettings"]
    val["inputs"] = [  # as frontends >= 1.16 save widget inputs
        {"name": "video_frames", "type": "INT", "widget": {"name": "video_frames"}, "link": None},
        {"name": "video_frame_rate", "type": "FLOAT", "widget": {"name": "video_frame_rate"}, "link": None},
    ]
    val["widgets_values"] = [*val["widgets_values"][:9], 33, 12.0]  # the nine widgets it had then
    out = folder / f"{OLD_GRAPH}.json"
    out.write_text(json.dumps(wf))
    return out


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layout")
    old = old_style_video_graph(folder)
    run = subprocess.run(
        [
            "node",
            str(SCRIPT),
            "--comfyui",
            COMFYUI_DIR,
            "--python",
            COMFYUI_PYTHON,
            "--chromium",
            CHROMIUM,
            "--graph",
            str(old),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.stdout.strip(), run.stderr[-4000:]
    return json.loads(run.stdout), old


def test_comfyui_frontend_draws_no_two_template_nodes_over_each_other(drawn):
    result, _ = drawn
    names = {p.stem for p in (PACK_DIR / "workflows").glob("*.json")}
    assert names <= set(result["templates"]), result["failures"]
    for name, modes in result["templates"].items():
        assert "litegraph" in modes, name
        for mode, data in modes.items():
            assert data["overlaps"] == [], f"{name} ({mode}): {data['overlaps']}"
            assert data["unfit"] == [], f"{name} ({mode}): {data['unfit']}"
    assert result["failures"] == []


def test_comfyui_frontend_loads_a_graph_saved_with_the_old_video_widgets(drawn):
    result, old = drawn
    saved = next(n for n in json.loads(old.read_text())["nodes"] if n["type"] == "TunerValidationSettings")
    for mode, data in result["templates"][OLD_GRAPH].items():
        (val,) = [n for n in data["nodes"] if n["type"] == "TunerValidationSettings"]
        values = [v for name, v in val["values"] if not name.startswith("$$")]
        assert values[:9] == saved["widgets_values"][:9], mode  # the two video values are dropped, nothing shifts
        assert values[9:] == ["none", 0, "openai/clip-vit-large-patch14"], mode  # the CLIP widgets keep defaults
        assert "video" in val["inputs"], mode  # the new socket, where Validation Video Options plugs in
