"""Adapter Settings and the LoRA outputs for every adapter type, against the ComfyUI stand-in.

Why: the adapter choice (LoRA, DoRA, LoKr, LoHa, LoCon, a LyCORIS file) must reach Train LoRA's
TrainSpec exactly, replace an imported config's choice, and every kind of trained file must reach
the model through Apply Trained LoRA with no key left behind.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import pytest
import torch
from comfy_stub import harness
from test_nodes import assemble, fragments, pack_errors, run, write_simpletuner

K5_T2I = Path(__file__).parent / "data" / "simpletuner" / "kandinsky5-image-t2i.lycoris-lokr"


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    harness.install(tmp_path_factory.mktemp("comfy"))
    module, nodes = harness.load_pack()
    yield module, nodes
    harness.uninstall()


@pytest.fixture
def comfy(pack, tmp_path):
    """A fresh ComfyUI tree per test; the pack stays loaded (as in test_nodes.py)."""
    harness.install(tmp_path / "comfy")
    return {"nodes": pack[1], "root": tmp_path / "comfy"}


def adapter(comfy, **inputs) -> dict:
    return run(comfy, "TunerAdapterSettings", **inputs)[0]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"adapter_type": "LoRA"}, {"lora_type": "standard", "use_dora": False, "lycoris": None}),
        ({"adapter_type": "LoRA", "dropout": 0.1}, {"use_dora": False, "lora_dropout": 0.1}),
        ({"adapter_type": "DoRA"}, {"lora_type": "standard", "use_dora": True, "lycoris": None}),
        ({"adapter_type": "LoRA", "decompose": True}, {"use_dora": True}),
        (
            {"adapter_type": "LoKr", "factor": 4},
            {"lora_type": "lycoris", "lycoris": {"algo": "lokr", "factor": 4, "dora_wd": False, "dropout": 0.0}},
        ),
        (
            {"adapter_type": "LoHa", "decompose": True, "factor": 4},  # factor is LoKr's only
            {"lora_type": "lycoris", "lycoris": {"algo": "loha", "dora_wd": True, "dropout": 0.0}},
        ),
        (
            {"adapter_type": "LoCon", "dropout": 0.05, "targets": "attention"},
            {
                "lora_type": "lycoris",
                "lycoris": {"algo": "locon", "dora_wd": False, "dropout": 0.05},
                "lora_target_preset": "attention",
            },
        ),
    ],
)
def test_each_adapter_choice_gives_its_lora_section(comfy, inputs, expected):
    fragment = adapter(comfy, **inputs)
    assert set(fragment) == {"lora"}
    lora = fragment["lora"]
    for key, value in expected.items():
        assert lora[key] == value, key
    # the type is always stated in full, so it replaces an imported config's choice
    assert {"lora_type", "use_dora", "lycoris_config", "lycoris"} <= set(lora)
    if "targets" not in inputs:
        assert "lora_target_preset" not in lora  # "default" keeps the model loader's choice


def test_a_lycoris_file_is_read_and_checked_on_the_node(comfy, tmp_path):
    fragment = adapter(comfy, adapter_type="LyCORIS config file", lycoris_config=str(K5_T2I / "lycoris_config.json"))
    lora = fragment["lora"]
    assert lora["lora_type"] == "lycoris" and lora["lycoris_config"] == str(K5_T2I / "lycoris_config.json")
    assert lora["lycoris"]["apply_preset"]["target_module"] == ["Kandinsky5Attention", "Kandinsky5FeedForward"]
    assert lora["lycoris"]["linear_dim"] == 10000
    # relative paths are looked up in ComfyUI's input folder
    (comfy["root"] / "input").mkdir(parents=True, exist_ok=True)
    (comfy["root"] / "input" / "loha.json").write_text(json.dumps({"algo": "loha"}))
    lora = adapter(comfy, adapter_type="LyCORIS config file", lycoris_config="loha.json")["lora"]
    assert lora["lycoris"] == {"algo": "loha"}  # linear_dim / linear_alpha follow Train LoRA's rank / alpha

    errors = pack_errors()
    (comfy["root"] / "input" / "typo.json").write_text(json.dumps({"algo": "lokr", "facter": 4}))
    with pytest.raises(errors.ConfigError, match=r"facter: not a LyCORIS option \(did you mean factor\?\)"):
        adapter(comfy, adapter_type="LyCORIS config file", lycoris_config="typo.json")
    with pytest.raises(errors.ConfigError, match="lycoris_config file 'nope.json' does not exist"):
        adapter(comfy, adapter_type="LyCORIS config file", lycoris_config="nope.json")
    with pytest.raises(errors.ConfigError, match="no lycoris_config file given"):
        adapter(comfy, adapter_type="LyCORIS config file")
    with pytest.raises(errors.ConfigError, match="factor 0"):
        adapter(comfy, adapter_type="LoKr", factor=0)


def test_editing_the_lycoris_file_makes_comfyui_run_the_node_again(comfy, tmp_path):
    cls = comfy["nodes"]["TunerAdapterSettings"]
    path = tmp_path / "lokr.json"
    path.write_text(json.dumps({"algo": "lokr"}))
    before = cls.fingerprint_inputs(adapter_type="LyCORIS config file", lycoris_config=str(path))
    path.write_text(json.dumps({"algo": "lokr", "factor": 8}))
    assert cls.fingerprint_inputs(adapter_type="LyCORIS config file", lycoris_config=str(path)) != before


def test_train_lora_with_an_adapter_builds_its_trainspec(comfy, tmp_path):
    model, dataset, _ = fragments(comfy, tmp_path)
    plain = assemble(comfy, model=model, dataset=dataset)
    lokr = assemble(comfy, model=model, dataset=dataset, adapter=adapter(comfy, adapter_type="LoKr", factor=4))
    assert plain.lora.adapter_kind == "lora"
    assert lokr.lora.adapter_kind == "lokr" and lokr.lora.lycoris.factor == 4
    assert lokr.lora.lora_rank == 4 and lokr.lora.lycoris.linear_dim is None  # Train LoRA's rank is the dim
    assert lokr.output_dir != plain.output_dir  # another adapter is another run
    dora = assemble(comfy, model=model, dataset=dataset, adapter=adapter(comfy, adapter_type="DoRA"))
    assert dora.lora.adapter_kind == "dora" and dora.output_dir not in (plain.output_dir, lokr.output_dir)


def test_the_adapter_replaces_an_imported_configs_adapter(comfy, tmp_path):
    from helpers.datasets import write_dataset

    data = write_dataset(tmp_path / "st" / "photos", {"a": "x"})
    config = write_simpletuner(tmp_path / "st", data, use_dora=True)
    imported = run(comfy, "TunerImportSimpleTunerConfig", config_path=str(config))[0]
    keep = {"steps": 0, "rank": 0}
    assert assemble(comfy, spec=imported, widgets=keep).lora.adapter_kind == "dora"
    loha = assemble(comfy, spec=imported, widgets=keep, adapter=adapter(comfy, adapter_type="LoHa"))
    assert loha.lora.adapter_kind == "loha" and loha.lora.use_dora is False and loha.lora.lora_rank == 8

    lokr_import = run(comfy, "TunerImportSimpleTunerConfig", config_path=str(K5_T2I / "config.json"))[0]
    assert lokr_import["lora"]["lycoris"]["linear_dim"] == 10000
    back_to_lora = {"steps": 3, "rank": 0}
    spec = assemble(comfy, spec=lokr_import, dataset=fragments(comfy, tmp_path)[1], widgets=back_to_lora,
                    adapter=adapter(comfy, adapter_type="LoRA"))  # fmt: skip
    assert spec.lora.lora_type == "standard" and spec.lora.lycoris is None and spec.lora.lycoris_config is None


def test_import_runs_again_when_the_lycoris_file_changes(comfy, tmp_path):
    import shutil

    folder = shutil.copytree(K5_T2I, tmp_path / "k5")
    cls = comfy["nodes"]["TunerImportSimpleTunerConfig"]
    before = cls.fingerprint_inputs(config_path=str(folder / "config.json"), backend_path="")
    (folder / "lycoris_config.json").write_text(json.dumps({"algo": "loha", "multiplier": 1, "linear_alpha": 1}))
    assert cls.fingerprint_inputs(config_path=str(folder / "config.json"), backend_path="") != before


# ---------------------------------------------------------------------- every trained file reaches the model
LOKR_FILE = {
    "diffusion_model.layers.0.attention.qkv.lokr_w1": torch.zeros(2, 2),
    "diffusion_model.layers.0.attention.qkv.lokr_w2": torch.zeros(48, 8),
    "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(1.0),
    "diffusion_model.layers.0.feed_forward.w1.lokr_w1": torch.zeros(4, 4),
    "diffusion_model.layers.0.feed_forward.w1.lokr_w2_a": torch.zeros(16, 2),
    "diffusion_model.layers.0.feed_forward.w1.lokr_w2_b": torch.zeros(2, 4),
    "diffusion_model.layers.0.feed_forward.w1.alpha": torch.tensor(2.0),
}
DORA_FILE = {
    "diffusion_model.layers.0.attention.out.lora_A.weight": torch.zeros(4, 32),
    "diffusion_model.layers.0.attention.out.lora_B.weight": torch.zeros(32, 4),
    "diffusion_model.layers.0.attention.out.alpha": torch.tensor(4.0),
    "diffusion_model.layers.0.attention.out.dora_scale": torch.ones(32, 1),
}
LOHA_FILE = {
    f"diffusion_model.layers.0.attention.qkv.hada_{part}": torch.zeros(4, 4)
    for part in ("w1_a", "w1_b", "w2_a", "w2_b")
} | {"diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize(
    ("lora", "layers"),
    [
        (LOKR_FILE, ["diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.feed_forward.w1"]),
        (DORA_FILE, ["diffusion_model.layers.0.attention.out"]),
        (LOHA_FILE, ["diffusion_model.layers.0.attention.qkv"]),
    ],
    ids=["lokr", "dora", "loha"],
)
def test_apply_trained_lora_hands_every_key_of_every_adapter_type_to_comfyui(comfy, tmp_path, lora, layers):
    from comfy import sd as comfy_sd
    from comfy.model_patcher import ModelPatcher
    from safetensors.torch import save_file

    # Train LoRA's LORA_MODEL output is the file's state dict, keys as written
    path = tmp_path / "trained.safetensors"
    save_file(lora, str(path))
    bridge = import_module(harness.module_name() + ".nodes.comfy_bridge")
    loaded = bridge.load_lora_file(path)
    assert set(loaded) == set(lora)

    model = ModelPatcher("lumina2")
    patched = run(comfy, "TunerApplyTrainedLoRA", model=model, lora=loaded, strength=0.7)[0]
    ((patches, strength),) = patched.patches
    assert strength == 0.7 and sorted(patches) == layers
    assert {key for group in patches.values() for key in group} == set(lora)  # alpha and dora_scale included
    assert comfy_sd.NOT_LOADED == []


def test_the_stand_in_reports_a_key_comfyui_would_not_load(comfy):
    from comfy import sd as comfy_sd
    from comfy.model_patcher import ModelPatcher

    lora = {**LOKR_FILE, "lycoris_layers_0_attention_to_q.lokr_w3": torch.zeros(1)}
    run(comfy, "TunerApplyTrainedLoRA", model=ModelPatcher("lumina2"), lora=lora, strength=1.0)
    assert comfy_sd.NOT_LOADED == ["lycoris_layers_0_attention_to_q.lokr_w3"]


def test_the_node_says_what_it_trains_in_one_line(pack):
    adapter_nodes = import_module(harness.module_name() + ".nodes.adapter_nodes")
    fragment, notes = adapter_nodes.adapter_fragment("LoKr", 4, True, "attention", "", 0.0)
    assert adapter_nodes.describe(fragment, notes) == "LyCORIS lokr (dora_wd True, factor 4); targets: attention"
    lycoris_file = str(K5_T2I / "lycoris_config.json")
    fragment, notes = adapter_nodes.adapter_fragment("LyCORIS config file", -1, False, "default", lycoris_file, 0.0)
    text = adapter_nodes.describe(fragment, notes)
    assert text.startswith("LyCORIS lokr (") and "layers: Kandinsky5Attention, Kandinsky5FeedForward" in text
    assert "factor, decompose and dropout are ignored" in text
