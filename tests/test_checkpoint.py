"""Checkpoints on disk: stored without pickle, verified against their manifest, chosen as the user said.

The engine-level stories (resume stays exact, a damaged checkpoint falls back, changed settings stop
the run) are in test_engine.py; here each promise of ``train/checkpoint.py``, ``train/state_files.py``
and ``train/run_definition.py`` is pinned on real optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_core.errors import CheckpointError
from trainer_core.spec import OptimizerSpec, TrainSpec
from trainer_core.train import checkpoint as ckpt
from trainer_core.train import run_definition as rd
from trainer_core.train.optim import build_lr_scheduler, build_optimizer
from trainer_core.train.state_files import load_state, save_state


# ----------------------------------------------------------------------------- a real small training loop
class Loop:
    """Two parameters (one bf16, one fp32) trained by our AdamW (bf16 variant) under a cosine schedule."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.params = [
            torch.nn.Parameter(torch.randn(8, 4, generator=g).to(torch.bfloat16)),
            torch.nn.Parameter(torch.randn(4, generator=g)),
        ]
        spec = OptimizerSpec(optimizer="adamw_bf16", learning_rate=1e-2, lr_scheduler="cosine", lr_warmup_steps=2)
        self.optimizer = build_optimizer(self.params, spec, 1e-2, seed=7)
        self.scheduler = build_lr_scheduler(self.optimizer, spec, total_steps=10)

    def step(self, n: int) -> None:
        g = torch.Generator().manual_seed(100 + n)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        loss = ((x @ self.params[0].float() + self.params[1] - y) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def adapter(self) -> dict[str, torch.Tensor]:
        return {f"p{i}": p.detach() for i, p in enumerate(self.params)}


def save(out: Path, loop: Loop, step: int, keep_last: int | None = None) -> Path:
    return ckpt.save_checkpoint(
        out,
        ckpt.TrainingState(step, {"epoch": 0, "position": step}, [[step, 0.5]], "fp", {"learning_rate": 0.01}),
        adapter=loop.adapter(),
        states={"optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(), "ema": None},
        spec_json="{}",
        keep_last=keep_last,
    )


def trained_run(out: Path, steps=(2, 4)) -> Loop:
    loop = Loop()
    for n in range(1, max(steps) + 1):
        loop.step(n)
        if n in steps:
            save(out, loop, n)
    return loop


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- states without pickle
def test_states_round_trip_exactly_and_training_continues_identically(tmp_path):
    a = Loop()
    for n in range(1, 4):
        a.step(n)
    save_state(tmp_path, "optimizer", a.optimizer.state_dict())
    save_state(tmp_path, "scheduler", a.scheduler.state_dict())
    b = Loop(seed=1)  # other weights: everything must come from the files
    with torch.no_grad():
        for pa, pb in zip(a.params, b.params):
            pb.copy_(pa)
    b.optimizer.load_state_dict(load_state(tmp_path, "optimizer"))
    b.scheduler.load_state_dict(load_state(tmp_path, "scheduler"))
    assert isinstance(b.optimizer.param_groups[0]["betas"], tuple)  # tuples stay tuples
    for n in range(4, 7):
        a.step(n)
        b.step(n)
    for pa, pb in zip(a.params, b.params):
        assert torch.equal(pa, pb)
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


def test_rng_state_round_trips_so_the_next_draws_repeat(tmp_path):
    save_state(tmp_path, "rng", ckpt._rng_state())
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(load_state(tmp_path, "rng"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_a_state_that_json_and_safetensors_cannot_hold_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match=r"optimizer\.param_groups\[0\]\.hook is a function"):
        save_state(tmp_path, "optimizer", {"param_groups": [{"hook": lambda: None}]})


def test_a_grad_scaler_state_fits_the_format_for_fp16_checkpoints(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(2))  # the scale tensor exists once used
    save_state(tmp_path, "grad_scaler", scaler.state_dict())
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_state(tmp_path, "grad_scaler"))
    assert restored.state_dict() == scaler.state_dict() and restored.get_scale() == 1024.0


def test_a_checkpoint_holds_only_safetensors_and_json(tmp_path):
    folder = save(tmp_path, trained_run(tmp_path / "x"), 3)
    suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json"}, suffixes
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == 2
    assert set(manifest["files"]) >= {"adapter.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json"}
    entry = manifest["files"]["adapter.safetensors"]
    assert entry["size"] == (folder / "adapter.safetensors").stat().st_size and len(entry["sha256"]) == 64


# ----------------------------------------------------------------------------- damage
@pytest.mark.parametrize(
    "harm, found",
    [
        (lambda f: flip_a_byte(f / "optimizer.safetensors"), "optimizer.safetensors does not match its checksum"),
        (lambda f: (f / "adapter.safetensors").write_bytes(b"x" * 10), "adapter.safetensors has 10 bytes"),
        (lambda f: (f / "scheduler.json").unlink(), "scheduler.json is missing"),
        (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json cannot be read"),
    ],
)
def test_damage_after_writing_is_found_before_anything_is_read(tmp_path, harm, found):
    trained_run(tmp_path)
    folder = tmp_path / "checkpoints" / "step-4"
    assert ckpt.damage(folder) is None
    harm(folder)
    assert found in ckpt.damage(folder)
    with pytest.raises(CheckpointError, match="is damaged"):
        ckpt.load_checkpoint(folder)


def test_latest_falls_back_to_the_newest_intact_checkpoint_naming_the_damaged_one(tmp_path):
    trained_run(tmp_path)
    root = tmp_path / "checkpoints"
    flip_a_byte(root / "step-4" / "adapter.safetensors")
    warnings: list[str] = []
    loaded = ckpt.resolve_resume(tmp_path, "latest", warnings.append)
    assert loaded.folder.name == "step-2" and loaded.state.step == 2
    assert len(warnings) == 1 and "step-4" in warnings[0] and "adapter.safetensors" in warnings[0]
    # set aside, so that the next save of step 4 and 'latest' never meet it again
    assert not (root / "step-4").exists() and (root / "damaged-step-4").is_dir()


def test_no_intact_checkpoint_is_a_clear_error_listing_each_damaged_one(tmp_path):
    trained_run(tmp_path)
    for step in (2, 4):
        flip_a_byte(tmp_path / "checkpoints" / f"step-{step}" / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        ckpt.resolve_resume(tmp_path, "latest", lambda m: None)
    assert "step-2" in str(err.value) and "step-4" in str(err.value) and "resume_from_checkpoint ''" in str(err.value)


def test_an_empty_output_dir_starts_fresh(tmp_path):
    assert ckpt.resolve_resume(tmp_path, "latest", lambda m: None) is None


# ----------------------------------------------------------------------------- resume_from_checkpoint values
@pytest.mark.parametrize("value", ["step-2", "checkpoint-2", "ABSOLUTE"])
def test_resume_from_checkpoint_can_name_a_folder(tmp_path, value):
    trained_run(tmp_path)
    if value == "ABSOLUTE":
        value = str(tmp_path / "checkpoints" / "step-2")
    loaded = ckpt.resolve_resume(tmp_path, value, lambda m: None)
    assert loaded.folder.name == "step-2" and loaded.state.step == 2


@pytest.mark.parametrize("value", [None, "", "  "])
def test_resume_from_checkpoint_empty_starts_fresh_like_simpletuner(tmp_path, value):
    trained_run(tmp_path)
    assert ckpt.resolve_resume(tmp_path, value, lambda m: None) is None


@pytest.mark.parametrize(
    "value, found",
    [
        ("step-99", "names no folder"),
        ("yes please", "names no folder"),
        ("/no/such/dir/step-2", "names no folder"),
        ("NOT_A_CHECKPOINT", "is not a checkpoint folder"),
    ],
)
def test_a_bad_resume_from_checkpoint_is_a_clear_error_listing_what_exists(tmp_path, value, found):
    trained_run(tmp_path)
    if value == "NOT_A_CHECKPOINT":
        value = str(tmp_path)  # a folder, but not a checkpoint
    with pytest.raises(CheckpointError, match=found) as err:
        ckpt.resolve_resume(tmp_path, value, lambda m: None)
    assert "step-2, step-4" in err.value.hint and "'latest'" in err.value.hint


def test_a_named_checkpoint_that_is_damaged_is_an_error_not_a_fallback(tmp_path):
    trained_run(tmp_path)
    flip_a_byte(tmp_path / "checkpoints" / "step-2" / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="step-2 is damaged"):
        ckpt.resolve_resume(tmp_path, "step-2", lambda m: None)


# ----------------------------------------------------------------------------- checkpoints of the previous format
def make_legacy(folder: Path, loop: Loop) -> Path:
    """A checkpoint as the previous version wrote it: pickled states, a manifest of names only."""
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in loop.adapter().items()}, str(folder / "adapter.safetensors"))
    torch.save(loop.optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(loop.scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(ckpt._rng_state(), folder / "rng.pt")
    state = {"step": 3, "sampler": {"epoch": 0, "position": 3}, "loss_history": [], "spec_fingerprint": "x"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "spec.json").write_text("{}")
    files = sorted(p.name for p in folder.iterdir())
    (folder / "manifest.json").write_text(json.dumps({"files": files, "step": 3}))
    return folder


def test_a_previous_format_checkpoint_still_resumes_with_a_warning_that_it_is_unverified(tmp_path):
    loop = Loop()
    for n in range(1, 4):
        loop.step(n)
    folder = make_legacy(tmp_path / "checkpoints" / "step-3", loop)
    warnings: list[str] = []
    loaded = ckpt.resolve_resume(tmp_path, "latest", warnings.append)
    assert loaded.legacy and loaded.folder == folder
    assert "cannot be verified" in warnings[0]
    saved = loop.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(loaded.states["optimizer"]["state"][0]["exp_avg"], saved)
    ckpt.restore_rng(loaded.states["rng"])  # numpy's state comes back through the allow-list


class WritesAMarker:
    """A pickle payload: unpickling it calls ``open(marker, 'w')``, as malicious code would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_with_a_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path):
    loop = Loop()
    loop.step(1)
    folder = make_legacy(tmp_path / "from-someone" / "step-3", loop)
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": WritesAMarker(marker)}, folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt.resolve_resume(tmp_path, str(folder), lambda m: None)
    assert not marker.exists()
    # the payload is real: an unrestricted torch.load would have run it
    torch.load(folder / "optimizer.pt", weights_only=False)
    assert marker.exists()


def test_retention_keeps_the_newest_checkpoints(tmp_path):
    loop = Loop()
    for n in range(1, 5):
        loop.step(n)
        save(tmp_path, loop, n, keep_last=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-3", "step-4"]


# ----------------------------------------------------------------------------- what defines a run
def base_spec(**sections) -> TrainSpec:
    data = {
        "output_dir": "out",
        "model": {"model_family": "lumina2"},
        "optimizer": {"learning_rate": 1e-4},
        "training": {"max_train_steps": 100},
        "datasets": [{"id": "photos", "instance_data_dir": "data", "resolution": 512}],
    }
    for name, values in sections.items():
        if not isinstance(values, dict):
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return TrainSpec.model_validate(data)


def diff(a: TrainSpec, b: TrainSpec, **content) -> list[tuple]:
    return rd.changes(rd.run_definition(a, content.get("old")), rd.run_definition(b, content.get("new")))


def test_changed_training_settings_are_listed_by_their_simpletuner_keys():
    new = base_spec(optimizer={"learning_rate": 2e-4}, lora={"lora_rank": 32, "lora_alpha": 8})
    assert diff(base_spec(), new) == [
        ("learning_rate", 1e-4, 2e-4),
        ("lora_alpha", None, 8.0),
        ("lora_rank", 16, 32),
    ]
    text = rd.mismatch_error("step-40", "out", diff(base_spec(), new)).message
    assert "learning_rate: 0.0001 -> 0.0002" in text and "lora_rank: 16 -> 32" in text


def test_placement_validation_checkpoint_and_export_settings_do_not_define_the_run():
    moved = base_spec(
        output_dir="elsewhere",
        memory={"enable_group_offload": True, "vae_enable_tiling": True, "vae_cache_ondemand": True},
        training={"gradient_checkpointing": False, "vae_batch_size": 1},
        validation={"validation_prompt": "a cat", "validation_step_interval": 5},
        checkpointing={"checkpoint_step_interval": 7, "resume_with_changes": True},
        export={"output_name": "other"},
        datasets=[{"id": "photos", "instance_data_dir": "data", "resolution": 512, "cache_dir_vae": "/fast/cache"}],
    )
    assert diff(base_spec(), moved) == []
    assert diff(base_spec(), base_spec(memory={"base_model_precision": "int8-quanto"})) == [
        ("base_model_precision", "no_change", "int8-quanto")
    ]


def test_more_steps_continue_unless_the_schedule_depends_on_the_length():
    assert diff(base_spec(), base_spec(training={"max_train_steps": 200})) == []
    cosine = {"lr_scheduler": "cosine"}
    assert diff(base_spec(optimizer=cosine), base_spec(optimizer=cosine, training={"max_train_steps": 200})) == [
        ("max_train_steps", 100, 200)
    ]


def test_dataset_settings_and_content_define_the_run():
    other = base_spec(datasets=[{"id": "photos", "instance_data_dir": "data", "resolution": 1024}])
    assert diff(base_spec(), other) == [("photos.resolution", 512.0, 1024.0)]
    old = {"photos": {"files": 12, "content": "aaaa"}}
    new = {"photos": {"files": 14, "content": "bbbb"}}
    changed = [k for k, _, _ in diff(base_spec(), base_spec(), old=old, new=new)]
    assert changed == ["photos.content", "photos.files"]
    added = base_spec(
        datasets=[
            {"id": "photos", "instance_data_dir": "data", "resolution": 512},
            {"id": "more", "instance_data_dir": "data2"},
        ]
    )
    assert ("datasets", ["photos"], ["more", "photos"]) in diff(base_spec(), added)


def test_a_key_the_checkpoint_did_not_record_is_not_compared():
    old = rd.run_definition(base_spec())
    del old["caption_dropout_probability"]  # e.g. an option added after the checkpoint was written
    new = rd.run_definition(base_spec(training={"caption_dropout_probability": 0.1}))
    assert rd.changes(old, new) == []


def test_continuing_with_changes_refuses_what_changes_the_checkpoints_tensors():
    lr = diff(base_spec(), base_spec(optimizer={"learning_rate": 5e-4}))
    assert rd.refuse_fixed("step-4", lr) is None
    assert "resume_with_changes true" in rd.mismatch_error("step-4", "out", lr).hint
    rank = diff(base_spec(), base_spec(lora={"lora_rank": 4}, optimizer={"optimizer": "lion"}))
    refusal = rd.refuse_fixed("step-4", rank)
    assert "lora_rank: 16 -> 4" in refusal.message and "optimizer: 'adamw_bf16' -> 'lion'" in refusal.message
    assert "not possible" in rd.mismatch_error("step-4", "out", rank).hint


def test_the_adapter_kind_and_lycoris_settings_define_the_run_but_not_where_they_were_read_from(tmp_path):
    lokr = {"lora_type": "lycoris", "lycoris": {"algo": "lokr", "factor": 4}}
    to_dora = diff(base_spec(), base_spec(lora={"use_dora": True}))
    assert rd.refuse_fixed("step-4", to_dora) is not None
    to_factor_8 = diff(base_spec(lora=lokr), base_spec(lora={**lokr, "lycoris": {"algo": "lokr", "factor": 8}}))
    assert [c[0] for c in to_factor_8] == ["lycoris"] and rd.refuse_fixed("step-4", to_factor_8) is not None
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for f in (a, b):
        f.write_text(json.dumps(lokr["lycoris"]))
    moved = diff(
        base_spec(lora={"lora_type": "lycoris", "lycoris_config": str(a)}),
        base_spec(lora={"lora_type": "lycoris", "lycoris_config": str(b)}),
    )
    assert moved == []
