"""Fine-tune Model through the real child process on the tiny Lumina 2, against the ComfyUI stand-in.

The node shares Train LoRA's run machinery (``test_nodes_train.py`` covers its progress bar, messages
and errors in depth); here: the spec it builds (``model_type: full``, its learning rate, the file's
folder), a whole fine-tune through the node, the ``MODEL`` output loaded from the written file by
ComfyUI's loader (``comfy.sd.load_diffusion_model``), the file in ``diffusion_models/comfyui-tuner/``,
re-queueing (same inputs: no training; more steps: continues, the file replaced), and Cancel.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import pytest
import torch
from comfy_stub import harness
from safetensors.torch import load_file
from test_nodes_train import assert_gone, comfyui_exception_type, graph, run
from test_nodes_web import handled_events

from trainer_core.spec import TrainSpec

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    harness.install(tmp_path_factory.mktemp("comfy"))
    _, nodes = harness.load_pack()
    yield nodes
    harness.uninstall()


@pytest.fixture
def comfy(pack, tmp_path, monkeypatch):
    recorder = harness.install(tmp_path / "comfy")
    import comfy.sd as comfy_sd
    import server

    workers = []
    train_run = import_module(harness.module_name() + ".nodes.train_run")
    original = train_run.WorkerProcess

    def recording_worker(*args, **kwargs):
        worker = original(*args, **kwargs)
        workers.append(worker)
        return worker

    monkeypatch.setattr(train_run, "WorkerProcess", recording_worker)
    comfy_sd.LOADED_FILES.clear()
    return {
        "nodes": pack,
        "recorder": recorder,
        "server": server.PromptServer.instance,
        "workers": workers,
        "root": tmp_path / "comfy",
    }


def finetune(comfy, inputs: dict, **widgets):
    values = {"steps": 2, "learning_rate": 1e-3, "seed": 1, "checkpoint_every": 0, "name": "ft"}
    return run(comfy, "TunerFinetuneModel", unique_id="5", **inputs, **{**values, **widgets})


def assemble(comfy, inputs: dict, **widgets) -> TrainSpec:
    train_nodes = import_module(harness.module_name() + ".nodes.train_nodes")
    values = {"steps": 2, "learning_rate": 0.0, "seed": 1, "checkpoint_every": 0, **widgets}
    return train_nodes.assemble_spec(
        model=inputs["model"],
        dataset=inputs["dataset"],
        validation=None,
        optimizer=inputs.get("optimizer"),
        spec=inputs.get("spec"),
        widgets=values,
        name="",
        model_type="full",
    )


def test_the_node_builds_a_full_fine_tune_spec_that_writes_to_diffusion_models(comfy, tmp_path):
    inputs = graph(comfy, tmp_path, Path("/models/tiny"))
    spec = assemble(comfy, inputs)
    assert spec.model.model_type == "full"
    assert spec.optimizer.learning_rate == 1e-5  # not the family's LoRA default (1e-4)
    assert spec.optimizer.max_grad_norm == 1.0  # clipping, recommended for full runs, is the default
    assert spec.export.comfyui_model_dir == str(comfy["root"] / "models" / "diffusion_models" / "comfyui-tuner")
    assert spec.export.comfyui_lora_dir is None  # no LoRA to place
    assert Path(spec.output_dir).name.startswith("lumina2_finetune-")
    assert spec.export.output_name.startswith("lumina2_finetune_")
    # an imported config's learning rate is kept when the widget is 0, and the widget wins otherwise
    imported = {"optimizer": {"learning_rate": 2e-6}}
    assert assemble(comfy, {**inputs, "spec": imported}).optimizer.learning_rate == 2e-6
    assert assemble(comfy, {**inputs, "spec": imported}, learning_rate=3e-6).optimizer.learning_rate == 3e-6
    # a LoRA run of the same inputs is another run, in another folder
    train_nodes = import_module(harness.module_name() + ".nodes.train_nodes")
    lora = train_nodes.assemble_spec(
        model=inputs["model"],
        dataset=inputs["dataset"],
        validation=None,
        optimizer=None,
        spec=None,
        widgets={"steps": 2, "learning_rate": 1e-5, "seed": 1},
        name="",
    )
    assert lora.model.model_type == "lora" and lora.output_dir != spec.output_dir


def test_the_node_refuses_what_a_full_fine_tune_cannot_do_before_any_child(comfy, tmp_path):
    inputs = graph(comfy, tmp_path, Path("/models/tiny"))
    errors = import_module(harness.module_name() + ".trainer_core.errors")
    with pytest.raises(errors.ConfigError, match="use_dora") as failure:
        run(comfy, "TunerFinetuneModel", **inputs, spec={"lora": {"use_dora": True}})
    assert comfyui_exception_type(type(failure.value)) == "Fine-tune Model"
    assert comfy["workers"] == []


def test_fine_tune_end_to_end_then_requeue_then_more_steps(comfy, tiny_lumina2, tmp_path):
    import comfy.sd as comfy_sd

    inputs = graph(comfy, tmp_path, tiny_lumina2, validation=True)
    out = finetune(comfy, inputs)
    model, model_path, loss_plot, samples, loss = out.args

    # the file: ComfyUI's Lumina 2 naming, in diffusion_models/comfyui-tuner/, where Load Diffusion Model lists it
    path = Path(model_path)
    folder = comfy["root"] / "models" / "diffusion_models" / "comfyui-tuner"
    assert path.is_file() and path.parent == folder and path.name.startswith("ft_")
    import folder_paths

    assert f"comfyui-tuner/{path.name}" in folder_paths.get_filename_list("diffusion_models")
    written = load_file(str(path))
    assert "cap_embedder.1.weight" in written and not any("lora" in k for k in written)

    # the MODEL: that file, loaded by ComfyUI's loader, every tensor as written
    assert comfy_sd.LOADED_FILES == [str(path)] and model.name == "lumina2"
    state = model.model_state_dict()
    assert set(state) == {f"diffusion_model.{k}" for k in written}
    assert all(torch.equal(state[f"diffusion_model.{k}"], v) for k, v in written.items())

    # the run: a full fine-tune; its file in the run folder is the same (a hard link, not a copy)
    spec = json.loads((comfy["workers"][0].spec_path).read_text())
    assert spec["model"]["model_type"] == "full"
    run_file = Path(spec["output_dir"]) / path.name
    assert run_file.is_file() and run_file.samefile(path)
    base = load_file(str(next((tiny_lumina2 / "transformer").glob("*.safetensors"))))
    assert not torch.equal(base["x_embedder.weight"], written["x_embedder.weight"].to(base["x_embedder.weight"].dtype))

    # the same outputs and messages as Train LoRA: plot, samples, loss, progress, the done summary
    assert tuple(loss_plot.shape) == (1, 360, 640, 3) and tuple(samples.shape) == (1, 64, 64, 3)
    assert loss["steps"] == [1, 2]
    updates = comfy["recorder"].updates
    assert {u["node"] for u in updates} == {"5"} and [u["value"] for u in updates][-2:] == [1, 2]
    server = comfy["server"]
    assert [p["step"] for p in server.of("comfyui-tuner.progress")] == [1, 2]
    done = server.of("comfyui-tuner.done")[-1]
    assert done["model_name"] == f"comfyui-tuner/{path.name}" and done["model_path"] == str(path)
    assert "lora_name" not in done and not done["reused"]
    assert out.ui == {"comfyui_tuner": [{k: v for k, v in done.items() if k != "node"}]}
    sent = {name.split(".", 1)[1] for name, _, _ in server.messages if name.startswith("comfyui-tuner.")}
    assert sent <= handled_events()

    # re-queue with identical inputs: the finished model, no trainer started
    again = finetune(comfy, inputs)
    assert len(comfy["workers"]) == 1 and again.args[1] == model_path
    assert server.of("comfyui-tuner.done")[-1]["reused"]

    # deleted from diffusion_models by hand: put back from the run folder, still no training
    path.unlink()
    finetune(comfy, inputs)
    assert len(comfy["workers"]) == 1 and path.is_file()

    # more steps: the run continues from its checkpoint, and the file in diffusion_models is the new one
    longer = finetune(comfy, inputs, steps=3)
    assert len(comfy["workers"]) == 2 and longer.args[1] == model_path
    assert longer.args[4]["steps"] == [1, 2, 3] and longer.args[4]["loss"][:2] == loss["loss"]
    assert any("resumed from step 2" in m["text"] for m in server.of("comfyui-tuner.status"))
    newer = load_file(str(path))
    assert Path(spec["output_dir"], path.name).samefile(path)
    assert not torch.equal(newer["x_embedder.weight"], written["x_embedder.weight"])
    reloaded = longer.args[0].model_state_dict()
    assert torch.equal(reloaded["diffusion_model.x_embedder.weight"], newer["x_embedder.weight"])


def test_cancel_writes_a_checkpoint_and_queueing_again_continues(comfy, tiny_lumina2, tmp_path):
    import comfy.model_management as mm

    inputs = graph(comfy, tmp_path, tiny_lumina2)

    def press_cancel(update):
        if update["value"] >= 1:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    comfy["recorder"].on_update = press_cancel
    with pytest.raises(mm.InterruptProcessingException):
        finetune(comfy, inputs, steps=4)
    worker = comfy["workers"][0]
    assert worker.returncode == 130 and not worker.running
    assert_gone(worker.pid)
    cancelled = comfy["server"].of("comfyui-tuner.cancelled")[0]
    checkpoint = Path(cancelled["checkpoint"])
    assert checkpoint.is_dir() and cancelled["step"] >= 1 and "Queue again to continue" in cancelled["text"]
    assert not list((comfy["root"] / "models" / "diffusion_models").rglob("*.safetensors"))  # nothing half-done

    comfy["recorder"].on_update = None
    out = finetune(comfy, inputs, steps=4)
    assert out.args[4]["steps"] == [1, 2, 3, 4] and Path(out.args[1]).is_file()
    status = [m["text"] for m in comfy["server"].of("comfyui-tuner.status")]
    assert any(f"resumed from step {cancelled['step']}" in text for text in status)
