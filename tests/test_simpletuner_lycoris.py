"""SimpleTuner's LyCORIS and DoRA configs: imported with SimpleTuner's meaning, exported so SimpleTuner reads them.

Why these tests: SimpleTuner's own Kandinsky 5 image examples train LyCORIS LoKr from a
``lycoris_config`` JSON file, and SimpleTuner hands that file to lycoris, which ignores keys it does
not know. A typo there would silently train another adapter, so every key is checked on import,
before any model loads, and the error names the file and the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer_core.errors import ConfigError
from trainer_core.simpletuner import TUNER_BLOCK, export_simpletuner, import_simpletuner, write_simpletuner
from trainer_core.simpletuner_lycoris import AUTO_MARK, SOURCE_MARK, load_settings
from trainer_core.spec import TrainSpec

EXAMPLES = Path(__file__).parent / "data" / "simpletuner"
K5_T2I = EXAMPLES / "kandinsky5-image-t2i.lycoris-lokr"
K5_I2I = EXAMPLES / "kandinsky5-image-i2i.lycoris-lokr"
# SimpleTuner's examples never change lycoris_config.json: class-name targets with their own factors.
K5_PRESET = {
    "target_module": ["Kandinsky5Attention", "Kandinsky5FeedForward"],
    "module_algo_map": {"Kandinsky5FeedForward": {"factor": 4}, "Kandinsky5Attention": {"factor": 2}},
}


def _lycoris_file(folder: Path, content: dict | str, name: str = "lycoris_config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _import_with(tmp_path: Path, lycoris: dict | str, **config) -> TrainSpec:
    _lycoris_file(tmp_path, lycoris)
    body = {"lora_type": "lycoris", "lycoris_config": "lycoris_config.json", "max_train_steps": 1, **config}
    (tmp_path / "config.json").write_text(json.dumps(body))
    return import_simpletuner(tmp_path / "config.json").spec


# ----------------------------------------------------------------------------- SimpleTuner's own examples
def test_simpletuners_kandinsky5_t2i_lokr_example_imports_with_its_preset_intact():
    result = import_simpletuner(K5_T2I / "config.json")
    spec = result.spec
    assert spec.model.model_family == "kandinsky5-image"
    assert spec.lora.lora_type == "lycoris" and spec.lora.adapter_kind == "lokr"
    assert spec.lora.lycoris_config == str(K5_T2I / "lycoris_config.json")  # found next to config.json
    lycoris = spec.lora.lycoris
    assert (lycoris.multiplier, lycoris.linear_dim, lycoris.linear_alpha, lycoris.factor) == (1.0, 10000, 1, 4)
    assert lycoris.full_matrix is True and lycoris.bypass_mode is True
    assert lycoris.apply_preset.model_dump(exclude_defaults=True) == K5_PRESET
    # the rest of the example means what it means in SimpleTuner
    assert spec.training.flow_schedule_shift == 3 and spec.optimizer.grad_clip_method == "value"
    assert spec.optimizer.optimizer == "adamw_bf16" and spec.optimizer.lr_scheduler == "constant"
    assert spec.lora.lora_rank == 128 and spec.lora.lora_alpha == 128
    assert "lycoris_config" not in " ".join(result.unsupported_keys)


def test_simpletuners_kandinsky5_i2i_lokr_example_imports_on_its_quantised_base():
    spec = import_simpletuner(K5_I2I / "config.json").spec
    assert spec.memory.base_model_precision == "int8-torchao"
    assert spec.lora.adapter_kind == "lokr" and spec.lora.lycoris.bypass_mode is True
    assert spec.lora.lycoris.apply_preset.model_dump(exclude_defaults=True) == K5_PRESET
    assert [d.id for d in spec.image_datasets] == ["controlnet-512"]
    assert spec.image_datasets[0].conditioning_data == "references"


def test_the_lumina2_quickstart_switched_to_lycoris_imports(tmp_path):
    """The Lumina 2 quick start says: for LyCORIS, switch lora_type to lycoris (and keep the default file)."""
    from test_simpletuner_import import LUMINA2_BACKEND, LUMINA2_CONFIG

    config = json.loads(LUMINA2_CONFIG)
    config["lora_type"] = "lycoris"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "multidatabackend.json").write_text(LUMINA2_BACKEND)
    with pytest.raises(ConfigError) as err:  # no lycoris_config key, and no file at SimpleTuner's default
        import_simpletuner(tmp_path / "config.json")
    assert "config/lycoris_config.json" in err.value.message and "lycoris_config" in err.value.hint
    # SimpleTuner's default path, config/lycoris_config.json (its config/lycoris_config.json.example content)
    _lycoris_file(
        tmp_path / "config",
        {
            "algo": "lokr",
            "multiplier": 1.0,
            "full_matrix": True,
            "linear_alpha": 1,
            "factor": 16,
            "apply_preset": {
                "target_module": ["Attention", "FeedForward"],
                "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}},
            },
        },
    )
    spec = import_simpletuner(tmp_path / "config.json").spec
    assert spec.model.model_family == "lumina2" and spec.lora.adapter_kind == "lokr"
    assert spec.lora.lycoris_config == str(tmp_path / "config" / "lycoris_config.json")
    assert spec.lora.lycoris.linear_dim == 4  # SimpleTuner's int(lycoris_config.get("linear_dim", 4))
    assert spec.lora.lycoris.apply_preset.target_module == ["Attention", "FeedForward"]


# ----------------------------------------------------------------------------- values SimpleTuner accepts
def test_numbers_and_flags_written_as_strings_mean_what_simpletuner_reads(tmp_path):
    spec = _import_with(
        tmp_path,
        {
            "algo": "LoHa",
            "multiplier": "1",
            "linear_dim": "32",
            "linear_alpha": "16",
            "bypass_mode": "True",
            "use_cp": "false",
            "dropout": "0.05",
        },
    )
    lycoris = spec.lora.lycoris
    assert (lycoris.algo, lycoris.linear_dim, lycoris.linear_alpha, lycoris.multiplier) == ("loha", 32, 16, 1)
    assert lycoris.bypass_mode is True and lycoris.use_tucker is False and lycoris.dropout == 0.05


def test_simpletuners_integer_reading_of_the_three_numbers_is_kept_and_reported(tmp_path):
    _lycoris_file(tmp_path, {"algo": "lora", "multiplier": 1, "linear_dim": 8.0, "linear_alpha": 0.5})
    (tmp_path / "config.json").write_text(json.dumps({"lora_type": "LyCORIS", "lycoris_config": "lycoris_config.json"}))
    result = import_simpletuner(tmp_path / "config.json")
    lycoris = result.spec.lora.lycoris
    assert lycoris.algo == "locon"  # lycoris trains "lora" with its LoCon module
    assert lycoris.linear_dim == 8 and lycoris.linear_alpha == 8  # int(0.5) = 0, and lycoris reads alpha 0 as dim
    assert any("linear_alpha 0.5 is read as 0" in w for w in result.warnings)
    # lycoris without a preset adapts every Linear in SimpleTuner; here the family's targets: said out loud
    assert any("no apply_preset" in w and "family's LoRA target layers" in w for w in result.warnings)


def test_init_lokr_norm_is_read_from_config_json_as_simpletuner_does(tmp_path):
    spec = _import_with(tmp_path, {"algo": "lokr", "multiplier": 1, "linear_alpha": 1}, init_lokr_norm=1e-3)
    assert spec.lora.lycoris.init_lokr_norm == 1e-3
    config, _ = export_simpletuner(spec)
    assert config["init_lokr_norm"] == 1e-3 and "init_lokr_norm" not in config["lycoris_config"]


# ----------------------------------------------------------------------------- bad files
def test_a_missing_lycoris_file_names_the_key_and_the_paths_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "config.json").write_text(json.dumps({"lora_type": "lycoris", "lycoris_config": "lokr.json"}))
    with pytest.raises(ConfigError) as err:
        import_simpletuner(tmp_path / "st" / "config.json")
    assert "lycoris_config 'lokr.json' does not exist" in err.value.message
    assert str(tmp_path / "st" / "lokr.json") in err.value.message and "fix the path" in err.value.hint


def test_a_broken_lycoris_file_names_itself(tmp_path):
    with pytest.raises(ConfigError) as err:
        _import_with(tmp_path, '{"algo": "lokr",')
    assert f"lycoris_config file {tmp_path / 'lycoris_config.json'} is not readable JSON" in err.value.message
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        _import_with(tmp_path, "[1, 2]")


def test_every_problem_of_a_lycoris_file_is_named_at_once_with_the_nearest_spelling(tmp_path):
    with pytest.raises(ConfigError) as err:
        _import_with(
            tmp_path,
            {
                "algo": "lokr",
                "multiplier": 1,
                "linear_dim": 16,
                "linear_alpha": 16,
                "facter": 4,
                "train_norm": True,
                "apply_preset": {
                    "target_modules": ["Attention"],
                    "module_algo_map": {"Attention": {"algo": "lokrr", "linear_dim": 8}},
                },
            },
        )
    message = err.value.message
    assert str(tmp_path / "lycoris_config.json") in message and "fix these keys" in err.value.hint
    assert "facter: not a LyCORIS option (did you mean factor?)" in message
    assert "train_norm: true asks for training the normalisation layers" in message
    assert "apply_preset.target_modules: not a lycoris preset key (did you mean target_module?)" in message
    assert (
        "apply_preset.module_algo_map.Attention.algo: 'lokrr' is not a LyCORIS algorithm (did you mean lokr?)"
        in message
    )
    assert "apply_preset.module_algo_map.Attention.linear_dim: lycoris reads 'dim' here" in message


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (
            {"algo": "tlora", "multiplier": 1, "linear_alpha": 1},
            "'tlora' is a LyCORIS algorithm comfyui-tuner does not train",
        ),
        (
            {"algo": "lokor", "multiplier": 1, "linear_alpha": 1},
            "'lokor' is not a LyCORIS algorithm (did you mean lokr?)",
        ),
        ({"multiplier": 1, "linear_alpha": 1}, "algo: missing"),
        ({"algo": "lokr", "multiplier": 0.5, "linear_alpha": 1}, "multiplier: SimpleTuner reads it as int(...) = 0"),
        ({"algo": "lokr", "linear_dim": "many", "linear_alpha": 1}, "linear_dim: 'many' is not a number"),
        ({"algo": "lokr", "full_matrix": "yes", "linear_alpha": 1}, "full_matrix: 'yes' is not true or false"),
        ({"algo": "lokr", "dropout": 2, "linear_alpha": 1}, "dropout: Input should be less than 1"),
    ],
)
def test_a_lycoris_setting_we_cannot_train_stops_the_import(tmp_path, content, needle):
    with pytest.raises(ConfigError) as err:
        _import_with(tmp_path, content)
    assert needle in err.value.message


def test_the_same_reader_checks_a_file_given_to_the_adapter_node(tmp_path):
    """Outside a SimpleTuner config an omitted linear_dim / linear_alpha follows Train LoRA's rank / alpha."""
    path = _lycoris_file(tmp_path, {"algo": "loha", "dora_wd": True})
    settings, _ = load_settings(path, simpletuner=False)
    assert settings == {"algo": "loha", "dora_wd": True}
    with pytest.raises(ConfigError, match="facter"):
        load_settings(_lycoris_file(tmp_path, {"algo": "lokr", "facter": 2}, "bad.json"), simpletuner=False)


# ----------------------------------------------------------------------------- DoRA and what SimpleTuner ignores
def test_use_dora_trains_dora_and_is_exported():
    spec = import_simpletuner({"use_dora": "true", "max_train_steps": 1}).spec
    assert spec.lora.use_dora is True and spec.lora.adapter_kind == "dora"
    config, backend = export_simpletuner(spec)
    assert config["use_dora"] is True and "lora_type" not in config  # standard is SimpleTuner's default
    assert import_simpletuner(config, backend).spec == spec


def test_keys_simpletuner_ignores_for_the_adapter_type_are_ignored_with_a_warning(tmp_path):
    result = import_simpletuner({"lora_type": "standard", "lycoris_config": "nowhere.json", "init_lokr_norm": 1e-3})
    assert result.spec.lora.lora_type == "standard" and result.spec.lora.lycoris is None
    assert any("lycoris_config is ignored" in w for w in result.warnings)
    assert "init_lokr_norm" in result.unsupported_keys
    _lycoris_file(tmp_path, {"algo": "lokr", "multiplier": 1, "linear_alpha": 1})
    config = {"lora_type": "lycoris", "lycoris_config": "lycoris_config.json", "use_dora": True}
    result = import_simpletuner(config, base_dir=tmp_path)
    assert result.spec.lora.use_dora is False and result.spec.lora.adapter_kind == "lokr"
    assert any("use_dora is ignored with lora_type 'lycoris'" in w and "dora_wd" in w for w in result.warnings)


# ----------------------------------------------------------------------------- export
def test_write_simpletuner_writes_lycoris_config_json_next_to_config_json(tmp_path):
    spec = import_simpletuner(K5_T2I / "config.json").spec
    config_path, _ = write_simpletuner(spec, tmp_path / "export")
    config = json.loads(config_path.read_text())
    lycoris_path = tmp_path / "export" / "lycoris_config.json"
    assert config["lora_type"] == "lycoris" and config["lycoris_config"] == str(lycoris_path)
    assert SOURCE_MARK not in config.get(TUNER_BLOCK, {})
    written = json.loads(lycoris_path.read_text())
    assert written == json.loads((K5_T2I / "lycoris_config.json").read_text())  # what SimpleTuner shipped
    back = import_simpletuner(config_path).spec
    assert back.lora.lycoris_config == str(lycoris_path)
    assert (
        back.model_copy(update={"lora": back.lora.model_copy(update={"lycoris_config": spec.lora.lycoris_config})})
        == spec
    )


def test_export_import_round_trip_keeps_settings_the_run_resolves_unresolved(tmp_path):
    """linear_dim / linear_alpha left to the rank / alpha and bypass_mode left to the base precision."""
    spec = TrainSpec.model_validate(
        {
            "model": {"model_family": "lumina2"},
            "lora": {
                "lora_type": "lycoris",
                "lora_rank": 8,
                "lora_alpha": 4,
                "lycoris": {
                    "algo": "loha",
                    "dora_wd": True,
                    "apply_preset": {"target_name": ["layers.0.*"], "use_fnmatch": True},
                },
            },
            "memory": {"base_model_precision": "int8-quanto"},
        }
    )
    config, backend = export_simpletuner(spec)
    # SimpleTuner needs these keys; it gets the values this run uses
    assert config["lycoris_config"] == {
        "algo": "loha",
        "multiplier": 1.0,
        "linear_dim": 8,
        "linear_alpha": 4.0,
        "bypass_mode": True,
        "dora_wd": True,
        "apply_preset": {"target_name": ["layers.0.*"], "use_fnmatch": True},
    }
    assert sorted(config[TUNER_BLOCK][AUTO_MARK]) == ["bypass_mode", "linear_alpha", "linear_dim"]
    assert import_simpletuner(config, backend).spec == spec
    # a value edited in the written file is the user's, not "follow the run"
    config["lycoris_config"]["linear_dim"] = 12
    assert import_simpletuner(config, backend).spec.lora.lycoris.linear_dim == 12


def test_export_round_trip_keeps_the_file_the_settings_came_from():
    spec = import_simpletuner(K5_T2I / "config.json").spec
    config, backend = export_simpletuner(spec)
    assert config[TUNER_BLOCK][SOURCE_MARK] == str(K5_T2I / "lycoris_config.json")
    assert "peft_lora_target_modules" not in config  # SimpleTuner's LyCORIS takes its targets from the file
    assert import_simpletuner(config, backend).spec == spec


def test_an_imported_example_copied_elsewhere_still_finds_its_lycoris_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy = shutil.copytree(K5_T2I, tmp_path / "my-config")
    spec = import_simpletuner(copy / "config.json").spec
    assert spec.lora.lycoris_config == str(copy / "lycoris_config.json")
