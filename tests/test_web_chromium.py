"""The web extension in a real browser: headless Chromium replays one recorded training run.

``tests/browser/check_extension.mjs`` serves a page laid out as ComfyUI serves its frontend (the
stand-in ``scripts/app.js``/``scripts/api.js`` of ``comfy_stub/frontend``, the extension under
``/extensions/comfyui-tuner/``, ``/api/view`` for the samples), registers a Train LoRA node, and
replays the websocket messages of a real run (``tests/browser/fixture/``, written by
``tests/browser/record_events.py`` from the Train LoRA node on the tiny Lumina 2), drawing ComfyUI's
own messages among them (progress text, progress-bar preview, ui output images) as its frontend
does. It fails on any console error, page error or failed request, if the Train LoRA node grows
during the run or shows a second status text (issue 14, items 16 and 17), and checks the drawn
chart's pixels, the one-line status and the latest samples scaled into their row, then takes a
screenshot. A second Train LoRA node gets what the server sends when that run is queued again with
fewer steps than it has (``started`` with the history, then ``done`` at once): it must show done's
samples. A third gets the run's progress with CREPA's and scheduled sampling's fields added: it
draws the CREPA term as a second line and a legend, which the other two do not (issue 17). An
error of our node gets a dialog titled with the node's name.

Needs Debian's Chromium (``/usr/bin/chromium``, or ``$CHROMIUM``) and ``npm ci`` in
``tests/browser`` (playwright-core, which downloads no browser); ``.ci/run`` installs both. Where either
is missing the check is skipped on a developer's machine, but fails when ``CI`` is set: a failed
install in CI must not turn the only real-browser check into a quiet skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_stub.harness import PACK_DIR
from test_nodes_web import handled_events

BROWSER_DIR = PACK_DIR / "tests" / "browser"
FIXTURE = BROWSER_DIR / "fixture" / "events.json"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def missing(chromium: str = CHROMIUM, browser_dir: Path = BROWSER_DIR) -> str | None:
    """What the browser check lacks, in words, or None when it can run."""
    if shutil.which("node") is None:
        return "Node.js is not installed (apt-get install nodejs npm)"
    if not Path(chromium).is_file():
        return f"no Chromium at {chromium} (apt-get install chromium, or set CHROMIUM)"
    if not (browser_dir / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules is missing (run `npm ci` in tests/browser)"
    return None


def in_ci() -> bool:
    """CI services set ``CI`` (``true`` here, ``1`` elsewhere); an empty, ``0`` or ``false`` value is off."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_browser(chromium: str = CHROMIUM, browser_dir: Path = BROWSER_DIR) -> None:
    """Skip the browser check where it cannot run, except in CI, where that fails the run."""
    why = missing(chromium, browser_dir)
    if why is None:
        return
    if in_ci():
        pytest.fail(f"CI is set, but the headless-browser check cannot run: {why}. .ci/run installs both.")
    pytest.skip(why)


def outcome(chromium: str, browser_dir: Path = BROWSER_DIR) -> tuple[str, str]:
    """What require_browser does to the check: ("failed" | "skipped" | "runs", its message)."""
    try:
        require_browser(chromium, browser_dir)
    except pytest.fail.Exception as err:
        return "failed", str(err)
    except pytest.skip.Exception as err:
        return "skipped", str(err)
    return "runs", ""


def test_in_ci_a_missing_browser_fails_instead_of_skipping(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # Node.js present
    monkeypatch.setenv("CI", "true")
    kind, message = outcome(str(tmp_path / "no-chromium"))
    assert kind == "failed" and message.startswith("CI is set, but the headless-browser check cannot run: no Chromium")
    monkeypatch.setenv("CI", "1")
    kind, message = outcome(str(FIXTURE), tmp_path)  # any existing file stands in for the browser
    assert kind == "failed" and "tests/browser/node_modules is missing (run `npm ci` in tests/browser)" in message


def test_outside_ci_a_missing_browser_skips_saying_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # Node.js present
    no_chromium = tmp_path / "no-chromium"
    for value in (None, "", "0", "false"):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        assert outcome(str(no_chromium)) == (
            "skipped",
            f"no Chromium at {no_chromium} (apt-get install chromium, or set CHROMIUM)",
        )


def test_the_recorded_run_sends_only_messages_the_extension_handles():
    messages = json.loads(FIXTURE.read_text())
    names = {name.split(".", 1)[1] for name, _ in messages if name.startswith("comfyui-tuner.")}
    assert {"started", "progress", "validation", "done"} <= names <= handled_events()
    assert all(data["node"] == "7" for _, data in messages)
    # of ComfyUI's own messages drawn on the node, only the ui output: no progress text, no preview
    assert [name for name, _ in messages if not name.startswith("comfyui-tuner.")] == ["executed"]
    output = messages[-1][1]["output"]
    assert "images" not in output and output["comfyui_tuner"][0]["images"] == messages[-2][1]["images"]
    for _, data in messages:
        for ref in (data.get("images") or []) + (data.get("output", {}).get("comfyui_tuner") or [{}])[0].get(
            "images", []
        ):
            assert (BROWSER_DIR / "fixture" / ref["type"] / ref["subfolder"] / ref["filename"]).is_file()


def test_chromium_loads_the_extension_and_draws_the_recorded_run(tmp_path):
    require_browser()
    shot = tmp_path / "train_lora_node.png"
    out = subprocess.run(
        ["node", str(BROWSER_DIR / "check_extension.mjs"), "--screenshot", str(shot), "--chromium", CHROMIUM],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr + out.stdout[-4000:]
    shown = json.loads(out.stdout)
    assert shown["ok"] and shown["failures"] == [] and not any(line.startswith("error") for line in shown["console"])
    messages = json.loads(FIXTURE.read_text())
    progress = [data for name, data in messages if name == "comfyui-tuner.progress"]
    done = messages[-2][1]
    assert shown["replayed"]["messages"] == len(messages)
    height = shown["replayed"]["trainNodeHeight"]
    assert height["max"] == height["after"] == height["before"] and height["otherText"] == []
    run, again = shown["train"], shown["queuedAgain"]
    assert run["chart"]["drawnPixels"] > 1000 and run["chart"]["lineColumns"] > 300
    assert [img["title"] for img in run["samples"]] == [f"step {progress[-1]['step']}: validation-64x64.png"]
    assert all(img["loaded"] and img["inRow"] for img in run["samples"])  # the latest, once, scaled to fit
    # queued again with fewer steps than the run has: history drawn, done's samples shown
    assert again["chart"]["lineColumns"] > 300 and [img["src"] for img in again["samples"]] == [
        img["src"] for img in run["samples"]
    ]
    assert again["status"] == run["status"] == f"done: {done['lora_name']} ({done['steps']} steps)"
    # the dialog is titled with the node as the user sees it: its title (renamed here), not its class
    assert shown["replayed"]["dialogTitles"] == ["Train LoRA (no model connected)", "KSampler"]
    # issue 17: the CREPA line across the plot and the legend of the latest values, only where sent
    crepa = shown["crepa"]
    assert crepa["crepaColumns"] > 300 and crepa["legend"].startswith("crepa -") and "rollout passes" in crepa["legend"]
    assert run["chart"]["crepaColumns"] == again["chart"]["crepaColumns"] == 0 and run["chart"]["legend"] == ""
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
