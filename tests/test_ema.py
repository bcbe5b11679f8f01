"""EMA of the adapter weights (``trainer_core.train.ema``)."""

from __future__ import annotations

import pytest
import torch

from trainer_core.train.ema import EMA, build_ema, ema_devices


def _scalar(value: float, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([value], dtype=dtype))


def test_warmup_decay_then_capped() -> None:
    ema = EMA([_scalar(0.0)], decay=0.995)
    assert ema.current_decay(0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema.current_decay(1) == pytest.approx(2 / 11)
    assert ema.current_decay(1000) == pytest.approx(1001 / 1010)
    assert ema.current_decay(10_000) == 0.995  # (10001 / 10010) > 0.995: capped


def test_update_on_a_scalar_pinned_numbers() -> None:
    p = _scalar(0.0)
    ema = EMA([p], decay=0.995)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(0)  # d = 0.1: 0.1 * 0 + 0.9 * 1
    assert ema.shadow_params()[0].item() == pytest.approx(0.9)
    ema.update(1)  # d = 2/11: (2/11) * 0.9 + (9/11) * 1
    assert ema.shadow_params()[0].item() == pytest.approx(10.8 / 11)
    with torch.no_grad():
        p.fill_(0.0)
    ema.update(100_000)  # d = 0.995: the shadow barely moves
    assert ema.shadow_params()[0].item() == pytest.approx(0.995 * 10.8 / 11)


def test_shadow_is_fp32_on_the_requested_device_even_for_bf16_params() -> None:
    p = _scalar(1.5, torch.bfloat16)
    ema = EMA([p], decay=0.9, device="cpu")
    shadow = ema.shadow_params()[0]
    assert shadow.dtype == torch.float32 and shadow.device.type == "cpu"
    assert shadow.data_ptr() != p.data_ptr()


def test_swapped_in_loads_ema_and_restores_originals_exactly() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7).bfloat16())]
    ema = EMA(params, decay=0.9)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.update(50)
    originals = [p.detach().clone() for p in params]
    with ema.swapped_in(params):
        for p, s, o in zip(params, ema.shadow_params(), originals):
            assert torch.equal(p, s.to(p.dtype))
            assert not torch.equal(p, o)
    for p, o in zip(params, originals):
        assert torch.equal(p, o) and p.dtype == o.dtype


def test_swapped_in_restores_even_when_the_body_fails() -> None:
    p = _scalar(2.0)
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(7.0)
    with pytest.raises(RuntimeError), ema.swapped_in([p]):
        assert p.item() == 2.0
        raise RuntimeError("validation crashed")
    assert p.item() == 7.0


def test_copy_to_overwrites_params() -> None:
    p = _scalar(3.0)
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(0.0)
    ema.copy_to()  # defaults to the tracked parameters
    assert p.item() == 3.0


def test_state_dict_round_trip_gives_identical_updates() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(2))]
    a = EMA(params, decay=0.99)
    for step in range(5):
        with torch.no_grad():
            for p in params:
                p.mul_(0.9).add_(0.1)
        a.update(step)
    b = EMA([torch.nn.Parameter(torch.zeros_like(p)) for p in params], decay=0.5)
    b.load_state_dict(a.state_dict())
    assert b.decay == 0.99
    a.update(5, params)
    b.update(5, params)
    for x, y in zip(a.shadow_params(), b.shadow_params()):
        assert torch.equal(x, y)


def test_the_ema_state_survives_the_checkpoints_pickle_free_storage(tmp_path) -> None:
    from trainer_core.train.state_files import load_state, save_state

    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(2))]
    a = EMA(params, decay=0.99)
    a.update(0)
    save_state(tmp_path, "ema", a.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.json", "ema.safetensors"]
    b = EMA([torch.nn.Parameter(torch.zeros_like(p)) for p in params], decay=0.5)
    b.load_state_dict(load_state(tmp_path, "ema"))
    assert b.decay == 0.99
    for x, y in zip(a.shadow_params(), b.shadow_params()):
        assert torch.equal(x, y)


def test_mismatched_state_or_params_are_rejected() -> None:
    ema = EMA([_scalar(0.0)], decay=0.9)
    with pytest.raises(ValueError, match="tracks 1"):
        ema.copy_to([_scalar(0.0), _scalar(1.0)])
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({"decay": 0.9, "shadow": [torch.zeros(3)]})


# ------------------------------------------------------------------------- SimpleTuner's device and interval keys
def test_update_interval_updates_every_nth_step_with_that_steps_decay() -> None:
    p = _scalar(0.0)
    ema = EMA([p], decay=0.999, update_interval=3)
    expected = 0.0
    for step in range(9):
        with torch.no_grad():
            p.fill_(float(step + 1))
        updated = ema.update(step)
        assert updated == (step in (2, 5, 8)), step  # after optimizer steps 3, 6, 9
        if updated:  # the decay of the global step (SimpleTuner's), not of the number of updates made
            d = ema.current_decay(step)
            expected = d * expected + (1 - d) * (step + 1)
        assert ema.shadow_params()[0].item() == pytest.approx(expected), step


def test_interval_one_is_every_step_and_bad_intervals_are_refused() -> None:
    ema = EMA([_scalar(0.0)], decay=0.9)
    assert ema.update_interval == 1 and all(ema.should_update(s) for s in range(5))
    with pytest.raises(ValueError, match="interval"):
        EMA([_scalar(0.0)], decay=0.9, update_interval=0)


@pytest.mark.parametrize(
    ("ema_device", "cpu_only", "train", "store", "update"),
    [
        ("cpu", False, "cuda:0", "cpu", "cuda:0"),  # SimpleTuner's default: kept on the host, updated on the GPU
        ("cpu", True, "cuda:0", "cpu", "cpu"),  # ema_cpu_only: never moved
        ("accelerator", False, "cuda:0", "cuda:0", "cuda:0"),
        ("accelerator", True, "cuda:0", "cuda:0", "cuda:0"),  # ema_cpu_only has no effect there
        ("accelerator", False, "cpu", "cpu", "cpu"),  # a CPU-only run: the accelerator is the CPU
        ("cpu", False, "cpu", "cpu", "cpu"),
    ],
)
def test_ema_devices_follow_simpletuners_ema_device_and_ema_cpu_only(ema_device, cpu_only, train, store, update):
    assert ema_devices(ema_device, cpu_only, train) == (torch.device(store), torch.device(update))


def test_the_shadow_lives_on_the_device_asked_for() -> None:
    # "meta" stands in for an accelerator on this CPU-only machine: a shadow there has no data but a device
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5).bfloat16())]
    on_meta = EMA(params, decay=0.9, device="meta")
    assert {s.device.type for s in on_meta.shadow_params()} == {"meta"}
    assert {s.dtype for s in on_meta.shadow_params()} == {torch.float32}
    assert on_meta.update(0)  # the update runs where the shadow lives
    assert {s.device.type for s in on_meta.shadow_params()} == {"meta"}
    on_cpu = EMA(params, decay=0.9, device="cpu")
    assert {s.device.type for s in on_cpu.shadow_params()} == {"cpu"} and on_cpu.nbytes() == (12 + 5) * 4


def test_a_shadow_updated_elsewhere_comes_back_with_the_same_numbers() -> None:
    # cpu:0 != cpu as a torch.device, so this takes the shuttle path (to the update device and back)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3))]
    direct = EMA(params, decay=0.99)
    shuttled = EMA(params, decay=0.99, update_device=torch.device("cpu", 0))
    assert shuttled.update_device != shuttled.device
    for step in range(4):
        with torch.no_grad():
            for p in params:
                p.mul_(0.5).add_(1.0)
        direct.update(step)
        shuttled.update(step)
    for a, b in zip(direct.shadow_params(), shuttled.shadow_params()):
        assert b.device == torch.device("cpu") and torch.equal(a, b)


def test_build_ema_reads_the_training_section() -> None:
    from trainer_core.spec import TrainingSpec

    training = TrainingSpec(use_ema=True, ema_decay=0.98, ema_device="accelerator", ema_update_interval=4)
    ema = build_ema([_scalar(1.0)], training, "cpu")
    assert (ema.decay, ema.device, ema.update_device, ema.update_interval) == (0.98, *[torch.device("cpu")] * 2, 4)
    assert TrainingSpec(ema_update_interval=None).ema_update_interval == 1  # SimpleTuner's null: every step
    with pytest.raises(ValueError):
        TrainingSpec(ema_device="gpu")


def test_an_interval_ema_resumes_exactly_between_two_updates(tiny_lumina2, tmp_path, monkeypatch):
    """Interval 2, accelerator EMA; the run stops at step 3 (no update there) and resumes to step 6."""
    from helpers.datasets import lumina_spec, write_dataset

    from trainer_core.events import ListSink
    from trainer_core.spec import TrainSpec
    from trainer_core.train.engine import Trainer

    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle"})
    ema_keys = {"use_ema": True, "ema_decay": 0.9, "ema_device": "accelerator", "ema_update_interval": 2}

    def trainer(out: str, steps: int) -> Trainer:
        raw = lumina_spec(tiny_lumina2, data, tmp_path / out, training={"max_train_steps": steps, **ema_keys})
        return Trainer(TrainSpec.model_validate(raw), ListSink(), device="cpu")

    straight = trainer("straight", 6)
    updates: list[int] = []
    straight.run()
    assert straight.ema.device == straight.device and straight.ema.update_interval == 2
    short = trainer("split", 3)
    short.run()
    resumed = trainer("split", 6)
    plain_update = EMA.update

    def spy(self, step, params=None):
        done = plain_update(self, step, params)
        if done:
            updates.append(step)
        return done

    monkeypatch.setattr(EMA, "update", spy)
    result = resumed.run()
    assert result.resumed_from.name == "step-3" and updates == [3, 5]  # after optimizer steps 4 and 6
    for a, b in zip(straight.ema.shadow_params(), resumed.ema.shadow_params()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(straight.params, resumed.params):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------------- the exported EMA LoRA
def test_the_exported_ema_lora_holds_the_averaged_weights_and_the_plain_lora_the_last_ones(tiny_lumina2, tmp_path):
    from helpers.datasets import lumina_spec, write_dataset
    from safetensors.torch import load_file

    from trainer_core.events import ListSink
    from trainer_core.spec import TrainSpec
    from trainer_core.train.engine import Trainer

    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle"})
    spec = lumina_spec(
        tiny_lumina2,
        data,
        tmp_path / "out",
        training={"max_train_steps": 4, "use_ema": True, "ema_decay": 0.9},
        checkpointing={"checkpoint_step_interval": 100},
    )
    trainer = Trainer(TrainSpec.model_validate(spec), ListSink(), device="cpu")
    result = trainer.run()

    # Expected tensors, named as in the files, read straight from the trainer: no export code involved.
    tracked = {id(p): i for i, p in enumerate(trainer.params)}
    shadow = trainer.ema.shadow_params()
    averaged, last = {}, {}
    for name, p in trainer.transformer.named_parameters():
        if id(p) in tracked:
            key = "transformer." + name.replace(".default.", ".")
            averaged[key], last[key] = shadow[tracked[id(p)]], p.detach()
    ema_file, raw_file = load_file(str(result.ema_lora.diffusers)), load_file(str(result.lora.diffusers))
    assert sorted(ema_file) == sorted(raw_file) == sorted(averaged)
    # after 4 steps the average still lags well behind the weights, so the two files must differ
    assert max((averaged[k] - last[k]).abs().max().item() for k in averaged) > 1e-4
    for key in averaged:
        torch.testing.assert_close(ema_file[key], averaged[key], rtol=0, atol=0)
        torch.testing.assert_close(raw_file[key], last[key], rtol=0, atol=0)
    ema_comfy, raw_comfy = load_file(str(result.ema_lora.comfyui)), load_file(str(result.lora.comfyui))
    assert any(not torch.equal(ema_comfy[k], raw_comfy[k]) for k in ema_comfy if not k.endswith(".alpha"))
