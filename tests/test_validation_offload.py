"""``enable_model_cpu_offload``: transformer and VAE take turns on the accelerator while validating.

There is no accelerator here, so a stand-in plays one: ``FAKE`` (``cpu:0``, a device the moves can
be told apart by) with :class:`Placement` recording every ``Module.to`` of the two models. A move
really copies every tensor, as a device change does, so a reference kept to an old tensor (or a
Parameter replaced instead of moved) shows up in the values and identities checked afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from PIL import Image, ImageChops

from trainer_core.memory import validation_offload
from trainer_core.memory.quantize import quantize_model
from trainer_core.memory.validation_offload import model_cpu_offload
from trainer_core.spec import TrainSpec
from trainer_core.testing.tiny import make_flux_vae
from trainer_core.train.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
FAKE = torch.device("cpu", 0)  # the stand-in accelerator


class Placement:
    """Where the tracked models are ("device" or "cpu"), every move, and where they were when each ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **start: tuple[torch.nn.Module, str]) -> None:
        self.names = {id(module): name for name, (module, _) in start.items()}
        self.where = {name: place for name, (_, place) in start.items()}
        self.moves: list[tuple[str, str]] = []
        self.runs: list[tuple[str, dict[str, str]]] = []
        self.both_on_device = False
        real_to = torch.nn.Module.to

        def to(module: torch.nn.Module, *args, **kwargs):
            name = self.names.get(id(module))
            if name is None:
                return real_to(module, *args, **kwargs)
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
            assert dtype is None, "validation offload only moves, it never casts"
            place = "device" if device == FAKE else "cpu"
            if self.where[name] != place:
                fresh_memory(module)  # new storage, as a real device change
                self.where[name] = place
                self.moves.append((name, place))
                self.both_on_device |= all(p == "device" for p in self.where.values())
            return module

        monkeypatch.setattr(torch.nn.Module, "to", to)
        monkeypatch.setattr(validation_offload, "offloads_on", lambda device: device == FAKE)

    def watch(self, name: str, submodule: torch.nn.Module) -> None:
        """Record where everything is whenever ``submodule`` (a part of model ``name``) runs."""
        submodule.register_forward_pre_hook(lambda *_: self.runs.append((name, dict(self.where))))

    def assert_took_turns(self) -> None:
        assert {name for name, _ in self.runs} == set(self.where), self.runs  # both ran
        for name, where in self.runs:
            assert where[name] == "device", (name, where)
            assert all(p == "cpu" for other, p in where.items() if other != name), (name, where)
        assert not self.both_on_device, self.moves


def fresh_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Copy every tensor into newly allocated memory, as the first device move does.

    Weights loaded from safetensors sit unaligned in the file's memory map, and CPU kernels round
    differently on unaligned data (last-bit differences, measured): references are rendered from
    copied weights so that they compare bit for bit with renders after moves.
    """
    return module._apply(lambda t: t.to(CPU, copy=True))


def no_accelerate_hooks(*models: torch.nn.Module) -> bool:
    return not any(hasattr(m, "_hf_hook") or hasattr(m, "_old_forward") for model in models for m in model.modules())


# ----------------------------------------------------------------------------- the context manager
@pytest.fixture
def models(tiny_lumina2):
    """The tiny Lumina 2 transformer, int8-quanto base with a PEFT LoRA, and the tiny FLUX-shaped VAE."""
    from diffusers import Lumina2Transformer2DModel
    from peft import LoraConfig

    tr = Lumina2Transformer2DModel.from_pretrained(tiny_lumina2, subfolder="transformer")
    quantize_model(tr, "int8-quanto")
    tr.requires_grad_(False)
    torch.manual_seed(1)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    torch.manual_seed(2)
    return fresh_memory(tr.eval()), make_flux_vae()


def lumina_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 8, 8, generator=g),
        "timestep": torch.tensor([0.4]),
        "encoder_hidden_states": torch.randn(1, 9, 32, generator=g),
        "encoder_attention_mask": torch.ones(1, 9, dtype=torch.long),
    }


def render(tr: torch.nn.Module, vae: torch.nn.Module, reference: torch.Tensor | None) -> torch.Tensor:
    """What a pipeline does with the two models: (encode the reference,) denoise twice, decode."""
    inputs = lumina_inputs()
    if reference is not None:
        inputs["hidden_states"] = vae.encode(reference).latent_dist.mean
    for _ in range(2):
        inputs["hidden_states"] = inputs["hidden_states"] - 0.1 * tr(**inputs, return_dict=False)[0]
    return vae.decode(inputs["hidden_states"]).sample


def test_transformer_and_vae_take_turns_and_leave_no_trace(models, monkeypatch):
    tr, vae = models
    reference = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = [render(tr, vae, reference), render(tr, vae, None)]
    lora = [p for n, p in tr.named_parameters() if "lora_" in n]
    values = [p.detach().clone() for p in lora]

    placement = Placement(monkeypatch, transformer=(tr, "device"), vae=(vae, "cpu"))
    placement.watch("transformer", tr.layers[0])
    placement.watch("vae", vae.encoder)
    placement.watch("vae", vae.decoder)
    got = []
    with torch.no_grad(), model_cpu_offload(tr, vae, FAKE, True) as offload:
        assert tr._hf_hook.execution_device == vae._hf_hook.execution_device == FAKE  # what pipelines read
        for ref in (reference, None):  # i2i (encodes before denoising), then t2i
            offload.before_render()
            assert placement.where == {"transformer": "device", "vae": "cpu"}
            got.append(render(tr, vae, ref))
    placement.assert_took_turns()
    assert placement.moves == [
        ("transformer", "cpu"),  # the reference is encoded...
        ("vae", "device"),
        ("vae", "cpu"),  # ...denoising...
        ("transformer", "device"),
        ("transformer", "cpu"),  # ...decoding
        ("vae", "device"),
        ("vae", "cpu"),  # before_render: the next render starts with the transformer on the device
        ("transformer", "device"),
        ("transformer", "cpu"),
        ("vae", "device"),
        ("vae", "cpu"),  # exit: the VAE off, the transformer back on the training device
        ("transformer", "device"),
    ]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # afterwards: no hook left, the same Parameter objects (the optimizer's) with the same values
    assert no_accelerate_hooks(tr, vae)
    assert "forward" not in tr.__dict__ and "forward" not in vae.__dict__
    after = [p for n, p in tr.named_parameters() if "lora_" in n]
    assert len(after) == len(lora) and all(a is b for a, b in zip(after, lora))
    assert all(torch.equal(p, v) and p.requires_grad for p, v in zip(lora, values))
    with torch.no_grad():
        assert torch.equal(render(tr, vae, None), expected[1])  # moved, quantised weights compute the same


def test_a_failing_render_still_restores_everything(models, monkeypatch):
    tr, vae = models
    placement = Placement(monkeypatch, transformer=(tr, "device"), vae=(vae, "cpu"))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), model_cpu_offload(tr, vae, FAKE, True):
        vae.decode(torch.randn(1, 16, 8, 8))
        raise RuntimeError("boom")
    assert placement.where == {"transformer": "device", "vae": "cpu"}
    assert no_accelerate_hooks(tr, vae)


def test_off_the_vae_joins_the_transformer_and_on_the_cpu_nothing_moves(models, monkeypatch, caplog):
    tr, vae = models
    placement = Placement(monkeypatch, transformer=(tr, "device"), vae=(vae, "cpu"))
    with model_cpu_offload(tr, vae, FAKE, False) as offload:
        offload.before_render()
        assert placement.where == {"transformer": "device", "vae": "device"}
        assert no_accelerate_hooks(tr, vae)
    assert placement.moves == [("vae", "device"), ("vae", "cpu")]

    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger=validation_offload.__name__):
        with model_cpu_offload(tr, vae, "cpu", True) as offload:
            offload.before_render()
            assert no_accelerate_hooks(tr, vae)
    assert "validation runs on the CPU, there is nothing to offload" in caplog.text


# ----------------------------------------------------------------------------- the engine
def test_validation_renders_the_same_images_with_offload_and_training_continues(tiny_lumina2, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", {"img": "a red circle, tunertest style"})
    raw = lumina_spec(
        tiny_lumina2,
        data,
        tmp_path / "out",
        training={"max_train_steps": 2, "use_ema": True},
        checkpointing={"checkpoint_step_interval": None},
        validation={
            "validation_disable": False,
            "validation_prompt": "a red circle",  # and the unconditional render: two renders per validation
            "validation_resolution": "64x64",
            "validation_num_inference_steps": 2,
        },
    )
    trainer = Trainer(TrainSpec.model_validate(raw))
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    trainer.validate(0)  # loads the validation VAE
    fresh_memory(trainer.transformer), fresh_memory(trainer._val_vae)
    reference = trainer.validate(1)  # flag off

    spec = trainer.spec
    trainer.spec = spec.model_copy(update={"memory": spec.memory.model_copy(update={"enable_model_cpu_offload": True})})
    trainer.device = FAKE  # the training device is the stand-in accelerator from here on
    params = list(trainer.params)
    assert all(a is b for a, b in zip(params, trainer.optimizer.param_groups[0]["params"]))
    values = [p.detach().clone() for p in params]
    placement = Placement(monkeypatch, transformer=(trainer.transformer, "device"), vae=(trainer._val_vae, "cpu"))
    placement.watch("transformer", trainer.transformer.layers[0])
    placement.watch("vae", trainer._val_vae.decoder)
    at_render = []  # the families read the device for the embeddings off the transformer's parameters
    family_render = trainer.family.render
    monkeypatch.setattr(
        trainer.family, "render", lambda *a, **k: at_render.append(dict(placement.where)) or family_render(*a, **k)
    )
    for step in (2, 3):  # twice: the hooks go and come back cleanly
        files = trainer.validate(step)
        assert [f.name for f in files] == [f.name for f in reference] and len(files) == 2
        for a, b in zip(files, reference):
            assert ImageChops.difference(Image.open(a), Image.open(b)).getbbox() is None, a.name
    placement.assert_took_turns()
    assert at_render == [{"transformer": "device", "vae": "cpu"}] * 4
    assert placement.where == {"transformer": "device", "vae": "cpu"}
    assert no_accelerate_hooks(trainer.transformer, trainer._val_vae)
    assert trainer.transformer.training
    assert all(a is b for a, b in zip(params, trainer.optimizer.param_groups[0]["params"]))
    assert all(a is b for a, b in zip(params, trainer.params))
    assert all(torch.equal(p, v) for p, v in zip(params, values))

    monkeypatch.undo()  # training continues from there
    trainer.device = CPU
    result = trainer.train()
    assert result.steps == 2 and Path(result.lora.diffusers).is_file()
