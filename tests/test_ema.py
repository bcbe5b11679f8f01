"""EMA of the adapter weights (``trainer_core.train.ema``)."""

from __future__ import annotations

import pytest
import torch

from trainer_core.train.ema import EMA


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
