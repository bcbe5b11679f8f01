"""Publishing to the Hugging Face Hub (issue 18): what a run uploads, where, and that it never stops a run.

No test reaches huggingface.co: the uploads either go to a recorder in place of ``HfApi.create_commit``
(the real HfApi otherwise, on an unreachable endpoint) or to ``http://127.0.0.1:9``, where nothing listens.
"""

from __future__ import annotations

import argparse
import json

import pytest
import yaml
from helpers.datasets import lumina_spec, write_dataset
from huggingface_hub import HfApi, ModelCard

from trainer_core import cli
from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.publish import publishing
from trainer_core.publish.hub import UploadItem, checkpoint_plan, final_plan
from trainer_core.publish.model_card import Sample, card_facts, render_card
from trainer_core.simpletuner import UNSUPPORTED_MESSAGE, export_simpletuner, import_simpletuner
from trainer_core.spec import TrainSpec, build_spec
from trainer_core.train.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NOWHERE = "http://127.0.0.1:9"  # the discard port: connections are refused at once


@pytest.fixture(autouse=True)
def no_real_hub(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", NOWHERE)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")


def hub_spec(tiny, data, out, **export) -> TrainSpec:
    return TrainSpec.model_validate(
        lumina_spec(
            tiny,
            data,
            out,
            training={"max_train_steps": 4},
            checkpointing={"checkpoint_step_interval": 2},
            validation={
                "validation_disable": False,
                "validation_prompt": "a red circle",
                "validation_resolution": "64x64",
                "validation_num_inference_steps": 1,
                "disable_benchmark": True,
            },
            export={"push_to_hub": True, "hub_model_id": "me/tiny-lumina-lora", **export},
        )
    )


# ---------------------------------------------------------------------------------------- the model card
def test_model_card_parses_with_huggingface_hub_and_carries_the_training_facts(tmp_path):
    spec = TrainSpec.model_validate(
        {
            "model": {"model_family": "lumina2", "model_flavour": "2.0"},
            "lora": {"lora_rank": 16, "lora_alpha": 8},
            "optimizer": {"optimizer": "adamw_bf16", "learning_rate": 1e-4},
            "validation": {"validation_prompt": "sks dog on a beach", "validation_negative_prompt": "blurry"},
            "datasets": [
                {
                    "id": "dog",
                    "instance_data_dir": str(tmp_path),
                    "caption_strategy": "instanceprompt",
                    "instance_prompt": "sks dog",
                    "resolution": 1024,
                    "resolution_type": "pixel_area",
                }
            ],
            "export": {"push_to_hub": True, "hub_model_id": "me/dog", "model_card_note": "Trained on my dog."},
        }
    )
    facts = card_facts(
        spec,
        base_model="Alpha-VLLM/Lumina-Image-2.0",
        steps=500,
        samples=[Sample("assets/validation-1024x1024.png", "sks dog on a beach")],
        files={"diffusers": "pytorch_lora_weights.safetensors", "comfyui": "dog_comfyui.safetensors"},
    )
    text = render_card(facts)

    card = ModelCard(text)  # huggingface_hub's own parser
    meta = card.data.to_dict()
    assert meta["base_model"] == "Alpha-VLLM/Lumina-Image-2.0"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"lumina2", "lora", "comfyui", "not-for-all-audiences"} <= set(meta["tags"])
    assert meta["instance_prompt"] == "sks dog"
    assert meta["widget"] == [
        {
            "text": "sks dog on a beach",
            "parameters": {"negative_prompt": "blurry"},
            "output": {"url": "assets/validation-1024x1024.png"},
        }
    ]
    settings = meta["comfyui_tuner"]
    assert settings["rank"] == 16 and settings["alpha"] == 8 and settings["learning_rate"] == 1e-4
    assert settings["steps"] == 500 and settings["optimizer"] == "adamw_bf16"
    assert settings["resolution"] == ["1024 (pixel_area)"]
    # the YAML block is plain YAML too (what the Hub reads), and the text says how to load each file
    assert yaml.safe_load(text.split("---")[1]) == meta
    assert "Trained on my dog." in card.text and "![sks dog on a beach](assets/validation-1024x1024.png)" in card.text
    assert 'weight_name="pytorch_lora_weights.safetensors"' in card.text and "dog_comfyui.safetensors" in card.text


def test_model_card_of_a_lycoris_and_a_safe_for_work_card():
    spec = TrainSpec.model_validate(
        {
            "lora": {"lora_type": "lycoris", "lycoris": {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1}},
            "export": {"push_to_hub": True, "hub_model_id": "me/x", "model_card_safe_for_work": True},
        }
    )
    facts = card_facts(spec, base_model="Alpha-VLLM/Lumina-Image-2.0", steps=10, samples=[], files={})
    meta = ModelCard(render_card(facts)).data.to_dict()
    assert {"lora", "lycoris", "safe-for-work"} <= set(meta["tags"]) and "not-for-all-audiences" not in meta["tags"]
    assert meta["comfyui_tuner"]["adapter"] == "lycoris-lokr" and meta["comfyui_tuner"]["rank"] == 10000
    assert "widget" not in meta


# ---------------------------------------------------------------------------------------- a run, published
class Recorder:
    """Stands in for the Hub's two write calls; everything else of HfApi is the real one."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.commits: list[tuple[str, list[tuple[str, str]]]] = []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})

    def create_commit(self, repo_id, operations, **kwargs):
        ops = [(str(op.path_or_fileobj), op.path_in_repo) for op in operations]
        self.commits.append((repo_id, ops))


@pytest.fixture(scope="module")
def published_run(tiny_lumina2, tmp_path_factory):
    """A 4-step tiny Lumina 2 run with checkpoints every 2 steps, published with push_checkpoints_to_hub."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", NOWHERE)
    mp.setenv("HF_TOKEN", "hf_test_token_not_real")
    recorder = Recorder()
    mp.setattr(HfApi, "create_repo", lambda api, *args, **kwargs: recorder.create_repo(*args, **kwargs))
    mp.setattr(HfApi, "create_commit", lambda api, *args, **kwargs: recorder.create_commit(*args, **kwargs))
    root = tmp_path_factory.mktemp("published")
    data = write_dataset(root / "data", {"img": "a red circle, tunertest style"})
    spec = hub_spec(tiny_lumina2, data, root / "out", push_checkpoints_to_hub=True, model_card_private=False)
    plans: list[tuple[str, list[UploadItem]]] = []
    sink = ListSink()
    try:
        with publishing(spec, sink, plan_hook=lambda what, plan: plans.append((what, plan))) as publisher:
            result = Trainer(spec, publisher).run()
    finally:
        mp.undo()
    return spec, result, sink, plans, recorder


def test_the_uploads_are_exactly_the_plans(published_run):
    spec, result, sink, plans, recorder = published_run
    assert recorder.repos == [{"repo_id": "me/tiny-lumina-lora", "private": False, "exist_ok": True}]
    assert [w["message"] for w in sink.of("warning") if "Hub" in w["message"]] == []
    # one commit per plan, in order, with the same files at the same paths
    assert [(spec.export.hub_model_id, [(str(i.local), i.path_in_repo) for i in plan]) for _, plan in plans] == (
        recorder.commits
    )
    assert [e["what"] for e in sink.of("published")] == [what for what, _ in plans]


def test_the_final_upload_holds_both_lora_formats_samples_spec_and_card(published_run):
    spec, result, sink, plans, recorder = published_run
    what, final = plans[-1]
    assert what == "final model (4 steps)"
    paths = {i.path_in_repo: i.local for i in final}
    assert paths["pytorch_lora_weights.safetensors"] == result.lora.diffusers
    assert paths[result.lora.comfyui.name] == result.lora.comfyui
    assert result.lora.comfyui.name.endswith("_comfyui.safetensors")
    samples = [p for p in paths if p.startswith("assets/") and p != "assets/loss.png"]
    last_step = [f"assets/{f.name}" for f in result.validation_files if f.parent.name == "step-000004"]
    assert sorted(samples) == sorted(last_step) and samples  # the last step's renders only
    assert samples == ["assets/validation-64x64.png", "assets/unconditional-64x64.png"]  # prompted first
    assert paths["assets/loss.png"] == result.loss_plot
    assert json.loads(paths["comfyui_tuner_spec.json"].read_text())["optimizer"]["learning_rate"] == 5e-3
    card = ModelCard(paths["README.md"].read_text())
    assert card.data.base_model == "Alpha-VLLM/Lumina-Image-2.0"  # the flavour's Hub repo: the run used local files
    assert [w["output"]["url"] for w in card.data.widget] == samples
    assert [w["text"] for w in card.data.widget] == ["a red circle", ""]
    assert card.data.to_dict()["comfyui_tuner"]["steps"] == 4
    assert all(local.is_file() for local in paths.values())


def test_checkpoints_go_to_their_own_folder_in_the_repo(published_run):
    spec, result, sink, plans, recorder = published_run
    checkpoints = [(what, plan) for what, plan in plans if what.startswith("checkpoint")]
    assert [what for what, _ in checkpoints] == ["checkpoint step-2", "checkpoint step-4"]
    step2 = sorted(i.path_in_repo for i in checkpoints[0][1])
    assert step2 == sorted(
        ["checkpoints/step-2/pytorch_lora_weights.safetensors", "checkpoints/step-2/comfyui_tuner_spec.json"]
        + [f"checkpoints/step-2/{result.lora.comfyui.name}"]
    )  # the weights, not the optimizer state


def test_a_full_fine_tune_uploads_its_pipeline_folder_and_comfyui_file(tmp_path):
    """The plan of a model_type full run, from its ``done`` event: the diffusers pipeline at the repository
    root (the base's parts it links included), the ComfyUI model file beside it; checkpoints: the weight shards."""
    out = tmp_path / "out"
    base_vae = tmp_path / "base" / "vae"
    base_vae.mkdir(parents=True)
    (base_vae / "config.json").write_text("{}")
    pipeline = out / "ft"
    (pipeline / "transformer").mkdir(parents=True)
    for name in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "model_index.json"):
        (pipeline / name).write_text("x")
    (pipeline / "vae").symlink_to(base_vae, target_is_directory=True)  # a fine-tune links the base's other parts
    comfy = out / "ft_comfyui.safetensors"
    comfy.write_text("x")
    spec = TrainSpec.model_validate(
        {
            "output_dir": str(out),
            "model": {"model_type": "full"},
            "export": {"push_to_hub": True, "hub_model_id": "me/ft"},
        }
    )
    done = {"steps": 3, "lora": {"diffusers": str(pipeline), "comfyui": str(comfy)}, "validation_files": []}
    plan = final_plan(spec, done, base_model="Alpha-VLLM/Lumina-Image-2.0")
    assert [i.path_in_repo for i in plan] == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "ft_comfyui.safetensors",
        "comfyui_tuner_spec.json",
        "README.md",
    ]
    meta = ModelCard((out / "hub" / "README.md").read_text()).data.to_dict()
    assert "full" in meta["tags"] and "lora" not in meta["tags"] and "rank" not in meta["comfyui_tuner"]

    step = out / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    for name in ("adapter-00001-of-00002.safetensors", "adapter-00002-of-00002.safetensors", "adapter.index.json"):
        (step / name).write_text("x")
    (step / "optimizer.pt").write_text("x")
    (step / "spec.json").write_text(spec.to_json())
    assert sorted(i.path_in_repo for i in checkpoint_plan(spec, step)) == [
        "checkpoints/step-3/adapter-00001-of-00002.safetensors",
        "checkpoints/step-3/adapter-00002-of-00002.safetensors",
        "checkpoints/step-3/adapter.index.json",
        "checkpoints/step-3/comfyui_tuner_spec.json",
    ]


def test_an_unreachable_hub_is_a_warning_and_the_run_finishes(tiny_lumina2, tmp_path):
    data = write_dataset(tmp_path / "data", {"img": "a red circle"})
    spec = hub_spec(tiny_lumina2, data, tmp_path / "out", push_checkpoints_to_hub=True)
    spec = spec.model_copy(update={"validation": spec.validation.model_copy(update={"validation_disable": True})})
    sink = ListSink()
    code = cli._run_spec(spec, argparse.Namespace(device="cpu", watch_stdin=False), sink)  # the CLI's and node's path
    assert code == 0
    assert sink.of("done") and sink.of("done")[0]["steps"] == 4
    failures = [w["message"] for w in sink.of("warning") if "Hub upload" in w["message"]]
    assert failures, sink.of("warning")
    assert all("me/tiny-lumina-lora failed (" in m and "training goes on" in m for m in failures)
    assert not sink.of("published")
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()  # the files stay local


def test_no_token_is_said_up_front(tiny_lumina2, tmp_path, monkeypatch):
    from trainer_core.publish import HubPublisher

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    spec = TrainSpec.model_validate({"export": {"push_to_hub": True, "hub_model_id": "me/x"}})
    sink = ListSink()
    HubPublisher(spec, sink).close(5)
    assert any("no Hugging Face token" in w["message"] for w in sink.of("warning"))


# ---------------------------------------------------------------------------------------- settings
def test_hub_model_id_is_required_before_any_model_loads(tmp_path):
    spec = {
        "model": {"pretrained_model_name_or_path": str(tmp_path / "no-such-model")},
        "export": {"push_to_hub": True},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="push_to_hub needs hub_model_id"):
        TrainSpec.load(tmp_path / "spec.json")
    with pytest.raises(ConfigError, match="not a Hub repository id"):
        build_spec({"export": {"hub_model_id": "me/two/slashes"}}, source="test")
    url = TrainSpec.model_validate({"export": {"hub_model_id": "https://huggingface.co/me/x/"}})
    assert url.export.hub_model_id == "me/x"


def test_simpletuner_publishing_keys_import_and_export():
    config = {
        "model_family": "lumina2",
        "push_to_hub": "true",
        "push_checkpoints_to_hub": True,
        "hub_model_id": "me/lumina-lora",
        "model_card_private": False,
        "model_card_safe_for_work": True,
        "model_card_note": "A note.",
    }
    result = import_simpletuner(config, [])
    e = result.spec.export
    assert (e.push_to_hub, e.push_checkpoints_to_hub, e.hub_model_id) == (True, True, "me/lumina-lora")
    assert (e.model_card_private, e.model_card_safe_for_work, e.model_card_note) == (False, True, "A note.")
    assert not [w for w in result.warnings if w.startswith(UNSUPPORTED_MESSAGE)]

    exported, datasets = export_simpletuner(result.spec)
    # top-level SimpleTuner keys, not in our own block
    assert exported["push_to_hub"] is True and exported["push_checkpoints_to_hub"] is True
    assert exported["hub_model_id"] == "me/lumina-lora" and exported["model_card_safe_for_work"] is True
    assert exported["model_card_private"] is False  # SimpleTuner's default is private: a public repo is stated
    assert import_simpletuner(exported, datasets).spec == result.spec


def test_simpletuner_push_to_hub_without_a_repo_is_refused():
    with pytest.raises(ConfigError, match="hub_model_id"):
        import_simpletuner({"model_family": "lumina2", "push_to_hub": True}, [])


# ---------------------------------------------------------------------------------------- the node
@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from comfy_stub import harness

    harness.install(tmp_path_factory.mktemp("comfy"))
    module, nodes = harness.load_pack()
    yield module, nodes
    harness.uninstall()


@pytest.fixture
def comfy(pack, tmp_path):
    from comfy_stub import harness

    harness.install(tmp_path / "comfy")
    return {"nodes": pack[1], "root": tmp_path / "comfy"}


def test_the_publish_node_feeds_train_lora_and_fine_tune_model_without_changing_the_run_folder(comfy, tmp_path):
    from test_nodes import assemble, fragments, run

    out = run(comfy, "TunerPublish", repo_id="https://huggingface.co/me/circles", push_checkpoints=True)
    assert out[0] == {
        "export": {
            "push_to_hub": True,
            "hub_model_id": "me/circles",
            "model_card_private": True,
            "push_checkpoints_to_hub": True,
            "model_card_safe_for_work": False,
            "model_card_note": None,
        }
    }
    model, dataset, _ = fragments(comfy, tmp_path)
    for model_type in ("lora", "full"):
        plain = assemble(comfy, model=model, dataset=dataset, model_type=model_type)
        published = assemble(comfy, model=model, dataset=dataset, publish=out[0], model_type=model_type)
        e = published.export
        assert (e.push_to_hub, e.hub_model_id, e.push_checkpoints_to_hub) == (True, "me/circles", True)
        assert published.output_dir == plain.output_dir  # the run folder's hash ignores publishing
        assert e.output_name == plain.export.output_name and not plain.export.push_to_hub

    for node_id in ("TunerTrainLoRA", "TunerFinetuneModel"):  # last, so saved workflows keep their links
        inputs = comfy["nodes"][node_id].GET_SCHEMA().inputs
        assert [i.id for i in inputs[-3:]] == ["regularisers", "tracking", "publish"] and inputs[-1].optional


def test_the_publish_node_refuses_a_missing_or_malformed_repo_id(comfy):
    from test_nodes import pack_errors, run

    with pytest.raises(pack_errors().ConfigError, match="push_to_hub needs hub_model_id"):
        run(comfy, "TunerPublish", repo_id=" ")
    with pytest.raises(pack_errors().ConfigError, match="not a Hub repository id"):
        run(comfy, "TunerPublish", repo_id="me/two/slashes")
