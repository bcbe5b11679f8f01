"""The web extension: loaded by Node.js against a stand-in of ComfyUI's frontend modules and a tiny DOM.

It must register once, listen to our namespaced events, and turn one training run's messages into
a live loss chart, a status line and the latest validation samples on the Train LoRA and Fine-tune
Model nodes (and ignore other nodes), and title our nodes' error dialogs with the node's name, not its class.
Skipped where Node.js is not installed; the events the Python side sends are checked against the
ones the extension handles in ``test_nodes_train.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_stub.harness import PACK_DIR, STUB_DIR

EXTENSION = PACK_DIR / "web" / "comfyui_tuner.js"


def handled_events() -> set[str]:
    """The ``comfyui-tuner.<event>`` names the extension listens to."""
    return set(re.findall(r'\bon\("(\w+)"', EXTENSION.read_text()))


def test_the_extension_registers_once_under_our_namespace():
    js = EXTENSION.read_text()
    assert js.count("app.registerExtension(") == 1
    assert 'const NS = "comfyui-tuner";' in js and 'name: "comfyui-tuner.live"' in js
    assert handled_events() >= {"started", "progress", "validation", "done", "cancelled", "error", "status"}
    assert list((PACK_DIR / "web").glob("*.js")) == [EXTENSION]  # ComfyUI loads every .js in WEB_DIRECTORY


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_the_extension_draws_the_chart_and_samples_from_one_runs_messages(tmp_path):
    served = tmp_path / "served"  # laid out as ComfyUI serves it: /scripts and /extensions/<pack>
    shutil.copytree(STUB_DIR / "frontend" / "scripts", served / "scripts")
    (served / "extensions" / "comfyui-tuner").mkdir(parents=True)
    shutil.copy(EXTENSION, served / "extensions" / "comfyui-tuner" / EXTENSION.name)
    (served / "package.json").write_text('{"type": "module"}')
    runner = served / "run_extension.mjs"
    shutil.copy(STUB_DIR / "frontend" / "run_extension.mjs", runner)
    out = subprocess.run(["node", str(runner), str(served)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["extensions"] == ["comfyui-tuner.live"]
    ours = {name.split(".", 1)[1] for name in shown["listeners"] if name.startswith("comfyui-tuner.")}
    assert ours == handled_events() and set(shown["listeners"]) - {f"comfyui-tuner.{e}" for e in ours} == {
        "execution_error"  # the error dialog's title (and the stand-in dialog's own listener)
    }
    assert shown["widgets"] == [  # on both training nodes, not on the KSampler
        {"node": 7, "name": "tuner_live", "serialize": False},
        {"node": 9, "name": "tuner_live", "serialize": False},
    ]
    assert shown["statusBeforeDone"] == "checkpoint saved at step 3"
    assert shown["status"].startswith("done: comfyui-tuner/t_1234_comfyui.safetensors")
    (image,) = shown["samples"]
    assert image["src"].startswith("/api/view?filename=validation-64x64.png&subfolder=comfyui-tuner%2Frun")
    assert image["title"] == "step 2: validation-64x64.png"
    assert "step 3/3  loss 1.1000" in shown["chartText"] and "9.900" not in " ".join(shown["chartText"])
    assert shown["strokes"] >= 2
    assert shown["dialogTitles"] == ["Train LoRA", "KSampler"]  # ours retitled, others untouched
    assert shown["statusAfterError"] == "error: bad"  # the error's first line, in the node's area
    # Fine-tune Model: the same live area; its file named as Load Diffusion Model lists it
    assert shown["finetuneStatus"] == "done: comfyui-tuner/ft_5678_comfyui.safetensors (2 steps)"
    assert "step 2/2  loss 0.6000" in shown["finetuneChartText"]
    # issue 17: CREPA's term, alignment score and the rollout passes under the chart, only when sent
    assert shown["finetuneChartText"][-1] == shown["finetuneLegend"] == "crepa -0.1000  align 0.200  rollout passes 3"
    assert shown["legend"] == "" and not any("crepa" in text for text in shown["chartText"])
    # issue 18: the CLIP score (the resumed run's and the new one) as a second series, its latest value shown
    assert "clip 23.50" in shown["chartText"] and not any("clip" in text for text in shown["finetuneChartText"])


def test_the_help_pages_are_markdown_per_node():
    docs = sorted(p.stem for p in (PACK_DIR / "web" / "docs").glob("*.md"))
    assert docs and all(name.startswith("Tuner") for name in docs)
    assert "Queueing again" in (PACK_DIR / "web" / "docs" / "TunerTrainLoRA.md").read_text()
    assert "metadata" in (PACK_DIR / "web" / "docs" / "TunerLoadLumina2.md").read_text()
    assert Path(EXTENSION).stat().st_size < 20_000


def test_the_kandinsky5_and_cache_help_pages_state_the_defaults_and_limits():
    from trainer_core.families.kandinsky5_image import Kandinsky5ImageFamily

    k5 = (PACK_DIR / "web" / "docs" / "TunerLoadKandinsky5Flavour.md").read_text()
    flavour = Kandinsky5ImageFamily.flavours[Kandinsky5ImageFamily.default_flavour]
    assert f"static shift of **{Kandinsky5ImageFamily.defaults.train_shift}**" in k5
    assert f"sampling shift **{flavour.options['sampling_shift']}**" in k5
    assert f"Guidance {Kandinsky5ImageFamily.defaults.validation_guidance}" in k5
    assert "authors' Qwen template" in k5 and "**needs torchvision**" in k5
    assert "**Stock ComfyUI cannot run the i2i checkpoint yet**" in k5 and "`reference_folder`" in k5
    assert all(f"`{name}`" in k5 for name in Kandinsky5ImageFamily.flavours)
    cache = (PACK_DIR / "web" / "docs" / "TunerCacheEmbeds.md").read_text()
    assert "Build Dataset → **Cache Embeds** → Train LoRA" in cache and "encodes nothing" in cache


def test_the_new_nodes_help_pages_name_the_video_flavours_and_stock_limits():
    from trainer_core.families.kandinsky5_video import Kandinsky5VideoFamily

    k5 = (PACK_DIR / "web" / "docs" / "TunerLoadKandinsky5Flavour.md").read_text()
    assert all(f"`{name}`" in k5 for name in Kandinsky5VideoFamily.flavours)
    video = (PACK_DIR / "web" / "docs" / "TunerVideoOptions.md").read_text()
    assert "4k+1" in video and "nearest valid: 57 or 61" in video
    tread = (PACK_DIR / "web" / "docs" / "TunerTreadRoute.md").read_text()
    assert "**Lumina 2 does not**" in tread and '"selection_ratio": 0.5' in tread
    memory = (PACK_DIR / "web" / "docs" / "TunerConfigureOffloadQuant.md").read_text()
    assert "Cache Embeds" in memory and "continues the same run" in memory
