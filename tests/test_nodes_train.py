"""Train LoRA through the real child process on the tiny Lumina 2, against the ComfyUI stand-in.

Covers what a user sees: the progress bar, the websocket messages the web extension draws (and
nothing ComfyUI's frontend would draw outside the extension's bounded area: no progress-bar preview,
no progress text, no "images" ui output), the outputs, re-queueing (same inputs: no training; more
steps: continues), Cancel (checkpoint written, child gone, interruption re-raised) and a crashing
child (a clear error under the node's display name; the caller keeps running).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import import_module
from pathlib import Path

import pytest
from comfy_stub import harness
from helpers.datasets import write_dataset
from test_nodes_web import handled_events


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    harness.install(tmp_path_factory.mktemp("comfy"))
    _, nodes = harness.load_pack()
    yield nodes
    harness.uninstall()


@pytest.fixture
def comfy(pack, tmp_path, monkeypatch):
    recorder = harness.install(tmp_path / "comfy")
    import server

    workers = []
    train_run = import_module(harness.module_name() + ".nodes.train_run")
    original = train_run.WorkerProcess

    def recording_worker(*args, **kwargs):
        worker = original(*args, **kwargs)
        workers.append(worker)
        return worker

    monkeypatch.setattr(train_run, "WorkerProcess", recording_worker)
    return {"nodes": pack, "recorder": recorder, "server": server.PromptServer.instance, "workers": workers}


def run(comfy, node_id: str, unique_id: str = "1", **inputs):
    cls = comfy["nodes"][node_id]
    return harness.run_node(cls, unique_id=unique_id, **{**harness.schema_defaults(cls), **inputs})


def graph(comfy, tmp_path, model_path: Path, validation: bool = False) -> dict:
    """The upstream nodes' outputs: model, dataset and optionally validation settings."""
    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle"})
    inputs = {
        "model": run(comfy, "TunerLoadLumina2", repo_id=str(model_path))[0],
        "dataset": run(comfy, "TunerBuildDataset", folder=str(data), resolution=64.0)[0],
    }
    if validation:
        inputs["validation"] = run(
            comfy,
            "TunerValidationSettings",
            prompt="a red circle",
            resolution="64x64",
            steps=1,
            base_model_samples=False,
        )[0]
    return inputs


def train(comfy, inputs: dict, **widgets):
    values = {"steps": 3, "rank": 4, "learning_rate": 5e-3, "seed": 1, "checkpoint_every": 0, "name": "t"}
    return run(comfy, "TunerTrainLoRA", unique_id="7", **inputs, **{**values, **widgets})


def comfyui_exception_type(klass: type) -> str:
    """What ComfyUI's error dialog shows as the exception type (``full_type_name``, execution.py)."""
    return klass.__qualname__ if klass.__module__ == "builtins" else f"{klass.__module__}.{klass.__qualname__}"


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_train_lora_end_to_end_then_requeue_then_more_steps(comfy, tiny_lumina2, tmp_path):
    import comfy.model_management as mm

    inputs = graph(comfy, tmp_path, tiny_lumina2, validation=True)
    out = train(comfy, inputs)
    lora, lora_path, loss_plot, samples, loss = out.args

    # outputs: ComfyUI-native LoRA, listed by the stock loaders; plot, samples and loss values
    path = Path(lora_path)
    assert path.is_file() and path.parent.name == "comfyui-tuner" and path.parent.parent.name == "loras"
    assert lora and all(k.startswith("diffusion_model.") for k in lora)
    assert any(k.endswith(".alpha") for k in lora) and any(k.endswith(".lora_A.weight") for k in lora)
    assert tuple(loss_plot.shape) == (1, 360, 640, 3)
    assert tuple(samples.shape) == (1, 64, 64, 3) and float(samples.max()) > 0
    assert loss["steps"] == [1, 2, 3] and len(loss["loss"]) == 3
    assert mm.calls[:2] == ["unload_all_models", "soft_empty_cache"]

    # progress bar: every step, and no preview image (ComfyUI draws it up to 512 px under the node,
    # which grew over the nodes below it: the samples are in the extension's bounded area instead)
    updates = comfy["recorder"].updates
    assert {u["node"] for u in updates} == {"7"} and all(u["max"] == 3 for u in updates)
    assert [u["value"] for u in updates][-3:] == [1, 2, 3]
    assert [u["preview"] for u in updates] == [None] * len(updates)

    # websocket messages for the web extension, and its status line the only one: no progress_text,
    # which the frontend draws as a second status under the node (stale after the run on 1.35.9)
    server = comfy["server"]
    assert server.of("progress_text") == []
    assert [p["step"] for p in server.of("comfyui-tuner.progress")] == [1, 2, 3]
    assert all(p["node"] == "7" and p["loss"] > 0 for p in server.of("comfyui-tuner.progress"))
    started = server.of("comfyui-tuner.started")
    assert len(started) == 1 and started[0]["total"] == 3 and started[0]["history"] == []
    ref = server.of("comfyui-tuner.validation")[-1]["images"][0]
    assert ref["type"] == "output" and (tmp_path / "comfy" / "output" / ref["subfolder"] / ref["filename"]).is_file()
    done = server.of("comfyui-tuner.done")[-1]
    assert done["lora_name"] == f"comfyui-tuner/{path.name}" and done["steps"] == 3 and not done["reused"]
    assert comfy["workers"][0].returncode == 0
    # the ui output: done's summary under our own key, for the extension; no "images", which the
    # frontend would stack under the node as previews of its own
    assert out.ui == {"comfyui_tuner": [{k: v for k, v in done.items() if k != "node"}]}
    assert done["images"] == [ref]
    sent = {name.split(".", 1)[1] for name, _, _ in server.messages if name.startswith("comfyui-tuner.")}
    assert sent <= handled_events()  # the web extension handles every message we send

    # re-queue with identical inputs: the finished LoRA at once, no trainer started
    start = time.monotonic()
    again = train(comfy, inputs)
    assert time.monotonic() - start < 5 and len(comfy["workers"]) == 1
    assert again.args[1] == lora_path and again.args[4] == loss
    assert server.of("comfyui-tuner.done")[-1]["reused"]

    # more steps: the same run continues from its latest checkpoint
    longer = train(comfy, inputs, steps=5)
    assert longer.args[1] == lora_path and longer.args[4]["steps"] == [1, 2, 3, 4, 5]
    assert longer.args[4]["loss"][:3] == loss["loss"]
    assert [p["step"] for p in server.of("comfyui-tuner.progress")][-2:] == [4, 5]
    assert server.of("comfyui-tuner.started")[-1]["history"] == [[s, v] for s, v in zip(loss["steps"], loss["loss"])]
    assert any("resumed from step 3" in m["text"] for m in server.of("comfyui-tuner.status"))


def test_cancel_writes_a_checkpoint_stops_the_child_and_reraises(comfy, tiny_lumina2, tmp_path):
    import comfy.model_management as mm

    inputs = graph(comfy, tmp_path, tiny_lumina2)

    def press_cancel(update):
        if update["value"] >= 2:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    comfy["recorder"].on_update = press_cancel
    with pytest.raises(mm.InterruptProcessingException):
        train(comfy, inputs, steps=500)
    worker = comfy["workers"][0]
    assert worker.returncode == 130 and not worker.running
    assert_gone(worker.pid)
    cancelled = comfy["server"].of("comfyui-tuner.cancelled")[0]
    checkpoint = Path(cancelled["checkpoint"])
    assert checkpoint.is_dir() and checkpoint.name == f"step-{cancelled['step']}" and cancelled["step"] >= 2
    assert "Queue again to continue" in cancelled["text"]
    assert comfy["server"].of("progress_text") == []  # the extension shows the text, once
    assert not (checkpoint.parent.parent / "comfyui-tuner-run.json").exists()  # not a finished run


def test_a_crashing_trainer_is_a_clear_node_error(comfy, tiny_lumina2, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_lumina2, broken)
    config = json.loads((broken / "transformer" / "config.json").read_text())
    config["axes_dim_rope"] = 5  # the transformer's constructor raises TypeError in the child
    (broken / "transformer" / "config.json").write_text(json.dumps(config))
    inputs = graph(comfy, tmp_path, broken)
    errors = import_module(harness.module_name() + ".trainer_core.worker")
    with pytest.raises(errors.WorkerError) as failure:
        train(comfy, inputs)
    message = str(failure.value)
    assert "exit code 1" in message and "TypeError" in message and "last lines of the training log" in message
    assert comfyui_exception_type(type(failure.value)) == "Train LoRA"  # not the pack's module path
    assert comfy["server"].of("comfyui-tuner.error")[0]["message"] == message
    assert_gone(comfy["workers"][0].pid)


def test_video_validation_sends_the_frame_strip_not_the_mp4(comfy, tmp_path):
    """A video run's validation event lists an .mp4 next to its frame-strip .png (found by the real-ComfyUI test)."""
    from PIL import Image

    monitor_module = import_module(harness.module_name() + ".nodes.train_monitor")
    folder = tmp_path / "validation" / "step-000002"
    folder.mkdir(parents=True)
    strip = folder / "validation-32x32-frames.png"
    Image.new("RGB", (96, 32), (200, 10, 10)).save(strip)
    (folder / "validation-32x32.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not decodable by PIL")
    monitor = monitor_module.TrainMonitor("9", total=2)
    monitor.handle({"type": "validation", "step": 2, "files": [str(strip), str(folder / "validation-32x32.mp4")]})
    (sent,) = comfy["server"].of("comfyui-tuner.validation")
    assert [image["filename"].endswith(strip.name) for image in sent["images"]] == [True]
    assert all(update["preview"] is None for update in comfy["recorder"].updates)


def test_validation_images_output_carries_every_frame_of_a_clip(comfy, tmp_path):
    """For video the IMAGE output is the clip's frames (for CreateVideo / SaveVideo), not its preview strip."""
    from helpers.datasets import write_moving_square_clip
    from PIL import Image

    images = import_module(harness.module_name() + ".nodes.images")
    clip = write_moving_square_clip(tmp_path / "validation-48x32.mp4", frames=5, seed=0)
    strip = tmp_path / "validation-48x32-frames.png"
    Image.new("RGB", (240, 32)).save(strip)
    still = tmp_path / "other-64x64.png"
    Image.new("RGB", (64, 64), (0, 255, 0)).save(still)
    batch = images.sample_frames([strip, still])
    assert tuple(batch.shape) == (5 + 1, 64, 64, 3)  # five decoded frames, padded to the largest sample, then the image
    assert not batch[0].equal(batch[4])  # the square moved: real frames, not a repeated strip
    assert clip.is_file() and batch[5, 32, 32].tolist() == [0.0, 1.0, 0.0]
