"""Issue 18, tracking: SimpleTuner's ``report_to`` logs a run to TensorBoard or Weights & Biases.

The trackers read the run's events (``trainer_core.tracking``), so what they hold is checked
against the events of the same tiny Lumina 2 run: TensorBoard's event files are read back with
TensorBoard's own reader, and wandb runs offline (no network) and its run file is read record by
record. A missing package is refused before any model loads, a tracker that fails mid-run warns and
the run finishes, and the tracking settings travel through SimpleTuner configs and the Tracking
node without changing the run folder.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers.datasets import lumina_spec, write_dataset

from trainer_core import tracking
from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.simpletuner import UNSUPPORTED_MESSAGE, export_simpletuner, import_simpletuner
from trainer_core.spec import TrainSpec
from trainer_core.train import run_definition as definition
from trainer_core.train.engine import Trainer

VALIDATION = {
    "validation_disable": False,
    "validation_prompt": "a red circle",
    "validation_resolution": "64x64",
    "validation_num_inference_steps": 1,
    "validation_disable_unconditional": True,
    "validation_step_interval": 2,
}


@pytest.fixture
def one_image(tmp_path) -> Path:
    return write_dataset(tmp_path / "data", {"img": "a red circle, tunertest style"})


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch) -> Path:
    """wandb with no network, in every test here: offline mode, its files under tmp_path, no prompts."""
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(folder),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return folder


def spec_for(tiny_lumina2, data, out, **overrides) -> TrainSpec:
    return TrainSpec.model_validate(lumina_spec(tiny_lumina2, data, out, **overrides))


def tracked_run(spec: TrainSpec, **kwargs) -> ListSink:
    """A run as the CLI starts one: the run's events go through the trackers of ``spec.tracking``."""
    sink = ListSink()
    with tracking.tracked(spec, sink) as events:
        Trainer(spec, events, **kwargs).run()
    return sink


# ---------------------------------------------------------------------- TensorBoard
def test_tensorboard_holds_the_loss_lr_grad_norm_and_validation_images_of_each_step(tiny_lumina2, one_image, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    spec = spec_for(
        tiny_lumina2,
        one_image,
        out,
        training={"max_train_steps": 4},
        validation=VALIDATION,
        tracking={"report_to": "tensorboard", "tracker_project_name": "circles"},
    )
    sink = tracked_run(spec)
    progress = sink.of("progress")
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert all("grad_norm" in e for e in progress)  # max_grad_norm 1.0 by norm: the norm is reported

    folder = out / "logs" / "circles"  # <output_dir>/<logging_dir>/<project>, as accelerate does for SimpleTuner
    assert list(folder.glob("events.out.tfevents.*"))
    board = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    board.Reload()
    scalars = board.Tags()["scalars"]
    assert {"train_loss", "learning_rate", "grad_norm", "epoch"} <= set(scalars)
    loss = board.Scalars("train_loss")
    assert [s.step for s in loss] == [1, 2, 3, 4]
    assert [s.value for s in loss] == pytest.approx([e["loss"] for e in progress], rel=1e-6)
    assert [s.value for s in board.Scalars("learning_rate")] == pytest.approx([e["lr"] for e in progress])
    assert [s.value for s in board.Scalars("grad_norm")] == pytest.approx([e["grad_norm"] for e in progress], 1e-6)

    # every validation image, at its step (0: the base model, then every 2 steps, the last at the end)
    validation = sink.of("validation")
    assert [v["step"] for v in validation] == [0, 2, 4]
    (tag,) = board.Tags()["images"]
    assert tag == f"validation/{Path(validation[0]['files'][0]).stem}"
    images = board.Images(tag)
    assert [i.step for i in images] == [0, 2, 4]
    assert (images[0].width, images[0].height) == (64, 64)
    # the settings, as text
    assert "spec" in " ".join(board.Tags()["tensors"])


# ---------------------------------------------------------------------- wandb
def wandb_records(path: Path):
    """The records of a wandb run file (``run-<id>.wandb``), as protobuf messages.

    The file is wandb's log format: a 7-byte header (``:W&B``, magic, version), then records in
    32 KiB blocks, each with a 7-byte header (checksum, length, kind: 1 whole, 2 first, 3 middle,
    4 last). wandb 0.31 reads it in its Go core only, so this is the few lines of Python it takes.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_file: Path) -> dict[int, dict[str, str]]:
    """step -> {key: JSON value} of every ``run.log``, merged per step as wandb does."""
    rows: dict[int, dict[str, str]] = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


def test_an_offline_wandb_run_holds_the_history_the_images_and_the_spec(
    tiny_lumina2, one_image, tmp_path, offline_wandb
):
    out = tmp_path / "out"
    spec = spec_for(
        tiny_lumina2,
        one_image,
        out,
        training={"max_train_steps": 4},
        validation=VALIDATION,
        tracking={"report_to": "wandb", "tracker_project_name": "circles", "tracker_run_name": "first try"},
    )
    sink = tracked_run(spec)
    assert not [w for w in sink.of("warning") if "wandb" in w["message"]]
    # WANDB_MODE=offline: one run folder, which `wandb sync` uploads later
    (run_dir,) = (offline_wandb / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    records = list(wandb_records(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "circles" and run.display_name == "first try"
    config = {u.key for u in run.config.update}
    assert {"model", "lora", "optimizer", "tracking", "run"} <= config  # the spec, and what the run reported

    history = wandb_history(run_file)
    progress = sink.of("progress")
    for event in progress:
        row = history[event["step"]]
        assert float(row["train_loss"]) == pytest.approx(event["loss"])
        assert float(row["learning_rate"]) == pytest.approx(event["lr"])
        assert float(row["grad_norm"]) == pytest.approx(event["grad_norm"])
    images = {
        step: [k for k in row if k.startswith("validation/") and k.endswith("/_type")] for step, row in history.items()
    }
    assert sorted(step for step, keys in images.items() if keys) == [0, 2, 4]
    assert list(run_dir.glob("files/media/images/validation/*.png"))


def test_the_command_line_logs_to_both_and_keeps_stdout_json_and_stderr_ours(
    tiny_lumina2, one_image, tmp_path, offline_wandb, monkeypatch
):
    """The ComfyUI node's child is ``python -m trainer_core run spec.json --events jsonl``: its stdout is
    read as JSON lines, so wandb must not print there, and the terminal shows only this project's lines."""
    import json

    from test_cli_output import check_terminal, run_cli

    monkeypatch.delenv("WANDB_DIR")  # wandb's run then goes into logging_dir, beside TensorBoard's files
    out = tmp_path / "out"
    spec = lumina_spec(
        tiny_lumina2, one_image, out, training={"max_train_steps": 3}, tracking={"report_to": "tensorboard,wandb"}
    )
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = run_cli("run", str(tmp_path / "spec.json"), "--events", "jsonl")
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is an event
    assert events[-1]["type"] == "done" and not [e for e in events if e["type"] == "warning"]
    check_terminal(proc.stderr)
    assert list((out / "logs" / "comfyui-tuner").glob("events.out.tfevents.*"))
    (run_dir,) = (out / "logs" / "wandb").glob("offline-run-*")
    history = wandb_history(next(run_dir.glob("run-*.wandb")))
    assert sorted(history) == [1, 2, 3]


def test_a_resumed_run_continues_the_tensorboard_curve_without_repeating_steps(tiny_lumina2, one_image, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    tracked_run(
        spec_for(tiny_lumina2, one_image, out, training={"max_train_steps": 4}, tracking={"report_to": "tensorboard"})
    )
    sink = tracked_run(
        spec_for(tiny_lumina2, one_image, out, training={"max_train_steps": 6}, tracking={"report_to": "tensorboard"})
    )
    assert sink.of("resumed")[0]["step"] == 4
    board = EventAccumulator(str(out / "logs" / "comfyui-tuner"), size_guidance={"scalars": 0})
    board.Reload()
    assert [s.step for s in board.Scalars("train_loss")] == [1, 2, 3, 4, 5, 6]


def test_an_evaluation_event_is_logged_under_eval(tmp_path):
    """The CLIP evaluation (issue 18) emits ``evaluation`` {step, clip_score, ...}: its numbers go to eval/."""
    recorder = Recorder()
    spec = TrainSpec(output_dir=str(tmp_path), tracking={"report_to": "tensorboard"})
    sink = tracking.TrackingSink(spec, ListSink(), [recorder])
    sink.emit("started", total_steps=10)
    sink.emit("progress", step=1, total=10, loss=0.5, lr=1e-4, it_s=2.0, eta_s=4.5, epoch=1, crepa_loss=0.2)
    sink.emit("evaluation", step=1, clip_score=27.5, prompts=3, model="openai/clip-vit-large-patch14")
    assert recorder.logged == [
        (1, {"train_loss": 0.5, "learning_rate": 1e-4, "iterations_per_second": 2.0, "epoch": 1.0, "crepa_loss": 0.2}),
        (1, {"eval/clip_score": 27.5, "eval/prompts": 3.0}),
    ]


# ---------------------------------------------------------------------- failures
class Recorder(tracking.Tracker):
    """A tracker that keeps what it is given (and can be told to fail at a step)."""

    name = "recorder"

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.logged: list[tuple[int, dict]] = []
        self.closed = False

    def metrics(self, step, values):
        if step == self.fail_at:
            raise OSError(28, "No space left on device")
        self.logged.append((step, values))

    def close(self):
        self.closed = True


class ExplodingLoads:
    @staticmethod
    def install(monkeypatch):
        from trainer_core.families.lumina2 import Lumina2Family

        def boom(*a, **k):
            raise AssertionError("a model was loaded before the input was checked")

        for name in ("load_text_encoders", "load_vae", "load_transformer"):
            monkeypatch.setattr(Lumina2Family, name, boom)


@pytest.mark.parametrize("report_to, missing", [("wandb", ["wandb"]), ("tensorboard,wandb", ["tensorboard", "wandb"])])
def test_a_missing_tracker_package_is_refused_with_the_install_command_before_any_model_loads(
    tiny_lumina2, one_image, tmp_path, monkeypatch, report_to, missing
):
    ExplodingLoads.install(monkeypatch)
    monkeypatch.setattr(tracking, "installed", lambda name: name not in missing)
    spec = spec_for(tiny_lumina2, one_image, tmp_path / "out", tracking={"report_to": report_to})
    with pytest.raises(ConfigError) as raised:
        tracked_run(spec)
    assert "not installed" in raised.value.message
    assert raised.value.hint.count("pip install") == 1 and all(f'"{m}>=' in raised.value.hint for m in missing)
    with pytest.raises(ConfigError, match="not installed"):  # the engine's own checks say it too (nodes, cache)
        Trainer(spec).run()
    # "all" keeps what is installed, and only refuses when nothing is
    monkeypatch.setattr(tracking, "installed", lambda name: name == "tensorboard")
    assert tracking.active_trackers(TrainSpec(tracking={"report_to": "all"})) == ["tensorboard"]
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    with pytest.raises(ConfigError, match="neither tensorboard nor wandb"):
        tracking.check_tracking(TrainSpec(tracking={"report_to": "all"}))


def test_a_tracker_that_fails_mid_run_warns_once_and_the_run_finishes(tiny_lumina2, one_image, tmp_path):
    spec = spec_for(tiny_lumina2, one_image, tmp_path / "out", tracking={"report_to": "tensorboard"})
    failing, healthy, sink = Recorder(fail_at=3), Recorder(), ListSink()
    tracked = tracking.TrackingSink(spec, sink, [failing, healthy])
    try:
        Trainer(spec, tracked).run()
    finally:
        tracked.close()
    (warning,) = [w["message"] for w in sink.of("warning") if "recorder" in w["message"]]
    assert "No space left on device" in warning and "training goes on" in warning
    assert sink.events[-1]["type"] == "done" and sink.events[-1]["steps"] == 6
    assert [step for step, _ in failing.logged] == [1, 2] and failing.closed  # switched off at step 3
    assert [step for step, _ in healthy.logged] == [1, 2, 3, 4, 5, 6] and healthy.closed


def test_trackers_are_closed_when_the_run_is_cancelled(tiny_lumina2, one_image, tmp_path, monkeypatch):
    import threading

    made: list[Recorder] = []
    monkeypatch.setitem(tracking.TRACKER_CLASSES, "tensorboard", lambda: made.append(Recorder()) or made[-1])
    cancel = threading.Event()

    class CancelAtTwo(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 2:
                cancel.set()

    spec = spec_for(tiny_lumina2, one_image, tmp_path / "out", tracking={"report_to": "tensorboard"})
    sink = CancelAtTwo()
    with tracking.tracked(spec, sink) as events:
        Trainer(spec, events, cancel=cancel).run()
    assert sink.of("cancelled") and made[0].closed and [s for s, _ in made[0].logged] == [1, 2]


# ---------------------------------------------------------------------- settings
def test_simpletuner_tracker_keys_import_and_export_round_trip():
    config = {
        "report_to": "tensorboard",
        "tracker_project_name": "lumina2-training",
        "tracker_run_name": "first",
        "logging_dir": "tb-logs",
    }
    result = import_simpletuner(config)
    assert result.unsupported_keys == [] and not [w for w in result.warnings if w.startswith(UNSUPPORTED_MESSAGE)]
    t = result.spec.tracking
    assert (t.report_to, t.tracker_project_name, t.tracker_run_name, t.logging_dir) == (
        "tensorboard",
        "lumina2-training",
        "first",
        "tb-logs",
    )
    exported, backend = export_simpletuner(result.spec)
    assert {k: exported[k] for k in config} == config
    assert import_simpletuner(exported, backend).spec == result.spec

    # several trackers: SimpleTuner hands accelerate a list, so export writes one
    both = import_simpletuner({"report_to": ["wandb", "tensorboard"]}).spec
    assert both.tracking.trackers() == ["tensorboard", "wandb"]
    assert export_simpletuner(both)[0]["report_to"] == ["wandb", "tensorboard"]
    assert import_simpletuner(*export_simpletuner(both)).spec == both
    # SimpleTuner's spellings of "no tracker", and its default
    for none in (None, "", "none", "None"):
        assert import_simpletuner({"report_to": none}).spec.tracking.report_to == "none"
    assert "report_to" not in export_simpletuner(TrainSpec())[0]  # none is SimpleTuner's default too


@pytest.mark.parametrize("value", ["comet_ml", "simpletuner", "custom-tracker", "tensorboard,mlflow"])
def test_a_tracker_comfyui_tuner_does_not_have_is_refused_by_name(value):
    with pytest.raises(ConfigError, match=r"report_to: report_to '(comet_ml|simpletuner|custom-tracker|mlflow)'"):
        import_simpletuner({"report_to": value})


# ---------------------------------------------------------------------- the Tracking node
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


def test_the_tracking_node_feeds_both_trainers_and_keeps_the_run_folder(comfy, tmp_path):
    from test_nodes import assemble, fragments, run

    out = run(comfy, "TunerTracking", report_to="tensorboard", project="circles", run_name="", logging_dir="tb")
    assert out[0] == {
        "tracking": {
            "report_to": "tensorboard",
            "tracker_project_name": "circles",
            "tracker_run_name": None,
            "logging_dir": "tb",
        }
    }
    model, dataset, _ = fragments(comfy, tmp_path)
    plain = assemble(comfy, model=model, dataset=dataset)
    spec = assemble(comfy, model=model, dataset=dataset, tracking=out[0])
    assert spec.tracking.report_to == "tensorboard" and spec.tracking.tracker_project_name == "circles"
    assert spec.output_dir == plain.output_dir  # tracking does not shape the training: the same run folder
    assert tracking.run_name(spec) == Path(spec.output_dir).name  # no run name: the run folder's
    full = assemble(comfy, model=model, dataset=dataset, tracking=out[0], model_type="full")
    assert full.tracking == spec.tracking
    for node_id in ("TunerTrainLoRA", "TunerFinetuneModel"):  # after the older inputs: saved workflows keep links
        inputs = comfy["nodes"][node_id].GET_SCHEMA().inputs
        assert inputs[-2].id == "tracking" and inputs[-2].optional  # then publish (test_publish.py)
    # nor does a resume compare them: changing trackers continues the checkpoint
    before, after = (definition.run_definition(s.model_dump(mode="json")) for s in (plain, spec))
    assert definition.changes(before, after) == []


def test_the_tracking_node_refuses_a_missing_package_on_the_node(comfy, monkeypatch):
    from importlib import import_module

    from comfy_stub import harness
    from test_nodes import pack_errors, run

    pack_tracking = import_module(harness.module_name() + ".trainer_core.tracking")
    monkeypatch.setattr(pack_tracking, "installed", lambda name: name != "wandb")
    with pytest.raises(pack_errors().ConfigError, match="wandb"):
        run(comfy, "TunerTracking", report_to="wandb")
