"""The front door: a mistake in what the user hands us stops the run at once, with the fix.

Every entry point (``python -m trainer_core train`` with SimpleTuner files, ``run`` with a
TrainSpec, the Import SimpleTuner Config node, Train LoRA) must refuse a typo, an adapter we cannot
train, an unusable output_dir or a model that is not there before any model loads and before the
dataset is scanned, with one message that names the key or path and says what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.datasets import write_dataset

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_core", *args, "--events", "jsonl", "--quiet"],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, events, proc.stderr


def write_simpletuner_files(folder: Path, data: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend = [{"id": "pics", "instance_data_dir": str(data), "caption_strategy": "textfile"}]
    (folder / "multidatabackend.json").write_text(json.dumps(backend))
    base = {"model_family": "lumina2", "max_train_steps": 2, "data_backend_config": "multidatabackend.json"}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder / "config.json"


# ----------------------------------------------------------------------------- typos and adapters (CLI, node)
def test_cli_train_stops_on_a_typo_and_names_the_key_it_meant(tmp_path):
    data = write_dataset(tmp_path / "pics", {"a": "a red circle"})
    config = write_simpletuner_files(tmp_path / "st", data, learning_rat=1e-4, output_dir=str(tmp_path / "out"))
    code, events, _ = run_cli("train", "--config", str(config))
    assert code == 2
    (error,) = [e for e in events if e["type"] == "error"]
    assert "learning_rat (did you mean learning_rate?)" in error["message"]
    assert not [e for e in events if e["type"] == "started"]  # nothing was scanned or loaded
    assert not (tmp_path / "out").exists()


def test_cli_train_refuses_singlora_instead_of_training_plain_lora(tmp_path):
    data = write_dataset(tmp_path / "pics", {"a": "a red circle"})
    config = write_simpletuner_files(tmp_path / "st", data, peft_lora_mode="singlora")
    code, events, _ = run_cli("train", "--config", str(config))
    (error,) = [e for e in events if e["type"] == "error"]
    assert code == 2 and 'peft_lora_mode: "singlora" asks for a SingLoRA adapter' in error["message"]
    assert "remove peft_lora_mode" in error["hint"]


def test_cli_train_stops_on_a_typo_in_the_lycoris_file_before_anything_loads(tmp_path):
    data = write_dataset(tmp_path / "pics", {"a": "a red circle"})
    config = write_simpletuner_files(
        tmp_path / "st", data, lora_type="lycoris", lycoris_config="lokr.json", output_dir=str(tmp_path / "out")
    )
    (tmp_path / "st" / "lokr.json").write_text(json.dumps({"algo": "lokr", "multiplier": 1, "facter": 4}))
    code, events, _ = run_cli("train", "--config", str(config))
    (error,) = [e for e in events if e["type"] == "error"]
    assert code == 2 and str(tmp_path / "st" / "lokr.json") in error["message"]
    assert "facter: not a LyCORIS option (did you mean factor?)" in error["message"]
    assert not [e for e in events if e["type"] == "started"]  # nothing was scanned or loaded
    assert not (tmp_path / "out").exists()


def test_the_import_node_shows_the_typo_error(tmp_path):
    from comfy_stub import harness

    data = write_dataset(tmp_path / "pics", {"a": "a red circle"})
    config = write_simpletuner_files(tmp_path / "st", data, learning_rat=1e-4)
    harness.install(tmp_path / "comfy")
    try:
        _, nodes = harness.load_pack()
        cls = nodes["TunerImportSimpleTunerConfig"]
        errors = __import__(harness.module_name() + ".trainer_core.errors", fromlist=["ConfigError"])
        with pytest.raises(errors.ConfigError, match=r"learning_rat \(did you mean learning_rate\?\)"):
            harness.run_node(cls, **{**harness.schema_defaults(cls), "config_path": str(config)})
    finally:
        harness.uninstall()


# ----------------------------------------------------------------------------- output_dir and cache folders
def spec_for(tmp_path: Path, model: Path | str, **top):
    from helpers.datasets import lumina_spec

    from trainer_core.spec import TrainSpec

    data = lumina_spec(Path(model), tmp_path / "no-dataset-here", tmp_path / "out")
    return TrainSpec.model_validate({**data, **top})


def prepare(spec):
    from trainer_core.events import ListSink
    from trainer_core.train.engine import Trainer

    sink = ListSink()
    Trainer(spec, sink, device="cpu").prepare()
    return sink


def test_output_dir_under_a_file_is_a_user_error_before_the_dataset_scan(tmp_path, tiny_lumina2):
    from trainer_core.errors import ConfigError

    (tmp_path / "notes.txt").write_text("x")
    spec = spec_for(tmp_path, tiny_lumina2, output_dir=str(tmp_path / "notes.txt" / "run"))
    with pytest.raises(ConfigError) as err:  # the dataset folder does not exist: a scan would fail differently
        prepare(spec)
    assert err.value.message == f"output_dir {tmp_path / 'notes.txt' / 'run'} cannot be created: " + (
        f"{tmp_path / 'notes.txt'} is a file, not a folder"
    )
    assert "not inside a file" in err.value.hint


def test_output_dir_that_is_a_file_is_a_user_error(tmp_path, tiny_lumina2):
    from trainer_core.errors import ConfigError

    (tmp_path / "run").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir .*run is a file, not a folder"):
        prepare(spec_for(tmp_path, tiny_lumina2, output_dir=str(tmp_path / "run")))


def test_a_cache_folder_under_a_file_names_its_dataset_key(tmp_path, tiny_lumina2):
    from trainer_core.errors import ConfigError

    (tmp_path / "blob").write_text("x")
    spec = spec_for(tmp_path, tiny_lumina2)
    spec.datasets[0].cache_dir_vae = str(tmp_path / "blob" / "vae")
    with pytest.raises(ConfigError, match=r"dataset 'd': cache_dir_vae .*/blob is a file"):
        prepare(spec)


def test_output_dir_that_cannot_be_written_is_a_user_error(tmp_path, tiny_lumina2):
    from trainer_core.errors import ConfigError

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        target = locked / "run"
        if os.access(locked, os.W_OK):  # root writes anywhere: use a folder the kernel refuses to everyone
            target = Path("/sys/comfyui-tuner-write-check")
            if os.access("/sys", os.W_OK) and not _refuses_writes(Path("/sys")):
                pytest.skip("no unwritable folder available to this user")
        with pytest.raises(ConfigError) as err:
            prepare(spec_for(tmp_path, tiny_lumina2, output_dir=str(target)))
        assert f"output_dir {target} is not writable" in err.value.message
        assert "folder you can write to" in err.value.hint
    finally:
        locked.chmod(0o755)


def _refuses_writes(folder: Path) -> bool:
    import tempfile

    try:
        Path(tempfile.mkdtemp(dir=folder)).rmdir()
    except OSError:
        return True
    return False


def test_cli_run_reports_a_bad_output_dir_as_a_user_error_not_a_traceback(tmp_path, tiny_lumina2):
    (tmp_path / "notes.txt").write_text("x")
    spec = spec_for(tmp_path, tiny_lumina2, output_dir=str(tmp_path / "notes.txt" / "run"))
    spec.save(tmp_path / "spec.json")
    code, events, stderr = run_cli("run", str(tmp_path / "spec.json"))
    assert code == 2 and "Traceback" not in stderr
    (error,) = [e for e in events if e["type"] == "error"]
    assert error["kind"] == "ConfigError" and "is a file, not a folder" in error["message"]


# ----------------------------------------------------------------------------- the model source
def test_a_missing_local_model_folder_is_named_as_a_folder_before_the_dataset_scan(tmp_path):
    from trainer_core.errors import ModelLoadError

    missing = tmp_path / "models" / "lumina"
    with pytest.raises(ModelLoadError) as err:
        prepare(spec_for(tmp_path, missing))
    assert err.value.message == f"pretrained_model_name_or_path {str(missing)!r}: no such folder"
    assert "Repo id" not in str(err.value) and "model_index.json" in err.value.hint


def test_a_local_folder_missing_a_part_the_family_loads_is_refused_with_the_parts(tmp_path, tiny_lumina2):
    import shutil

    from trainer_core.errors import ModelLoadError

    partial = tmp_path / "partial"
    shutil.copytree(tiny_lumina2, partial)
    shutil.rmtree(partial / "vae")
    (partial / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as err:
        prepare(spec_for(tmp_path, partial))
    assert "missing: transformer/ weights (*.safetensors), vae/" in err.value.message


def test_kandinsky5_needs_its_second_text_encoder(tmp_path, tiny_lumina2):
    from trainer_core.errors import ModelLoadError

    spec = spec_for(tmp_path, tiny_lumina2)
    spec.model.model_family = "kandinsky5-image"
    with pytest.raises(ModelLoadError) as err:
        prepare(spec)
    assert "not a complete kandinsky5-image diffusers folder; missing: text_encoder_2/, tokenizer_2/" in str(err.value)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache of our own; no proxy; offline unless a test says otherwise."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    return cache


def test_an_uncached_repo_id_offline_fails_at_once_naming_the_cache(tmp_path, hub):
    import time

    from trainer_core.errors import ModelLoadError

    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        prepare(spec_for(tmp_path, "tiny-org/not-downloaded"))
    assert err.value.message == (
        f"model 'tiny-org/not-downloaded' is not in the Hugging Face cache ({hub}) (and there is no local folder "
        f"{str(Path('tiny-org/not-downloaded').absolute())!r}), and HF_HUB_OFFLINE is set"
    )
    assert "huggingface-cli download tiny-org/not-downloaded" in err.value.hint
    assert time.monotonic() - start < 30  # no retries: the cache is read, the network never tried


def test_a_cached_repo_id_passes_offline_and_a_partial_one_names_what_is_missing(tmp_path, hub, tiny_lumina2):
    import shutil

    from trainer_core.errors import ModelLoadError
    from trainer_core.testing.tiny import install_in_hf_cache

    snapshot = install_in_hf_cache(tiny_lumina2, "tiny-org/tiny-lumina2", hub)
    write_dataset(tmp_path / "no-dataset-here", {"a": "a red circle"})
    sink = prepare(spec_for(tmp_path, "tiny-org/tiny-lumina2"))
    assert [e for e in sink.events if e["type"] == "started"]
    shutil.rmtree(snapshot / "text_encoder")
    with pytest.raises(ModelLoadError, match=r"is only partly in the Hugging Face cache .*missing: text_encoder/"):
        prepare(spec_for(tmp_path, "tiny-org/tiny-lumina2"))


@pytest.fixture
def unreachable_hub(hub, monkeypatch) -> int:
    """Online, with the hub at a local port nobody listens on: the connection is refused at once."""
    import socket

    import huggingface_hub.constants as hc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{port}")
    return port


def test_an_uncached_repo_id_with_the_hub_unreachable_fails_in_seconds(tmp_path, unreachable_hub):
    import time

    from trainer_core.errors import ModelLoadError

    port = unreachable_hub
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=rf"and http://127.0.0.1:{port} cannot be reached"):
        prepare(spec_for(tmp_path, "tiny-org/not-downloaded"))
    assert time.monotonic() - start < 30


def test_a_cached_repo_with_the_hub_unreachable_warns_how_to_skip_the_retries(tmp_path, unreachable_hub, tiny_lumina2):
    from trainer_core.testing.tiny import install_in_hf_cache

    install_in_hf_cache(tiny_lumina2, "tiny-org/tiny-lumina2", tmp_path / "hub")
    write_dataset(tmp_path / "no-dataset-here", {"a": "a red circle"})
    sink = prepare(spec_for(tmp_path, "tiny-org/tiny-lumina2"))
    (warning,) = [e["message"] for e in sink.of("warning") if "HF_HUB_OFFLINE" in e["message"]]
    assert f"127.0.0.1:{unreachable_hub} cannot be reached" in warning and "is in the Hugging Face cache" in warning
