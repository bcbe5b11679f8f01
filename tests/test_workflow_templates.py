"""The example graphs as a new user meets them in ComfyUI's Templates dialog.

- **Titles.** For a custom node pack's templates, every frontend (1.35.9, 1.49.6, 1.58.1) shows the
  file name as the title and, with ``-`` and ``_`` turned into spaces, as the description; the server
  (``app/custom_node_manager.py``) lists nothing but the names. So the file name is the title.
- **Start here.** Each graph opens with a short Markdown note at its top left: set the dataset
  folder, choose the weights. Markdown, not a wall of monospace text in a plain Note.
- **Downloads.** The stock loaders carry ``properties.models`` (name, url, directory), so the new
  frontend offers each missing file for download instead of only counting the errors.
- **Layout.** No two nodes overlap as drawn. The frontend grows a node whose saved size is too small
  for its widgets, and Vue nodes are taller still, so the saved sizes alone prove nothing: the check
  here uses a conservative model of the drawn height (calibrated against both modes of frontend
  1.49.6, where each node's box stayed within it). ``tests/test_comfyui_templates.py`` measures the
  real frontend.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from comfy_stub import harness
from test_nodes_workflows import FOLDER_OF_LOADER, MULTILINE_STOCK, STOCK, WORKFLOWS, kind_of, widget_slots

TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above a node's pos
# the drawn box (title included) is at most max(saved height + SLACK, BASE + per row): measured on
# frontend 1.49.6, LiteGraph and Vue nodes (Vue rows are taller, and Vue pads a node by up to 42 px)
SLACK = 60
BASE, WIDGET_ROW, SOCKET_ROW, TEXT_AREA = 44, 34, 24, 70
NOTES = ("Note", "MarkdownNote")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    harness.install(tmp_path_factory.mktemp("comfy"))
    _, found = harness.load_pack()
    yield found
    harness.uninstall()


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def drawn_height(node: dict, nodes: dict) -> float:
    """A conservative bound on the height the frontend draws this node at, title bar included."""
    kind = node["type"]
    if kind in NOTES:
        return node["size"][1] + TITLE_HEIGHT  # notes are drawn at their saved size
    if kind in nodes:
        schema = nodes[kind].GET_SCHEMA()
        widgets = len(widget_slots(nodes[kind]))
        text_areas = sum(1 for i in schema.inputs if getattr(i, "is_widget", False) and getattr(i, "multiline", False))
        sockets_in = sum(1 for i in schema.inputs if not getattr(i, "is_widget", False))
        sockets_out = len(schema.outputs)
    else:
        widgets, text_areas = STOCK[kind]["widgets"], MULTILINE_STOCK.get(kind, 0)
        sockets_in, sockets_out = len(STOCK[kind]["inputs"]), len(STOCK[kind]["outputs"])
    rows = BASE + WIDGET_ROW * widgets + SOCKET_ROW * max(sockets_in, sockets_out) + TEXT_AREA * text_areas
    return max(node["size"][1] + SLACK, rows)


def boxes(wf: dict, nodes: dict) -> list[tuple[str, tuple[float, float, float, float]]]:
    out = []
    for n in wf["nodes"]:
        x, y = n["pos"]
        name = f"{n['id']} {n.get('title') or n['type']}"
        out.append((name, (x, y - TITLE_HEIGHT, n["size"][0], drawn_height(n, nodes))))
    return out


def overlapping(items: list[tuple[str, tuple[float, float, float, float]]]) -> list[str]:
    found = []
    for i, (a, (ax, ay, aw, ah)) in enumerate(items):
        for b, (bx, by, bw, bh) in items[i + 1 :]:
            w = min(ax + aw, bx + bw) - max(ax, bx)
            h = min(ay + ah, by + bh) - max(ay, by)
            if w > 0 and h > 0:
                found.append(f"{a} overlaps {b} by {w:.0f}x{h:.0f}")
    return found


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_two_nodes_overlap_as_the_frontend_draws_them(nodes, path: Path):
    assert overlapping(boxes(load(path), nodes)) == []


def test_the_layout_check_sees_a_widget_hidden_under_the_next_node(nodes):
    """The saved sizes of the old templates did not overlap; the drawn ones did (Validation Settings)."""
    validation = {"id": 1, "type": "TunerValidationSettings", "pos": [0, 0], "size": [340, 330]}
    below = {"id": 2, "type": "TunerCacheEmbeds", "pos": [0, 380], "size": [340, 160]}
    assert 0 + 330 < 380 - TITLE_HEIGHT  # saved boxes are apart
    assert overlapping(boxes({"nodes": [validation, below]}, nodes))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_file_name_is_a_readable_title(path: Path):
    title = path.stem
    # the dialog shows - and _ as spaces in the description; "fine-tune" reads well as "fine tune" there
    assert not re.search(r"[_\-]", title.replace("fine-tune", "")), f"{title!r}: - or _ in the title"
    assert title[0].isupper() and (" full fine-tune" if kind_of(path).endswith("-full") else " LoRA") in title, title
    lumina = {"lumina2": "Lumina 2", "lumina2-full": "Lumina 2", "simpletuner": "Lumina 2"}
    assert title.startswith(lumina.get(kind_of(path), "Kandinsky 5"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_graph_starts_with_a_short_markdown_note_on_what_to_set_first(path: Path):
    wf = load(path)
    assert not [n for n in wf["nodes"] if n["type"] == "Note"], "plain Notes draw their text in monospace"
    first = min(wf["nodes"], key=lambda n: (n["pos"][1], n["pos"][0]))
    assert first["type"] == "MarkdownNote" and first["title"] == "Start here"
    text = first["widgets_values"][0]
    assert len(text.split()) <= 150, f"{len(text.split())} words: keep it short"
    assert "```" not in text
    steps = re.findall(r"^\d+\. \*\*([^*]+)\*\*", text, flags=re.M)
    if kind_of(path) == "simpletuner":
        assert steps[:2] == ["Config", "Weights to train"]
    else:
        assert steps[:2] == ["Dataset", "Weights to train"] and "`folder`" in text
    if any(n["type"] in FOLDER_OF_LOADER for n in wf["nodes"]):
        assert "Weights to sample" in steps


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_stock_loaders_offer_the_download_of_each_file(path: Path):
    for node in load(path)["nodes"]:
        folder = FOLDER_OF_LOADER.get(node["type"])
        if folder is None:
            continue
        files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        models = {m["name"]: m for m in node["properties"].get("models", [])}
        assert files and set(files) == set(models), (node["type"], files, list(models))
        for name, model in models.items():
            assert model["directory"] == folder, model
            url = model["url"]
            # the frontend downloads only from its allowed hosts, and names the file by the url's last part
            assert url.startswith("https://huggingface.co/") and "/resolve/main/" in url, url
            assert url.split("?")[0].rsplit("/", 1)[1] == name, url


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_video_widgets_appear_only_on_video_graphs(path: Path):
    types = {n["type"] for n in load(path)["nodes"]}
    video = kind_of(path) in ("k5-t2v", "k5-i2v")
    assert ("TunerValidationVideoOptions" in types) is video
    assert ("TunerVideoOptions" in types) is video
