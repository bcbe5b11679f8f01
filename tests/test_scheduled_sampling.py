"""Scheduled Sampling (rollout): what it does, what it costs, and that it changes nothing when off.

With SimpleTuner's ``scheduled_sampling_*`` keys, a micro-batch is sometimes first denoised by the
current weights for ``k`` Euler steps (no gradient) from ``sigma' = sigma + k/1000`` down to its
training noise level, and the normal flow loss is taken on that self-made input
(``trainer_core/train/scheduled_sampling.py`` says why and defines each step).
"""

from __future__ import annotations

import math
import threading
from importlib import import_module

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from safetensors.torch import load_file

from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.families.kandinsky5_image import Kandinsky5ImageFamily
from trainer_core.families.kandinsky5_video import Kandinsky5VideoFamily
from trainer_core.families.lumina2 import Lumina2Family
from trainer_core.simpletuner import UNSUPPORTED_MESSAGE, export_simpletuner, import_simpletuner
from trainer_core.spec import ScheduledSamplingSpec, TrainSpec, build_spec
from trainer_core.train import scheduled_sampling as ss
from trainer_core.train.engine import Trainer, _step_seed

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def rollout(**values) -> dict:
    """A scheduled_sampling section in SimpleTuner's keys, without the common prefix."""
    return {f"scheduled_sampling_{k}": v for k, v in values.items()}


@pytest.fixture
def three_images(tmp_path):
    return write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle", "c": "a green circle"})


def spec_for(tiny_lumina2, data, out, section: dict | None = None, **overrides) -> TrainSpec:
    raw = lumina_spec(tiny_lumina2, data, out, **overrides)
    if section is not None:
        raw["scheduled_sampling"] = section
    return TrainSpec.model_validate(raw)


# ---------------------------------------------------------------------------- when, and how far
def test_without_a_ramp_the_probability_is_the_fixed_one():
    spec = ScheduledSamplingSpec(**rollout(max_step_offset=4, probability=0.3))
    assert [ss.probability_at(spec, step) for step in (0, 10, 10_000)] == [0.3, 0.3, 0.3]


def test_the_ramp_goes_from_prob_start_to_prob_end_as_in_simpletuner():
    linear = ScheduledSamplingSpec(
        **rollout(max_step_offset=4, prob_start=0.1, prob_end=0.5, ramp_steps=100, start_step=10)
    )
    at = {step: ss.probability_at(linear, step) for step in (0, 10, 60, 110, 5000)}
    assert at == pytest.approx({0: 0.1, 10: 0.1, 60: 0.3, 110: 0.5, 5000: 0.5})
    cosine = linear.model_copy(update={"scheduled_sampling_ramp_shape": "cosine"})
    assert ss.probability_at(cosine, 60) == pytest.approx(0.3)  # the midpoint is the same
    quarter = 0.5 - 0.5 * math.cos(math.pi / 4)
    assert ss.probability_at(cosine, 35) == pytest.approx(0.1 + 0.4 * quarter)  # slow start
    # prob_start left unset starts the ramp at scheduled_sampling_probability (SimpleTuner's fallback)
    unset = ScheduledSamplingSpec(**rollout(max_step_offset=4, probability=0.2, ramp_steps=10))
    assert ss.probability_at(unset, 0) == pytest.approx(0.2) and ss.probability_at(unset, 10) == pytest.approx(0.5)


def test_offsets_fire_at_the_probability_cover_1_to_max_and_repeat_for_the_same_seed():
    spec = ScheduledSamplingSpec(**rollout(max_step_offset=4, probability=0.25))
    draws = [ss.draw_offset(spec, step=0, seed=seed) for seed in range(4000)]
    fired = [k for k in draws if k]
    assert abs(len(fired) / len(draws) - 0.25) < 0.03
    assert set(fired) == {1, 2, 3, 4}
    assert draws == [ss.draw_offset(spec, step=0, seed=seed) for seed in range(4000)]  # deterministic
    early = ScheduledSamplingSpec(**rollout(max_step_offset=4, probability=1.0, strategy="biased_early"))
    late = early.model_copy(update={"scheduled_sampling_strategy": "biased_late"})

    def mean(spec: ScheduledSamplingSpec) -> float:
        return sum(ss.draw_offset(spec, 0, n) for n in range(2000)) / 2000

    assert mean(early) < 2.5 < mean(late)


def test_the_rollout_starts_k_thousandths_noisier_and_ends_exactly_at_the_training_sigma():
    sigma = torch.tensor([0.5, 0.9995])
    grid = ss.rollout_sigmas(sigma, 3)
    assert grid.shape == (4, 2)
    assert grid[0, 0].item() == pytest.approx(0.503) and torch.equal(grid[-1], sigma)
    assert grid[0, 1].item() == pytest.approx(1 - 1e-5)  # never beyond pure noise
    assert bool((grid[:-1] >= grid[1:]).all())  # noisiest first, equal steps down


@pytest.mark.parametrize("family_class", [Lumina2Family, Kandinsky5ImageFamily])
def test_a_perfect_model_rolls_out_onto_the_true_noise_path(family_class):
    """Each family's prediction (Lumina 2: x0 - noise, Kandinsky 5: noise - x0) is turned into dx/dsigma
    correctly: a model that predicts the true target makes Euler land on the training input itself."""
    family = object.__new__(family_class)  # target and prepare_noisy need no loaded model
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    sigma = torch.tensor([0.3, 0.7])

    def perfect(noisy, sig):
        return family.target(x0, noise)

    rolled = ss.roll_out(family, perfect, x0, noise, sigma, k=4)
    torch.testing.assert_close(rolled, family.prepare_noisy(x0, noise, sigma)[0], atol=1e-6, rtol=0)


def test_image_to_video_keeps_its_clean_condition_frame_through_the_rollout():
    """The first latent frame of I2V is the input image, not generated: whatever the model predicts for it,
    the rollout hands back the clean frame, as the training input has it."""

    class I2V(Kandinsky5VideoFamily):
        is_i2v = True

    family = object.__new__(I2V)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 3, 4, 4, 8, generator=gen), torch.randn(1, 3, 4, 4, 8, generator=gen)

    def drifting(noisy, sig):
        return torch.randn(noisy.shape, generator=gen)

    rolled = ss.roll_out(family, drifting, x0, noise, torch.tensor([0.4]), k=3)
    assert torch.equal(rolled[:, 0], x0[:, 0])
    assert not torch.allclose(rolled[:, 1:], family.prepare_noisy(x0, noise, torch.tensor([0.4]))[0][:, 1:])


# ---------------------------------------------------------------------------- ReflexFlow
@pytest.mark.parametrize("family_class", [Lumina2Family, Kandinsky5ImageFamily])
def test_reflexflow_adds_nothing_for_a_perfect_prediction_and_beta1_times_4_for_a_reversed_one(family_class):
    """Anti-drift compares the prediction's direction (as dx/dsigma, whatever the family predicts) with the
    direction from the data to the input: equal for the true target, opposite for its negation (|a - b|^2 = 4)."""
    family = object.__new__(family_class)
    spec = ScheduledSamplingSpec(**rollout(max_step_offset=2, probability=1))  # ReflexFlow on by default
    assert spec.reflexflow_enabled and spec.scheduled_sampling_reflexflow_beta1 == 10.0
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    noisy, _ = family.prepare_noisy(x0, noise, sigma)
    target = family.target(x0, noise)
    sign = ss.velocity_sign(family)

    def loss(pred, clean=None, **update):
        s = spec.model_copy(update={f"scheduled_sampling_reflexflow_{k}": v for k, v in update.items()})
        return ss.reflexflow_loss(s, sign, pred, target, noisy, x0, clean, loss_type="l2", huber_c=0.1, weights=None)

    torch.testing.assert_close(loss(target), torch.zeros(2), atol=1e-6, rtol=0)
    plain = ((2 * target) ** 2).reshape(2, -1).mean(dim=1)
    torch.testing.assert_close(loss(-target), plain + 40.0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss(-target, beta2=0.5), 0.5 * plain + 40.0, rtol=1e-5, atol=1e-4)
    # frequency compensation: no exposure (clean == biased) weighs 1; an exposure re-weights the elements
    torch.testing.assert_close(loss(-target, clean=-target), loss(-target))
    assert not torch.allclose(loss(-target, clean=target), loss(-target))


def test_reflexflow_off_trains_the_plain_flow_loss_on_the_rolled_input(tiny_lumina2, three_images, tmp_path):
    runs = {}
    for name, flag in (("on", None), ("off", False)):
        section = rollout(max_step_offset=2, probability=1, reflexflow=flag)
        runs[name] = Trainer(spec_for(tiny_lumina2, three_images, tmp_path / name, section)).run().loss_history
    assert runs["on"] != runs["off"]  # beta1 * anti-drift is added to every step's loss
    assert all(on > off for (_, on), (_, off) in zip(runs["on"], runs["off"]))


# ---------------------------------------------------------------------------- in the engine
def final_adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.lora.diffusers))


def test_probability_zero_trains_bit_for_bit_as_without_scheduled_sampling(tiny_lumina2, three_images, tmp_path):
    plain = Trainer(spec_for(tiny_lumina2, three_images, tmp_path / "plain")).run()
    sink = ListSink()
    zero = spec_for(tiny_lumina2, three_images, tmp_path / "zero", rollout(max_step_offset=4, probability=0.0))
    off = Trainer(zero, sink).run()
    assert off.loss_history == plain.loss_history
    a, b = final_adapter(plain), final_adapter(off)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("rollout_passes" not in e for e in sink.of("progress"))  # nothing to report when it never fires


class ForwardSpy:
    """Counts the transformer's forward passes, and whether each ran with autograd."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.calls: list[tuple[bool, bool]] = []  # (grad enabled, output requires grad)
        self.handle = transformer.register_forward_hook(self.record)

    def record(self, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self.calls.append((torch.is_grad_enabled(), bool(out.requires_grad)))


def built_trainer(tiny_lumina2, data, out, section: dict) -> tuple[Trainer, ListSink]:
    sink = ListSink()
    trainer = Trainer(spec_for(tiny_lumina2, data, out, section), sink)
    trainer.prepare()
    trainer.open_resume()
    trainer.fill_caches()
    trainer.build_model()
    return trainer, sink


@pytest.mark.parametrize(("k", "reflexflow", "passes"), [(1, False, 1), (2, False, 2), (4, False, 4), (2, None, 3)])
def test_a_rollout_of_k_steps_adds_exactly_k_forward_passes_without_gradient(
    tiny_lumina2, three_images, tmp_path, monkeypatch, k, reflexflow, passes
):
    """k rollout steps are k passes; ReflexFlow (on unless turned off) adds one for its clean prediction."""
    section = rollout(max_step_offset=4, probability=1, reflexflow=reflexflow)
    trainer, _ = built_trainer(tiny_lumina2, three_images, tmp_path / "out", section)
    monkeypatch.setattr(ss, "draw_offset", lambda spec, step, seed: k)
    spy = ForwardSpy(trainer.transformer)
    trainer.train_step(0, 1)
    rollout_calls = [c for c in spy.calls if not c[0]]
    training_calls = [c for c in spy.calls if c[0]]
    assert len(rollout_calls) == passes and len(training_calls) == 1
    assert not any(requires_grad for _, requires_grad in rollout_calls)  # no graph, so no gradient, from the rollout
    assert trainer.rollout_passes == passes and trainer.rollout.passes_total == passes


def test_the_trained_input_is_the_rollout_result_and_carries_no_graph(tiny_lumina2, three_images, tmp_path):
    section = rollout(max_step_offset=3, probability=1, reflexflow=False)
    trainer, _ = built_trainer(tiny_lumina2, three_images, tmp_path / "out", section)
    seen: list[torch.Tensor] = []
    original = trainer.family.predict

    def spying_predict(transformer, noisy, sigma, text, **extra):
        if torch.is_grad_enabled():
            seen.append(noisy)
        return original(transformer, noisy, sigma, text, **extra)

    trainer.family.predict = spying_predict  # instance attribute: this trainer's family only
    trainer.train_step(0, 1)
    assert len(seen) == 1 and seen[0].grad_fn is None and not seen[0].requires_grad
    assert any(p.grad is None for p in trainer.params)  # zero_grad(set_to_none) ran: one clean update


def test_progress_events_count_this_steps_and_all_rollout_passes(tiny_lumina2, three_images, tmp_path):
    section = rollout(max_step_offset=3, probability=0.5, reflexflow=False)
    sink = ListSink()
    Trainer(spec_for(tiny_lumina2, three_images, tmp_path / "out", section), sink).run()
    events = sink.of("progress")
    per_step = [e["rollout_passes"] for e in events]
    assert [e["rollout_passes_total"] for e in events] == [sum(per_step[: i + 1]) for i in range(len(per_step))]
    spec = ScheduledSamplingSpec(**section)
    seed = 3  # lumina_spec's
    assert per_step == [ss.draw_offset(spec, n, _step_seed(seed, n, 0)) for n in range(6)]  # the plan, step by step
    assert sum(per_step) > 0


def test_resume_with_scheduled_sampling_equals_the_uninterrupted_run(tiny_lumina2, three_images, tmp_path):
    overrides = dict(
        training={
            "max_train_steps": 6,
            "gradient_accumulation_steps": 2,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": False,
            "seed": 5,
        },
        lora={"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        checkpointing={"checkpoint_step_interval": 2},
    )
    section = rollout(max_step_offset=3, probability=0.6)
    straight_sink = ListSink()
    straight = Trainer(spec_for(tiny_lumina2, three_images, tmp_path / "straight", section, **overrides), straight_sink)
    straight = straight.run()

    cancel = threading.Event()

    class CancelAtStep3(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 3:
                cancel.set()

    spec = spec_for(tiny_lumina2, three_images, tmp_path / "split", section, **overrides)
    first = Trainer(spec, CancelAtStep3(), cancel=cancel).run()
    assert first.cancelled and first.steps == 3
    sink = ListSink()
    second = Trainer(spec, sink).run()
    assert second.resumed_from.name == "step-3" and second.steps == 6
    assert second.loss_history == straight.loss_history
    a, b = final_adapter(straight), final_adapter(second)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    totals = [e["rollout_passes_total"] for e in straight_sink.of("progress")]
    assert totals[-1] > 0  # it did roll out
    assert [e["rollout_passes_total"] for e in sink.of("progress")] == totals[3:]  # the running total resumes too


# ---------------------------------------------------------------------------- SimpleTuner keys
def test_simpletuner_keys_round_trip():
    section = rollout(
        max_step_offset=6,
        probability=0.3,
        prob_start=0.05,
        prob_end=0.8,
        ramp_steps=200,
        start_step=20,
        ramp_shape="cosine",
        strategy="biased_late",
        reflexflow=True,
        reflexflow_alpha=0.5,
        reflexflow_beta1=2.0,
        reflexflow_beta2=1.5,
    )
    spec = build_spec({"scheduled_sampling": section})
    config, backend = export_simpletuner(spec)
    assert {k: config[k] for k in section} == section  # flat, under SimpleTuner's own names
    again = import_simpletuner(config, backend).spec
    assert again.scheduled_sampling == spec.scheduled_sampling


def test_simpletuners_own_example_imports_with_euler_and_reflexflow_on():
    example = {"scheduled_sampling_max_step_offset": 10, "scheduled_sampling_probability": 1.0,
               "scheduled_sampling_sampler": "unipc", "scheduled_sampling_order": 2}  # fmt: skip
    result = import_simpletuner(example, [])
    imported = result.spec.scheduled_sampling
    assert imported.scheduled_sampling_sampler == "euler" and imported.scheduled_sampling_max_step_offset == 10
    assert imported.reflexflow_enabled  # SimpleTuner's default for flow-matching models
    assert "imports as 'euler'" in "\n".join(result.warnings)
    assert result.unsupported_keys == ["scheduled_sampling_order"]  # unipc's order: meaningless with Euler
    assert UNSUPPORTED_MESSAGE in result.warnings[0]

    declined = import_simpletuner({**example, "scheduled_sampling_reflexflow": "false"}, [])
    assert not declined.spec.scheduled_sampling.reflexflow_enabled


@pytest.mark.parametrize(
    ("section", "words"),
    [
        (rollout(probability=1.5), ["scheduled_sampling_probability", "less than or equal to 1"]),
        (rollout(max_step_offset=-1), ["scheduled_sampling_max_step_offset", "greater than or equal to 0"]),
        (rollout(sampler="unipc"), ["scheduled_sampling_sampler", "not supported", "set it to 'euler'"]),
        (rollout(sampler="heun"), ["unknown scheduled_sampling_sampler 'heun'", "allowed: euler"]),
        (rollout(ramp_shape="exp"), ["scheduled_sampling_ramp_shape", "'linear' or 'cosine'"]),
        (rollout(strategy="random"), ["scheduled_sampling_strategy", "biased_early"]),
        (rollout(reflexflow_beta1=-1), ["scheduled_sampling_reflexflow_beta1", "greater than or equal to 0"]),
    ],
)
def test_bad_values_are_refused_naming_the_key_and_the_fix(section, words):
    """In a spec (JSON, nodes) and in a SimpleTuner import alike; only an imported 'unipc' or 'dpm' becomes
    'euler', which is what SimpleTuner runs for these models (see the test above)."""
    with pytest.raises(ConfigError) as spec_error:
        build_spec({"scheduled_sampling": section})
    messages = [str(spec_error.value)]
    if section.get("scheduled_sampling_sampler") != "unipc":
        with pytest.raises(ConfigError) as import_error:
            import_simpletuner(section, [])
        messages.append(str(import_error.value))
    for message in messages:
        assert all(w in message for w in words), message


# ---------------------------------------------------------------------------- the Regularisers node
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


def test_the_regularisers_node_feeds_train_lora_and_fine_tune_model(comfy, tmp_path):
    from test_nodes import assemble, fragments, run

    out = run(comfy, "TunerRegularisers", max_step_offset=6, probability=0.4, strategy="biased_early")
    section = out[0]["scheduled_sampling"]
    assert section["scheduled_sampling_max_step_offset"] == 6 and section["scheduled_sampling_probability"] == 0.4
    assert section["scheduled_sampling_strategy"] == "biased_early" and section["scheduled_sampling_sampler"] == "euler"

    model, dataset, _ = fragments(comfy, tmp_path)
    plain = assemble(comfy, model=model, dataset=dataset)
    spec = assemble(comfy, model=model, dataset=dataset, regularisers=out[0])
    assert spec.scheduled_sampling.scheduled_sampling_max_step_offset == 6 and spec.scheduled_sampling.enabled
    assert spec.output_dir != plain.output_dir  # another training trajectory: another run folder
    full = assemble(comfy, model=model, dataset=dataset, regularisers=out[0], model_type="full")
    assert full.scheduled_sampling == spec.scheduled_sampling

    for node_id in ("TunerTrainLoRA", "TunerFinetuneModel"):  # after the older inputs: saved workflows keep links
        inputs = comfy["nodes"][node_id].GET_SCHEMA().inputs
        ids = [i.id for i in inputs]
        assert ids[-3:] == ["regularisers", "tracking", "publish"] and inputs[-3].optional  # issue 18 came later
    off = run(comfy, "TunerRegularisers", max_step_offset=0)
    assert not build_spec(off[0]).scheduled_sampling.enabled
    assert spec.scheduled_sampling.reflexflow_enabled  # on by default, as in SimpleTuner
    plain_rollout = run(comfy, "TunerRegularisers", reflexflow=False)[0]
    assert not build_spec(plain_rollout).scheduled_sampling.reflexflow_enabled


def test_runs_without_the_later_settings_keep_the_run_folder_they_had_before_they_existed(comfy, tmp_path, monkeypatch):
    """A graph queued again after an update must continue its run, not start a new one: a spec that
    leaves every later setting (scheduled sampling, CREPA, LyCORIS/DoRA, the EMA placement keys) at its
    default names the folder that the same spec named before they existed (its data without them);
    turning one on names a new folder."""
    from comfy_stub import harness
    from test_nodes import assemble, fragments

    run_spec = import_module(harness.module_name() + ".nodes.run_spec")
    model, dataset, _ = fragments(comfy, tmp_path)
    spec = assemble(comfy, model=model, dataset=dataset)
    now = run_spec.run_identity(spec)
    real_dump = type(spec).model_dump

    def dump_as_before(self, *args, **kwargs):
        data = real_dump(self, *args, **kwargs)
        if isinstance(self, type(spec)):
            for section, keys in run_spec.ADDED_LATER.items():
                for key in keys:
                    (data if not section else data[section]).pop(key)
        return data

    rollout = spec.model_copy(
        update={
            "scheduled_sampling": spec.scheduled_sampling.model_copy(
                update={"scheduled_sampling_max_step_offset": 2, "scheduled_sampling_probability": 0.5}
            )
        }
    )
    assert run_spec.run_identity(rollout) != now
    monkeypatch.setattr(type(spec), "model_dump", dump_as_before)
    assert run_spec.run_identity(spec) == now


def test_the_regularisers_node_sets_crepa_and_left_off_changes_nothing(comfy, tmp_path):
    """CREPA's inputs give the crepa section (SimpleTuner's keys); with rollout and CREPA off, the run
    trains, and is filed, exactly as without the node."""
    from test_nodes import assemble, fragments, pack_errors, run

    model, dataset, _ = fragments(comfy, tmp_path)
    plain = assemble(comfy, model=model, dataset=dataset)
    off = run(comfy, "TunerRegularisers", max_step_offset=0)[0]
    assert off["crepa"] == {"crepa_enabled": False}
    assert assemble(comfy, model=model, dataset=dataset, regularisers=off).output_dir == plain.output_dir

    on = run(
        comfy,
        "TunerRegularisers",
        max_step_offset=0,
        crepa=True,
        crepa_teacher="backbone (deeper block)",
        crepa_block_index=1,
        crepa_teacher_block=2,
        crepa_lambda=0.25,
        crepa_encoder="dinov2_vits14",
    )
    spec = build_spec(on[0]).crepa  # the section, through the spec's own rules
    assert spec.crepa_enabled and spec.crepa_feature_source == "backbone"
    assert (spec.crepa_block_index, spec.crepa_teacher_block_index, spec.crepa_lambda) == (1, 2, 0.25)
    assert spec.crepa_adjacent_distance == 1 and spec.crepa_teacher_cache  # the quick-start's defaults
    assert "CREPA: block 1 aligned with block 2's output" in on.ui.as_dict()["text"][0]
    # the model here is Lumina 2: the backbone teacher trains, the DINOv2 one is refused before any load
    assert assemble(comfy, model=model, dataset=dataset, regularisers=on[0]).crepa.crepa_enabled
    dino_node = run(comfy, "TunerRegularisers", max_step_offset=0, crepa=True)[0]
    dino = dino_node["crepa"]
    assert dino["crepa_feature_source"] == "encoder" and dino["crepa_teacher_block_index"] is None
    with pytest.raises(pack_errors().ConfigError, match="crepa_feature_source 'encoder' is not available for lumina2"):
        assemble(comfy, model=model, dataset=dataset, regularisers=dino_node)


def test_the_regularisers_node_refuses_a_bad_value_with_the_key_named(comfy):
    from test_nodes import pack_errors, run

    with pytest.raises(pack_errors().ConfigError, match="scheduled_sampling_prob_end"):
        run(comfy, "TunerRegularisers", prob_end=1.5)


def test_the_node_shows_the_rollout_passes_while_training(comfy):
    """The progress message to the live chart carries the counts, and the status line shows the running total."""
    import server
    from comfy_stub import harness

    monitor_module = import_module(harness.module_name() + ".nodes.train_monitor")
    monitor = monitor_module.TrainMonitor("9", total=4)
    event = {"type": "progress", "step": 1, "total": 4, "loss": 0.5, "lr": 1e-4, "it_s": 2.0, "eta_s": 1.5}
    monitor.handle({**event, "rollout_passes": 3, "rollout_passes_total": 3})
    monitor.handle({**event, "step": 2, "rollout_passes": 0, "rollout_passes_total": 3})
    sent = server.PromptServer.instance.of("comfyui-tuner.progress")
    assert [(m["rollout_passes"], m["rollout_passes_total"]) for m in sent] == [(3, 3), (0, 3)]
    status = server.PromptServer.instance.of("comfyui-tuner.status")[-1]
    assert "rollout passes 3" in str(status)


def test_the_terminal_progress_line_shows_the_rollout_passes():
    import io

    from trainer_core.events import TerminalSink

    stream = io.StringIO()
    sink = TerminalSink(stream)
    progress = {"step": 2, "total": 2, "loss": 0.25, "lr": 1e-4, "it_s": 1.0, "eta_s": 0}
    sink.emit("progress", **progress, rollout_passes=1, rollout_passes_total=5)
    sink.emit("progress", **progress)  # scheduled sampling off
    first, second = [line for line in stream.getvalue().splitlines() if line.strip()][-2:]
    assert first.rstrip().endswith("rollout 5") and "rollout" not in second
