"""Latents made while training: ``vae_cache_ondemand`` (no pre-pass, cache filled as files are drawn)
and ``vae_cache_disable`` (encoded at every draw, nothing written to disk).

Both must train on exactly the latents the pre-pass would have cached, keep the VAE loaded (and
reported) during training, and leave the cache folder as their names promise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.datasets import lumina_spec, write_dataset, write_video_dataset

from trainer_core.cache.latents import LatentCache
from trainer_core.cache.on_the_fly import OnTheFlyLatents
from trainer_core.cli import main as cli_main
from trainer_core.events import ListSink
from trainer_core.simpletuner import import_simpletuner
from trainer_core.spec import TrainSpec
from trainer_core.train.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CAPTIONS = {"a": "a red circle, tunertest style", "b": "a green circle, tunertest style", "c": "a blue circle"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), CAPTIONS)


def spec_for(model: Path, data: Path, out: Path, **memory) -> TrainSpec:
    return TrainSpec.model_validate(
        lumina_spec(
            model,
            data,
            out,
            memory=memory,
            training={"max_train_steps": 4, "train_batch_size": 2, "mixed_precision": "no", "seed": 5},
            checkpointing={"checkpoint_step_interval": None},
        )
    )


def cached_entries(spec: TrainSpec) -> list[Path]:
    return sorted(spec.vae_cache_dir(spec.training_datasets[0]).rglob("*.safetensors"))


def run(spec: TrainSpec) -> tuple[Trainer, ListSink, list[list[float]]]:
    sink = ListSink()
    trainer = Trainer(spec, sink)
    result = trainer.run()
    return trainer, sink, result.loss_history


@pytest.fixture(scope="module")
def cached_run(tiny_lumina2, data, tmp_path_factory):
    """The reference: the same run with the usual latent pre-pass."""
    spec = spec_for(tiny_lumina2, data, tmp_path_factory.mktemp("cached"))
    trainer, sink, history = run(spec)
    assert trainer.latent_report.encoded == len(CAPTIONS)
    return history


def memory_event(sink: ListSink) -> dict:
    return next(e for e in sink.of("memory") if e.get("stage") == "training")


def test_vae_cache_disable_trains_on_the_same_latents_and_writes_nothing(tiny_lumina2, data, tmp_path, cached_run):
    spec = spec_for(tiny_lumina2, data, tmp_path / "out", vae_cache_disable=True)
    trainer, sink, history = run(spec)

    assert [round(loss, 5) for _, loss in history] == [round(loss, 5) for _, loss in cached_run]
    assert cached_entries(spec) == []  # not one latent on disk
    live = trainer.latent_cache
    assert isinstance(live, OnTheFlyLatents) and not live.write
    assert live.encoded == 4 * 2  # every draw encodes again: 4 steps of batch 2
    assert trainer.batches._latents.items == {}  # and nothing is kept in memory either
    report = memory_event(sink)
    assert report["vae_bytes"] > 0 and report["vae_device_bytes"] == report["vae_bytes"]
    assert "vae_loaded" in trainer.startup.stages and "vae_released" not in trainer.startup.stages


def test_vae_cache_ondemand_fills_the_cache_as_files_are_drawn_and_a_rerun_loads_no_vae(
    tiny_lumina2, data, tmp_path, cached_run
):
    first_spec = spec_for(tiny_lumina2, data, tmp_path / "first", vae_cache_ondemand=True)
    sink = ListSink()
    trainer = Trainer(first_spec, sink)
    trainer.prepare()
    trainer.fill_caches()
    assert cached_entries(first_spec) == []  # no pre-pass: training starts at once
    assert trainer.latent_report.total == 3 and trainer.latent_report.reused == 0
    trainer.build_model()
    history = trainer.train().loss_history

    assert [round(loss, 5) for _, loss in history] == [round(loss, 5) for _, loss in cached_run]
    assert len(cached_entries(first_spec)) == 3  # each file written once, at its first draw
    # 8 draws, 3 files: each encoded once; the repeats come from memory, not the disk or the VAE
    assert trainer.latent_cache.encoded == 3 and trainer.latent_cache.reused == 0

    # the same data and cache folder again: everything is found, so the VAE never loads
    again_spec = first_spec.model_copy(update={"output_dir": str(tmp_path / "again")})
    again_spec.datasets[0].cache_dir_vae = str(first_spec.vae_cache_dir(first_spec.training_datasets[0]))
    again, sink, _ = run(again_spec)
    assert again.latent_cache.encoded == 0 and again.latent_report.reused == 3
    assert "vae_loaded" not in again.startup.stages
    assert memory_event(sink)["vae_bytes"] == 0


def test_a_corrupt_on_demand_entry_is_encoded_again(tiny_lumina2, data, tmp_path):
    spec = spec_for(tiny_lumina2, data, tmp_path / "out", vae_cache_ondemand=True)
    trainer = Trainer(spec, ListSink())
    trainer.prepare()
    trainer.fill_caches(latents="cache")  # fill it, then break one entry
    entries = cached_entries(spec)
    entries[0].write_bytes(entries[0].read_bytes()[:-16])

    trainer.fill_caches()
    live = trainer.latent_cache
    assert trainer.latent_report.reused == 3  # a file check finds all three...
    assert live.vae is None  # ...so no VAE is loaded up front
    got = live.load_many(trainer.index.samples)
    assert live.encoded == 1 and live.vae is not None  # the corrupt one is re-encoded, loading the VAE then
    cache = LatentCache({"d": spec.vae_cache_dir(spec.training_datasets[0])}, trainer.family)
    cache.identity.update(live.identity)
    for sample, entry in zip(trainer.index.samples, got):
        assert (cache.load(sample)["mean"] == entry["mean"]).all()


def test_cache_command_fills_an_on_demand_cache_and_writes_nothing_for_a_disabled_one(
    tiny_lumina2, data, tmp_path, capsys
):
    for flag, expected in (("vae_cache_ondemand", 3), ("vae_cache_disable", 0)):
        spec = spec_for(tiny_lumina2, data, tmp_path / flag, **{flag: True})
        spec_file = tmp_path / f"{flag}.json"
        spec_file.write_text(spec.model_dump_json())
        assert cli_main(["cache", str(spec_file), "--device", "cpu"]) == 0
        assert len(cached_entries(spec)) == expected, flag
    assert "never cached; only captions were" in capsys.readouterr().err


def test_simpletuner_keys_land_in_the_memory_section(tmp_path, data):
    config = tmp_path / "config.json"
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(f'[{{"id": "d", "instance_data_dir": "{data}"}}]')
    config.write_text(
        '{"--model_family": "lumina2", "--vae_cache_disable": "true", "--vae_cache_ondemand": false, '
        f'"--data_backend_config": "{backend}"}}'
    )
    spec = import_simpletuner(config).spec
    assert spec.memory.vae_cache_disable is True and spec.memory.vae_cache_ondemand is False
    assert spec.memory.latents_on_the_fly


def test_video_clips_are_encoded_on_the_fly_too(tmp_path):
    from trainer_core.testing.tiny import build_tiny_kandinsky5_video

    model = build_tiny_kandinsky5_video(tmp_path / "k5v")
    clips = write_video_dataset(tmp_path / "clips", {"ball": "a square moves right"}, frames=9)
    spec = TrainSpec.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"model_family": "kandinsky5-video", "pretrained_model_name_or_path": str(model)},
            "training": {"max_train_steps": 2, "mixed_precision": "no", "base_model_default_dtype": "fp32"},
            "memory": {"vae_cache_disable": True},
            "checkpointing": {"checkpoint_step_interval": None},
            "validation": {"validation_disable": True},
            "datasets": [
                {
                    "id": "clips",
                    "dataset_type": "video",
                    "instance_data_dir": str(clips),
                    "resolution": 48,
                    "resolution_type": "pixel",
                    "video": {"num_frames": 9},
                },
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "te")},
            ],
        }
    )
    trainer, _, history = run(spec)
    assert len(history) == 2 and trainer.latent_cache.encoded == 2
    assert cached_entries(spec) == []
