"""The node layer against the ComfyUI stand-in: registration, every schema, and every node that runs in-process.

Training through the child process is in ``test_nodes_train.py``; workflows in ``test_nodes_workflows.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
from comfy_stub import harness
from helpers.datasets import write_dataset, write_video_dataset

EXPECTED_NODES = {
    "TunerLoadLumina2": "Tuner/models",
    "TunerLoadKandinsky5Flavour": "Tuner/models",
    "TunerCacheEmbeds": "Tuner/train",
    "TunerBuildDataset": "Tuner/dataset",
    "TunerValidationSettings": "Tuner/settings",
    "TunerValidationVideoOptions": "Tuner/settings",
    "TunerOptimizerSettings": "Tuner/settings",
    "TunerConfigureOffloadQuant": "Tuner/settings",
    "TunerTreadRoute": "Tuner/settings",
    "TunerAdapterSettings": "Tuner/settings",
    "TunerRegularisers": "Tuner/settings",
    "TunerTracking": "Tuner/settings",
    "TunerPublish": "Tuner/settings",
    "TunerVideoOptions": "Tuner/dataset",
    "TunerImportSimpleTunerConfig": "Tuner/config",
    "TunerTrainLoRA": "Tuner/train",
    "TunerFinetuneModel": "Tuner/train",
    "TunerApplyTrainedLoRA": "Tuner/lora",
    "TunerLossGraph": "Tuner/lora",
}
STOCK_IDS = {"TrainLoraNode", "LoraModelLoader", "SaveLoRA", "LossGraphNode", "LoraLoader", "LoraLoaderModelOnly"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    harness.install(tmp_path_factory.mktemp("comfy"))
    module, nodes = harness.load_pack()
    yield module, nodes
    harness.uninstall()


@pytest.fixture
def comfy(pack, tmp_path):
    """A fresh ComfyUI tree, server and progress hook per test; the pack stays loaded."""
    recorder = harness.install(tmp_path / "comfy")
    import server

    return {"nodes": pack[1], "recorder": recorder, "server": server.PromptServer.instance, "root": tmp_path / "comfy"}


def pack_errors():
    """The pack's own ``trainer_core.errors`` (ComfyUI imports the pack's copy, not the top-level one)."""
    return import_module(harness.module_name() + ".trainer_core.errors")


def run(comfy, node_id: str, **inputs):
    cls = comfy["nodes"][node_id]
    return harness.run_node(cls, **{**harness.schema_defaults(cls), **inputs})


# ---------------------------------------------------------------------- registration and schemas
def test_the_pack_registers_its_nodes_through_the_v3_entrypoint(pack):
    module, nodes = pack
    assert module.WEB_DIRECTORY == "./web" and (harness.PACK_DIR / "web").is_dir()
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # it would make ComfyUI take the V1 path
    assert set(nodes) == set(EXPECTED_NODES)
    assert not set(nodes) & STOCK_IDS


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_every_schema_is_prefixed_categorised_documented_and_has_tooltips(pack, node_id):
    cls = pack[1][node_id]
    schema = cls.GET_SCHEMA()
    assert schema.node_id == node_id and node_id.startswith("Tuner")
    assert schema.category == EXPECTED_NODES[node_id]
    assert schema.display_name and schema.description
    for item in schema.inputs:
        assert item.tooltip and len(item.tooltip) > 15, f"{node_id}.{item.id} has no useful tooltip"
    for item in schema.outputs:
        assert item.tooltip, f"{node_id} output {item.id} has no tooltip"
    for item in schema.inputs:  # the frontend randomises a seed on every queue unless told not to
        if item.id in ("seed", "noise_seed"):
            assert item.control_after_generate is False, f"{node_id}.{item.id}"
    assert cls.overrides("define_schema") and cls.overrides("execute") and not cls.is_async()
    doc = harness.PACK_DIR / "web" / "docs" / f"{node_id}.md"
    assert doc.is_file() and doc.read_text().startswith("# ")
    for item in schema.inputs:  # the help page names every input
        assert f"`{item.id}`" in doc.read_text(), f"{doc.name} does not describe {item.id}"


def test_importing_the_pack_entry_is_cheap():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(harness.PACK_DIR / '__init__.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module\n"
        "spec.loader.exec_module(module)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'comfy_api', 'pack.nodes') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- Load Lumina2
def test_load_lumina2_picks_weights_from_the_diffusers_folder_or_a_typed_repo(pack, comfy):
    from trainer_core.families.lumina2 import Lumina2Family

    diffusers = comfy["root"] / "models" / "diffusers"
    (diffusers / "lumina" / "Lumina-Image-2.0").mkdir(parents=True)
    (diffusers / "lumina" / "Lumina-Image-2.0" / "model_index.json").write_text("{}")
    (diffusers / "not-a-model").mkdir()
    cls = comfy["nodes"]["TunerLoadLumina2"]
    inputs = {i.id: i for i in cls.GET_SCHEMA().inputs}
    assert inputs["flavour"].options == list(Lumina2Family.flavours)
    assert inputs["weights"].options[1:] == ["lumina/Lumina-Image-2.0"]

    out = run(comfy, "TunerLoadLumina2", weights="lumina/Lumina-Image-2.0", flavour="neta-lumina")
    model = out[0]["model"]
    assert model["pretrained_model_name_or_path"] == str(diffusers / "lumina" / "Lumina-Image-2.0")
    assert model["model_flavour"] == "neta-lumina" and model["system_prompt"] is None
    typed = run(comfy, "TunerLoadLumina2", repo_id=" someone/lumina-finetune ", system_prompt="You draw maps.")[0]
    assert typed["model"]["pretrained_model_name_or_path"] == "someone/lumina-finetune"
    assert typed["model"]["system_prompt"] == "You draw maps."
    assert run(comfy, "TunerLoadLumina2")[0]["model"]["pretrained_model_name_or_path"] is None  # the flavour's repo
    with pytest.raises(pack_errors().ModelLoadError, match="model_index.json"):
        run(comfy, "TunerLoadLumina2", weights="gone/away")


# ---------------------------------------------------------------------- Load Kandinsky5 Flavour
def test_load_kandinsky5_lists_every_registered_kandinsky5_flavour_and_its_presets(pack, comfy):
    from trainer_core.families import family_names, get_family_class
    from trainer_core.families.kandinsky5_image import Kandinsky5ImageFamily

    families = [get_family_class(n) for n in family_names() if n.startswith("kandinsky5")]
    assert Kandinsky5ImageFamily in families  # video flavours join the list once that family is registered
    inputs = {i.id: i for i in comfy["nodes"]["TunerLoadKandinsky5Flavour"].GET_SCHEMA().inputs}
    assert inputs["flavour"].options == [name for family in families for name in family.flavours]
    assert set(Kandinsky5ImageFamily.flavours) <= set(inputs["flavour"].options)
    assert inputs["flavour"].default == Kandinsky5ImageFamily.default_flavour == "t2i-lite-sft"
    assert inputs["lora_targets"].options == ["default", *Kandinsky5ImageFamily.lora_presets]
    for name, flavour in Kandinsky5ImageFamily.flavours.items():
        assert f"{name} = {flavour.description}" in inputs["flavour"].tooltip


def test_load_kandinsky5_gives_the_model_section_and_the_lora_preset(pack, comfy):
    diffusers = comfy["root"] / "models" / "diffusers" / "k5"
    diffusers.mkdir(parents=True)
    (diffusers / "model_index.json").write_text("{}")
    out = run(comfy, "TunerLoadKandinsky5Flavour")[0]
    assert out == {
        "model": {
            "model_family": "kandinsky5-image",
            "model_flavour": "t2i-lite-sft",
            "pretrained_model_name_or_path": None,
        }
    }
    picked = run(
        comfy, "TunerLoadKandinsky5Flavour", flavour="t2i-lite-pretrain", weights="k5", lora_targets="attention"
    )
    assert picked[0]["model"]["pretrained_model_name_or_path"] == str(diffusers)
    assert picked[0]["model"]["model_flavour"] == "t2i-lite-pretrain"
    assert picked[0]["lora"] == {"lora_target_preset": "attention"}
    typed = run(comfy, "TunerLoadKandinsky5Flavour", repo_id="someone/k5-finetune", weights="k5")[0]
    assert typed["model"]["pretrained_model_name_or_path"] == "someone/k5-finetune"
    with pytest.raises(pack_errors().ConfigError, match="not a Kandinsky 5 flavour"):
        run(comfy, "TunerLoadKandinsky5Flavour", flavour="2.0")


def test_train_lora_takes_the_kandinsky5_model_and_leaves_its_defaults_to_the_engine(comfy, tmp_path):
    from trainer_core.train.resolve import resolve_spec

    data = write_dataset(tmp_path / "photos", {"a": "a red circle"})
    model = run(comfy, "TunerLoadKandinsky5Flavour", repo_id="/models/k5", lora_targets="attention+ffn")[0]
    dataset = run(comfy, "TunerBuildDataset", folder=str(data), resolution=64.0)[0]
    spec = assemble(comfy, model=model, dataset=dataset, name="")
    assert Path(spec.output_dir).name.startswith("kandinsky5-image_lora-")
    assert spec.export.output_name.startswith("kandinsky5-image_lora_")
    assert spec.model.model_family == "kandinsky5-image" and spec.lora.lora_target_preset == "attention+ffn"
    # the node sets none of the family's defaults: the engine's resolve step does
    assert spec.training.flow_schedule_shift is None and spec.validation.validation_guidance is None
    resolved, family, _ = resolve_spec(spec)
    assert resolved.training.flow_schedule_shift == 1.0 and family.sampling_shift == 3.0
    assert resolved.validation.validation_guidance == 5.0 and resolved.training.aspect_bucket_alignment == 16
    other = assemble(comfy, model={**model, "lora": {"lora_target_preset": "attention"}}, dataset=dataset, name="")
    assert other.output_dir != spec.output_dir  # other LoRA targets: another run


# ---------------------------------------------------------------------- Build Dataset
def test_build_dataset_checks_the_folder_and_chains(comfy, tmp_path):
    one = write_dataset(tmp_path / "photos", {"a": "a red circle", "b": "a blue circle"})
    two = write_dataset(comfy["root"] / "input" / "more" / "photos", {"c": "a green circle"})
    first = run(comfy, "TunerBuildDataset", folder=str(one), resolution=512.0, instance_prompt="tnr style")
    assert "2 image(s)" in first.ui.as_dict()["text"][0]
    second = run(comfy, "TunerBuildDataset", folder="more/photos", dataset=first[0], repeats=2)
    datasets = second[0]["datasets"]
    assert [d["id"] for d in datasets] == ["photos", "photos-2"]
    assert datasets[0]["prepend_instance_prompt"] and datasets[0]["instance_prompt"] == "tnr style"
    assert datasets[0]["resolution"] == 512.0 and datasets[1]["repeats"] == 2
    assert datasets[1]["instance_data_dir"] == str(two)
    json.dumps(second[0])  # plain data only


def test_build_dataset_names_every_problem_up_front(comfy, tmp_path):
    errors = pack_errors()
    with pytest.raises(errors.DatasetError, match="does not exist"):
        run(comfy, "TunerBuildDataset", folder=str(tmp_path / "nope"))
    data = write_dataset(tmp_path / "d", {"a": "x", "b": "y"})
    (data / "b.txt").unlink()
    with pytest.raises(errors.DatasetError, match=r"b\.png") as err:
        run(comfy, "TunerBuildDataset", folder=str(data))
    assert "caption" in str(err.value)
    with pytest.raises(errors.ConfigError, match="instance_prompt"):
        run(comfy, "TunerBuildDataset", folder=str(data), caption_strategy="instanceprompt")


def test_build_dataset_reference_folder_pairs_images_for_image_editing(comfy, tmp_path):
    edits = write_dataset(tmp_path / "a" / "edits", {"cat": "make it blue", "dog": "make it red"})
    refs = write_dataset(tmp_path / "a" / "refs", {"cat": "", "dog": ""})
    first = run(comfy, "TunerBuildDataset", folder=str(edits), reference_folder=str(refs))
    assert "2 image pair(s)" in first.ui.as_dict()["text"][0]
    more = write_dataset(tmp_path / "b" / "edits", {"owl": "make it green"})
    more_refs = write_dataset(tmp_path / "b" / "refs", {"owl": ""})
    second = run(comfy, "TunerBuildDataset", folder=str(more), reference_folder=str(more_refs), dataset=first[0])
    datasets = second[0]["datasets"]
    assert [(d["id"], d.get("dataset_type", "image")) for d in datasets] == [
        ("edits-refs", "conditioning"), ("edits", "image"), ("edits-refs-2", "conditioning"), ("edits-2", "image"),
    ]  # fmt: skip
    assert [d.get("conditioning_data") for d in datasets[1::2]] == ["edits-refs", "edits-refs-2"]  # renamed pairs
    cls = comfy["nodes"]["TunerBuildDataset"]
    before = cls.fingerprint_inputs(folder=str(edits), reference_folder=str(refs))
    (refs / "dog.png").unlink()
    assert cls.fingerprint_inputs(folder=str(edits), reference_folder=str(refs)) != before
    with pytest.raises(pack_errors().DatasetError, match=r"dog\.png: no reference image dog"):
        run(comfy, "TunerBuildDataset", folder=str(edits), reference_folder=str(refs))


def test_build_dataset_fingerprint_follows_the_files_not_their_times(comfy, tmp_path):
    import os

    cls = comfy["nodes"]["TunerBuildDataset"]
    data = write_dataset(tmp_path / "d", {"a": "a red circle"})
    first = cls.fingerprint_inputs(folder=str(data))
    os.utime(data / "a.png", (1, 1))
    assert cls.fingerprint_inputs(folder=str(data)) == first
    (data / "a.txt").write_text("a red circle, edited\n")
    edited = cls.fingerprint_inputs(folder=str(data))
    assert edited != first
    write_dataset(data, {"a": "a red circle, edited", "z": "new"})
    assert cls.fingerprint_inputs(folder=str(data)) not in (first, edited)


# ---------------------------------------------------------------------- settings
def test_validation_and_optimizer_settings_are_spec_sections(comfy):
    val = run(comfy, "TunerValidationSettings", prompt="a red circle", every_n_steps=50, resolution="512x512")[0]
    v = val["validation"]
    assert v["validation_prompt"] == "a red circle" and v["validation_step_interval"] == 50
    assert v["validation_guidance"] is None and v["disable_benchmark"] is False
    assert v["validation_disable_unconditional"] is True
    with pytest.raises(pack_errors().ConfigError, match="needs a prompt"):
        run(comfy, "TunerValidationSettings")
    with pytest.raises(pack_errors().ConfigError, match="validation_resolution"):
        run(comfy, "TunerValidationSettings", prompt="x", resolution="big")
    assert "validation_num_video_frames" not in v and "framerate" not in v  # unset: the family's defaults
    opt = run(comfy, "TunerOptimizerSettings", optimizer="prodigy", batch_size=2, use_ema=True)[0]
    assert opt["optimizer"]["optimizer"] == "prodigy" and opt["training"]["train_batch_size"] == 2
    assert opt["training"]["use_ema"] is True and set(opt) == {"optimizer", "training"}


def test_video_validation_options_live_on_their_own_node(comfy):
    """Image graphs show no video widgets: clip length and frame rate come from Validation Video Options."""
    widgets = {i.id for i in comfy["nodes"]["TunerValidationSettings"].GET_SCHEMA().inputs if i.is_widget}
    assert not any("video" in name or "frame" in name for name in widgets), widgets
    video = run(comfy, "TunerValidationVideoOptions", frames=33, frame_rate=12.0)[0]
    clip = run(comfy, "TunerValidationSettings", prompt="x", video=video)[0]["validation"]
    assert clip["validation_num_video_frames"] == 33 and clip["framerate"] == 12.0
    defaults = run(comfy, "TunerValidationSettings", prompt="x", video=run(comfy, "TunerValidationVideoOptions")[0])
    v = defaults[0]["validation"]
    assert v["validation_num_video_frames"] is None and v["framerate"] is None  # 0: the family's defaults
    with pytest.raises(pack_errors().ConfigError, match="framerate"):
        run(comfy, "TunerValidationVideoOptions", frame_rate=-1.0)


# ---------------------------------------------------------------------- Import SimpleTuner Config
def write_simpletuner(folder: Path, data: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multidatabackend.json").write_text(
        json.dumps(
            [
                {"id": "photos", "type": "local", "instance_data_dir": data.name, "caption_strategy": "textfile"},
                {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True},
            ]
        )
    )
    config = {
        "model_family": "lumina2",
        "model_flavour": "2.0",
        "data_backend_config": "multidatabackend.json",
        "max_train_steps": 300,
        "lora_rank": 8,
        "learning_rate": 2e-4,
        "output_dir": "output/models",
        "disable_tf32": True,
        "push_to_hub": True,
        "hub_model_id": "me/my-lora",
        **extra,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def test_import_simpletuner_config_gives_a_spec_with_absolute_paths_and_warnings(comfy, tmp_path):
    data = write_dataset(tmp_path / "st" / "photos", {"a": "x"})
    config = write_simpletuner(tmp_path / "st", data)
    out = run(comfy, "TunerImportSimpleTunerConfig", config_path=str(config))
    spec, warnings = out[0], out[1]
    assert spec["training"]["max_train_steps"] == 300 and spec["lora"]["lora_rank"] == 8
    assert spec["datasets"][0]["instance_data_dir"] == str(data)
    assert "output_dir" not in spec
    assert "disable_tf32" in warnings
    assert "imported config.json" in out.ui.as_dict()["text"][0]
    cls = comfy["nodes"]["TunerImportSimpleTunerConfig"]
    before = cls.fingerprint_inputs(config_path=str(config), backend_path="")
    write_simpletuner(tmp_path / "st", data, lora_rank=16)
    assert cls.fingerprint_inputs(config_path=str(config), backend_path="") != before
    with pytest.raises(pack_errors().ConfigError, match="does not exist"):
        run(comfy, "TunerImportSimpleTunerConfig", config_path=str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------- Train LoRA settings (no training)
def fragments(comfy, tmp_path, tiny: Path | str = "/models/tiny"):
    data = write_dataset(tmp_path / "photos", {"a": "a red circle", "b": "a blue circle"})
    model = run(comfy, "TunerLoadLumina2", repo_id=str(tiny))[0]
    dataset = run(comfy, "TunerBuildDataset", folder=str(data), resolution=64.0)[0]
    return model, dataset, data


def assemble(comfy, **kwargs):
    train_nodes = import_module(harness.module_name() + ".nodes.train_nodes")
    widgets = {"steps": 10, "rank": 4, "alpha": 0.0, "learning_rate": 0.0, "seed": 1, "checkpoint_every": 5}
    widgets.update(kwargs.pop("widgets", {}))
    args = {"model": None, "dataset": None, "validation": None, "optimizer": None, "spec": None, "name": "t"}
    return train_nodes.assemble_spec(**{**args, **kwargs, "widgets": widgets})


def test_train_lora_merges_fragments_and_names_the_run_after_its_training_identity(comfy, tmp_path):
    model, dataset, data = fragments(comfy, tmp_path)
    spec = assemble(comfy, model=model, dataset=dataset)
    root = comfy["root"]
    assert Path(spec.output_dir).parent == root / "output" / "comfyui-tuner"
    assert spec.export.comfyui_lora_dir == str(root / "models" / "loras" / "comfyui-tuner")
    assert spec.training.max_train_steps == 10 and spec.lora.lora_rank == 4 and spec.lora.lora_alpha is None
    assert spec.text_cache_dir() == root / "output" / "comfyui-tuner" / "cache" / "text"
    assert str(spec.vae_cache_dir(spec.image_datasets[0])).startswith(str(root / "output" / "comfyui-tuner" / "cache"))

    val = run(comfy, "TunerValidationSettings", prompt="a red circle")[0]
    more_steps = assemble(comfy, model=model, dataset=dataset, validation=val, widgets={"steps": 20})
    assert more_steps.output_dir == spec.output_dir  # continues the same run
    assert assemble(comfy, model=model, dataset=dataset, widgets={"rank": 8}).output_dir != spec.output_dir
    assert assemble(comfy, model=model, dataset=dataset, widgets={"seed": 2}).output_dir != spec.output_dir
    write_dataset(data, {"a": "a red circle", "b": "a blue circle", "c": "a new image"})
    assert assemble(comfy, model=model, dataset=dataset).output_dir != spec.output_dir


def test_train_lora_widgets_keep_an_imported_config_when_zero(comfy, tmp_path):
    data = write_dataset(tmp_path / "st" / "photos", {"a": "x"})
    imported = run(comfy, "TunerImportSimpleTunerConfig", config_path=str(write_simpletuner(tmp_path / "st", data)))[0]
    keep = {"steps": 0, "rank": 0, "alpha": 0.0, "learning_rate": 0.0, "seed": -1, "checkpoint_every": 0}
    spec = assemble(comfy, spec=imported, widgets=keep)
    assert spec.training.max_train_steps == 300 and spec.lora.lora_rank == 8 and spec.optimizer.learning_rate == 2e-4
    override = assemble(comfy, spec=imported, widgets={**keep, "steps": 7, "rank": 32, "learning_rate": 1e-3})
    assert override.training.max_train_steps == 7 and override.lora.lora_rank == 32
    model, dataset, _ = fragments(comfy, tmp_path)
    replaced = assemble(comfy, spec=imported, dataset=dataset, widgets=keep)
    assert [d.id for d in replaced.image_datasets] == ["photos"] and replaced.image_datasets[0].resolution == 64


def test_train_lora_refuses_bad_settings_before_starting_anything(comfy, tmp_path):
    model, dataset, _ = fragments(comfy, tmp_path)
    errors = pack_errors()
    with pytest.raises(errors.ConfigError, match="needs a dataset"):
        assemble(comfy, model=model)
    with pytest.raises(errors.ConfigError, match="set steps"):
        assemble(comfy, model=model, dataset=dataset, widgets={"steps": 0})
    bad_flavour = {"model": {**model["model"], "model_flavour": "9.9"}}
    with pytest.raises(errors.UnknownFlavourError, match="neta-lumina"):
        run(comfy, "TunerTrainLoRA", model=bad_flavour, dataset=dataset)
    assert not comfy["server"].of("comfyui-tuner.started")


# ---------------------------------------------------------------------- LoRA nodes
def test_apply_trained_lora_patches_like_the_stock_loader(comfy):
    import torch
    from comfy.model_patcher import ModelPatcher

    lora = {
        "diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(4, 8),
        "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.zeros(8, 4),
        "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(4.0),
    }
    model = ModelPatcher("lumina2")
    patched = run(comfy, "TunerApplyTrainedLoRA", model=model, lora=lora, strength=0.8)[0]
    assert patched is not model and model.patches == []
    ((patches, strength),) = patched.patches
    assert strength == 0.8 and list(patches) == ["diffusion_model.layers.0.attention.qkv"]
    assert run(comfy, "TunerApplyTrainedLoRA", model=model, lora=lora, strength=0.0)[0] is model


def test_loss_graph_plots_our_loss_and_the_stock_trainers(comfy):
    out = run(comfy, "TunerLossGraph", loss={"loss": [1.0, 0.8, 0.7], "steps": [10, 20, 30]})
    image = out[0]
    assert tuple(image.shape) == (1, 360, 640, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    saved = out.ui.as_dict()["images"][0]
    assert saved["type"] == "temp" and (comfy["root"] / "temp" / saved["filename"]).is_file()
    flat = run(comfy, "TunerLossGraph", loss={"loss": [0.5, 0.5]})[0]  # the stock LOSS_MAP: no steps
    assert flat.shape[0] == 1


# ---------------------------------------------------------------------- re-queue bookkeeping (scripted trainer)
class ScriptedWorker:
    """Stands in for the child process: writes a LoRA file and replays the events of a 1-step run."""

    started: list[ScriptedWorker] = []

    def __init__(self, spec_path, device=None):
        self.run_dir = Path(spec_path).parent
        self.returncode = None

    def start(self):
        import torch
        from safetensors.torch import save_file

        self.saw_checkpoints = (self.run_dir / "checkpoints").exists()
        lora = self.run_dir / "t_comfyui.safetensors"
        save_file({"diffusion_model.layers.0.attention.out.lora_A.weight": torch.ones(2, 2)}, str(lora))
        self.script = [
            {"type": "started", "total_steps": 1, "samples": 2, "buckets": {"64x64": 2}, "device": "cpu"},
            {"type": "progress", "step": 1, "total": 1, "loss": 0.25, "lr": 1e-4, "it_s": 2.0, "eta_s": 0.0},
            {"type": "done", "steps": 1, "lora": {"comfyui": str(lora), "diffusers": str(lora)}},
        ]
        ScriptedWorker.started.append(self)
        return self

    def events(self, poll=None):
        yield from self.script

    def wait(self, timeout=None):
        self.returncode = 0
        return 0


def test_a_finished_run_is_reused_and_restart_starts_over(comfy, tmp_path, monkeypatch):
    train_run = import_module(harness.module_name() + ".nodes.train_run")
    monkeypatch.setattr(train_run, "WorkerProcess", ScriptedWorker)
    ScriptedWorker.started = []
    model, dataset, _ = fragments(comfy, tmp_path)
    inputs = {"model": model, "dataset": dataset, "steps": 1, "name": "t"}
    first = run(comfy, "TunerTrainLoRA", **inputs)
    lora_file = Path(first[1])
    assert lora_file.is_file() and lora_file.parent == comfy["root"] / "models" / "loras" / "comfyui-tuner"
    assert first[4] == {"loss": [0.25], "steps": [1]} and tuple(first[3].shape) == (1, 64, 64, 3)
    assert len(ScriptedWorker.started) == 1

    lora_file.unlink()  # deleted from loras/ by hand: put back from the run folder, still no training
    again = run(comfy, "TunerTrainLoRA", **inputs)
    assert len(ScriptedWorker.started) == 1 and Path(again[1]).is_file()
    assert comfy["server"].of("comfyui-tuner.done")[-1]["reused"] is True

    run_dir = ScriptedWorker.started[0].run_dir
    (run_dir / "checkpoints" / "step-1").mkdir(parents=True)
    run(comfy, "TunerTrainLoRA", **inputs, mode="restart")
    assert len(ScriptedWorker.started) == 2 and not ScriptedWorker.started[1].saw_checkpoints
    assert comfy["server"].of("comfyui-tuner.started")[-1]["mode"] == "restart"


def test_mode_continue_with_changes_asks_the_engine_to_continue_the_same_run_on_purpose(comfy, tmp_path, monkeypatch):
    import json

    train_run = import_module(harness.module_name() + ".nodes.train_run")
    monkeypatch.setattr(train_run, "WorkerProcess", ScriptedWorker)
    ScriptedWorker.started = []
    model, dataset, _ = fragments(comfy, tmp_path)
    inputs = {"model": model, "dataset": dataset, "steps": 1, "name": "t"}
    run(comfy, "TunerTrainLoRA", **inputs)
    run(comfy, "TunerTrainLoRA", **{**inputs, "steps": 2}, mode="continue with changes")
    first, second = ScriptedWorker.started
    assert first.run_dir == second.run_dir  # the same run folder: the engine finds its checkpoint
    spec = json.loads((second.run_dir / "spec.json").read_text())
    assert spec["checkpointing"]["resume_with_changes"] is True


# ---------------------------------------------------------------------- Configure Offload/Quant
def test_configure_offload_quant_has_every_memory_option_under_its_spec_name(comfy):
    from trainer_core.spec import PRECISIONS, MemorySpec

    inputs = {i.id: i for i in comfy["nodes"]["TunerConfigureOffloadQuant"].GET_SCHEMA().inputs}
    assert list(inputs) == list(MemorySpec.model_fields)  # every field, same names, same order
    assert all(inputs[key].default == field.default for key, field in MemorySpec.model_fields.items())
    assert inputs["base_model_precision"].options == list(PRECISIONS) == inputs["text_encoder_2_precision"].options
    assert inputs["group_offload_type"].options == ["block_level", "leaf_level"]

    out = run(
        comfy,
        "TunerConfigureOffloadQuant",
        base_model_precision="int8-quanto",
        enable_group_offload=True,
        group_offload_blocks_per_group=2,
        vae_enable_tiling=True,
    )
    assert set(out[0]) == {"memory"}
    expected = MemorySpec(
        base_model_precision="int8-quanto",
        enable_group_offload=True,
        group_offload_blocks_per_group=2,
        vae_enable_tiling=True,
    )
    assert out[0]["memory"] == expected.model_dump()
    json.dumps(out[0])  # plain data only
    shown = out.ui.as_dict()["text"][0]
    assert "base_model_precision: int8-quanto" in shown and "group_offload_blocks_per_group: 2" in shown
    assert "warning" not in shown
    assert "nothing quantised or offloaded" in run(comfy, "TunerConfigureOffloadQuant").ui.as_dict()["text"][0]


def test_configure_offload_quant_refuses_what_the_engine_refuses_and_shows_what_it_ignores(comfy, monkeypatch):
    import importlib.util

    import comfy.model_management as mm
    import torch

    errors = pack_errors()
    with pytest.raises(errors.ConfigError, match="enable_group_offload and enable_model_cpu_offload"):
        run(comfy, "TunerConfigureOffloadQuant", enable_group_offload=True, enable_model_cpu_offload=True)
    with pytest.raises(errors.ConfigError, match="group_offload_use_stream needs a CUDA GPU"):
        run(comfy, "TunerConfigureOffloadQuant", enable_group_offload=True, group_offload_use_stream=True)
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(errors.ConfigError, match="pip install torchao"):
            run(comfy, "TunerConfigureOffloadQuant", base_model_precision="int8-torchao")
    stray = run(comfy, "TunerConfigureOffloadQuant", group_offload_vae=True).ui.as_dict()["text"][0]
    assert "warning: group_offload_vae only apply with enable_group_offload" in stray

    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda"))  # ComfyUI on a GPU: streams allowed
    streams = run(comfy, "TunerConfigureOffloadQuant", enable_group_offload=True, group_offload_use_stream=True)
    assert streams[0]["memory"]["group_offload_use_stream"] is True
    assert "turned off because gradient_checkpointing is on" in streams.ui.as_dict()["text"][0]


def test_train_lora_and_cache_embeds_merge_the_memory_section(comfy, tmp_path):
    model, dataset, _ = fragments(comfy, tmp_path)
    quantised = run(comfy, "TunerConfigureOffloadQuant", base_model_precision="int8-quanto", vae_enable_slicing=True)
    spec = assemble(comfy, model=model, dataset=dataset, memory=quantised[0])
    assert spec.memory.base_model_precision == "int8-quanto" and spec.memory.vae_enable_slicing
    plain = assemble(comfy, model=model, dataset=dataset)
    assert plain.memory.base_model_precision == "no_change"
    assert spec.output_dir != plain.output_dir  # a quantised base learns differently: another run
    offload = run(comfy, "TunerConfigureOffloadQuant", enable_group_offload=True, vae_enable_tiling=True)[0]
    assert assemble(comfy, model=model, dataset=dataset, memory=offload).output_dir == plain.output_dir  # same run
    on_the_fly = run(comfy, "TunerConfigureOffloadQuant", vae_cache_disable=True, vae_cache_ondemand=True)[0]
    assert assemble(comfy, model=model, dataset=dataset, memory=on_the_fly).output_dir == plain.output_dir

    cache_nodes = import_module(harness.module_name() + ".nodes.cache_nodes")
    cached = cache_nodes.cache_spec(model=model, dataset=dataset, validation=None, spec=None, seed=1, memory=offload)
    assert cached.memory.enable_group_offload and cached.memory.vae_enable_tiling  # what the caching child gets

    full = {"model": {**model["model"], "model_type": "full"}}
    with pytest.raises(pack_errors().ConfigError, match="model_type 'full' has nothing to train"):
        assemble(comfy, model=full, dataset=dataset, memory=quantised[0])


# ---------------------------------------------------------------------- TREAD Route
def test_tread_routes_chain_and_are_checked_with_the_engines_rules(comfy):
    first = run(comfy, "TunerTreadRoute")
    route = {"selection_ratio": 0.25, "start_layer_idx": 2, "end_layer_idx": -2}
    assert first[0] == {"routing": {"tread_config": {"routes": [route]}}}
    assert "warning" not in first.ui.as_dict()["text"][0]
    second = run(comfy, "TunerTreadRoute", selection_ratio=0.5, start_layer_idx=0, end_layer_idx=1, routes=first[0])
    assert second[0]["routing"]["tread_config"]["routes"] == [
        route,
        {"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 1},
    ]
    assert first[0]["routing"]["tread_config"]["routes"] == [route]  # the input is not changed in place
    shown = second.ui.as_dict()["text"][0]
    assert "route 2: 0.5 of the tokens skip blocks 0..1" in shown
    assert "drops more than 0.35" in shown and "first two blocks" in shown
    json.dumps(second[0])

    errors = pack_errors()
    earlier = run(comfy, "TunerTreadRoute", start_layer_idx=2, end_layer_idx=5)[0]
    with pytest.raises(errors.ConfigError, match="routes overlap: blocks 2..5 and 4..8"):
        run(comfy, "TunerTreadRoute", start_layer_idx=4, end_layer_idx=8, routes=earlier)
    with pytest.raises(errors.ConfigError, match="start_layer_idx 5 is after end_layer_idx 3"):
        run(comfy, "TunerTreadRoute", start_layer_idx=5, end_layer_idx=3)


def test_train_lora_sets_tread_config_and_lumina2_refuses_it_before_any_child(comfy, tmp_path):
    _, dataset, _ = fragments(comfy, tmp_path)
    first = run(comfy, "TunerTreadRoute", start_layer_idx=3, end_layer_idx=4)[0]
    tread = run(comfy, "TunerTreadRoute", start_layer_idx=6, end_layer_idx=-3, routes=first)[0]
    assert len(tread["routing"]["tread_config"]["routes"]) == 2
    k5 = run(comfy, "TunerLoadKandinsky5Flavour", repo_id="/models/k5")[0]
    spec = assemble(comfy, model=k5, dataset=dataset, tread=tread)
    assert spec.routing.tread_config == tread["routing"]["tread_config"]
    assert spec.output_dir != assemble(comfy, model=k5, dataset=dataset).output_dir  # routing changes the run

    imported = {
        "routing": {"tread_config": {"routes": [{"selection_ratio": 0.3, "start_layer_idx": 1, "end_layer_idx": 2}]}}
    }
    replaced = assemble(comfy, spec=imported, model=k5, dataset=dataset, tread=tread)
    assert replaced.routing.tread_config == tread["routing"]["tread_config"]  # the chain replaces the config's routes

    lumina = run(comfy, "TunerLoadLumina2", repo_id="/models/tiny")[0]
    with pytest.raises(pack_errors().ConfigError, match="TREAD token routing is not available for lumina2"):
        run(comfy, "TunerTrainLoRA", model=lumina, dataset=dataset, tread=tread)
    assert not comfy["server"].of("comfyui-tuner.started")


# ---------------------------------------------------------------------- video: flavours, Video Options, Build Dataset
def test_load_kandinsky5_lists_the_video_flavours(comfy):
    from trainer_core.families.kandinsky5_video import Kandinsky5VideoFamily

    options = {i.id: i for i in comfy["nodes"]["TunerLoadKandinsky5Flavour"].GET_SCHEMA().inputs}["flavour"].options
    assert set(Kandinsky5VideoFamily.flavours) <= set(options)
    for name in ("t2v-lite-sft-5s", "t2v-lite-pretrain-5s", "t2v-pro-sft-5s-hd", "t2v-pro-pretrain-10s-hd"):
        assert name in options
    assert {"i2v-lite-5s", "i2v-pro-sft-5s"} <= set(options)
    out = run(comfy, "TunerLoadKandinsky5Flavour", flavour="i2v-lite-5s")[0]
    assert out["model"] == {
        "model_family": "kandinsky5-video",
        "model_flavour": "i2v-lite-5s",
        "pretrained_model_name_or_path": None,
    }


def test_video_options_give_the_video_block_and_refuse_frame_counts_naming_the_nearest_valid(comfy):
    from trainer_core.spec import VideoSpec

    out = run(
        comfy,
        "TunerVideoOptions",
        num_frames=33,
        frame_rate=24.0,
        bucket_strategy="resolution_frames",
        frame_interval=4,
    )
    block = out[0]["video"]
    assert set(out[0]) == {"video"} and VideoSpec.model_validate(block) == VideoSpec(
        num_frames=33, frame_rate=24.0, bucket_strategy="resolution_frames", frame_interval=4
    )
    assert "clips of 33 frames at 24 fps" in out.ui.as_dict()["text"][0]
    whole = run(comfy, "TunerVideoOptions", num_frames=0)[0]["video"]
    assert whole["num_frames"] is None and whole["frame_rate"] is None  # 0: whole videos, their own rate

    errors = pack_errors()
    with pytest.raises(errors.ConfigError) as err:
        run(comfy, "TunerVideoOptions", num_frames=60)
    assert "video.num_frames 60 is not 4k+1" in str(err.value) and "nearest valid: 57 or 61" in str(err.value)
    assert str(err.value).startswith("kandinsky5-video: ")
    with pytest.raises(errors.ConfigError, match="num_frames 33 exceeds video.max_frames 20"):
        run(comfy, "TunerVideoOptions", num_frames=33, max_frames=20)
    ignored = run(comfy, "TunerVideoOptions", num_frames=17, frame_interval=8).ui.as_dict()["text"][0]
    assert "warning: video.frame_interval only applies with bucket_strategy 'resolution_frames'" in ignored


def test_build_dataset_with_video_options_makes_a_video_dataset_for_kandinsky5_video(comfy, tmp_path):
    clips = write_video_dataset(tmp_path / "clips", {"a": "a ball rolls", "b": "a square slides"}, frames=21)
    photos = write_dataset(tmp_path / "photos", {"c": "a red circle"})
    video = run(comfy, "TunerVideoOptions", num_frames=17)[0]
    first = run(comfy, "TunerBuildDataset", folder=str(photos), resolution=32.0, resolution_type="pixel")
    out = run(
        comfy,
        "TunerBuildDataset",
        folder=str(clips),
        resolution=32.0,
        resolution_type="pixel",
        video=video,
        dataset=first[0],
    )
    datasets = out[0]["datasets"]
    assert [d.get("dataset_type", "image") for d in datasets] == ["image", "video"]
    assert datasets[1]["video"] == video["video"] and datasets[1]["id"] == "clips"
    assert out.ui.as_dict()["text"][0].startswith("2 video(s) in ")
    json.dumps(out[0])

    model = run(comfy, "TunerLoadKandinsky5Flavour", flavour="t2v-lite-sft-5s", repo_id="/models/k5v")[0]
    spec = assemble(comfy, model=model, dataset=out[0])
    (clip_set,) = spec.video_datasets
    assert clip_set.video.num_frames == 17 and [d.id for d in spec.image_datasets] == ["photos"]
    cache_root = comfy["root"] / "output" / "comfyui-tuner" / "cache" / "vae"
    assert spec.vae_cache_dir(clip_set).parent == cache_root  # shared with Cache Embeds, like image caches
    write_video_dataset(clips, {"a": "a ball rolls", "b": "a square slides", "d": "a third clip"}, frames=21)
    assert assemble(comfy, model=model, dataset=out[0]).output_dir != spec.output_dir  # new clip: new run

    errors = pack_errors()
    lumina = run(comfy, "TunerLoadLumina2", repo_id="/models/tiny")[0]
    with pytest.raises(errors.ConfigError, match="lumina2 trains on images"):
        assemble(comfy, model=lumina, dataset=out[0])
    one_frame = run(comfy, "TunerVideoOptions", num_frames=1)[0]  # t2v accepts 1 frame; image-to-video cannot
    single = run(comfy, "TunerBuildDataset", folder=str(clips), resolution=32.0, video=one_frame)[0]
    i2v = run(comfy, "TunerLoadKandinsky5Flavour", flavour="i2v-lite-5s", repo_id="/models/k5v")[0]
    with pytest.raises(errors.ConfigError, match="video.num_frames 1 leaves I2V nothing to predict"):
        run(comfy, "TunerTrainLoRA", model=i2v, dataset=single)
    (clips / "b.txt").unlink()
    with pytest.raises(errors.DatasetError, match=r"b\.mp4"):
        run(comfy, "TunerBuildDataset", folder=str(clips), video=video)


def test_connected_datasets_replace_an_imported_configs_image_and_video_datasets(comfy):
    run_spec = import_module(harness.module_name() + ".nodes.run_spec")
    base = {
        "datasets": [
            {"id": "stills", "instance_data_dir": "/a"},
            {"id": "clips", "dataset_type": "video", "instance_data_dir": "/b"},
            {"id": "te", "dataset_type": "text_embeds", "default": True},
        ]
    }
    merged = run_spec.merge_fragments(base, datasets=[{"id": "mine", "instance_data_dir": "/c"}])
    assert [d["id"] for d in merged["datasets"]] == ["mine", "te"]
