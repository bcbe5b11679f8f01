"""Run one TrainSpec from a node: reuse a finished run, or train it in a child process.

Train LoRA and Fine-tune Model share it. Re-queue semantics (documented on the Train LoRA node,
``web/docs/TunerTrainLoRA.md``):

- identical inputs: ComfyUI's own cache returns the earlier outputs without running the node; after
  a restart of ComfyUI the node finds the run record of the finished run in its folder and returns
  the same LoRA (or fine-tuned model) file at once, without starting the trainer;
- a changed step count (or validation settings): same run folder (see ``run_spec``), the engine
  resumes from the latest checkpoint and trains only the missing steps;
- ``mode = restart``: the run folder is deleted first, so training starts over.

Cancel (ComfyUI's interrupt, raised by a progress-bar update or the periodic check below) asks the
child to stop; it writes a checkpoint and exits, then the interruption is re-raised so ComfyUI
reports the prompt as interrupted. Any other failure of the child becomes a WorkerError whose
message names the cause, and ComfyUI keeps running. If ComfyUI itself dies, the child sees its stdin
close and stops the same way, with a checkpoint (``trainer_core/worker.py``): it never keeps the GPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trainer_core.io_utils import atomic_write_json
from ..trainer_core.spec import TrainSpec
from ..trainer_core.worker import WorkerProcess
from . import comfy_bridge as bridge
from .train_monitor import TrainMonitor

log = logging.getLogger(__name__)

RUN_RECORD = "comfyui-tuner-run.json"
UI_KEY = "comfyui_tuner"  # Train LoRA's ui output: the run's summary, read by web/comfyui_tuner.js
POLL_SECONDS = 0.25  # how often Cancel is checked while the child is quiet (loading, caching)
CANCEL_TIMEOUT = 300.0  # seconds the child gets to write its checkpoint before it is killed


@dataclass
class RunOutcome:
    run_dir: Path
    steps: int
    # the ComfyUI-format file: a LoRA in loras/comfyui-tuner/, or a full fine-tune's diffusion model in
    # diffusion_models/comfyui-tuner/
    comfyui_file: Path
    history: list[list[float]]
    crepa_history: list[list[float]] = field(default_factory=list)  # [step, CREPA term]: CREPA runs only
    validation_files: list[Path] = field(default_factory=list)
    loss_plot: Path | None = None
    reused: bool = False  # a finished run was found; nothing was trained
    full: bool = False  # a full fine-tune (model_type full), not a LoRA


def latest_checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    """``state.json`` of the newest complete checkpoint (step, loss history...), if any."""
    from ..trainer_core.train.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        return None
    try:
        return json.loads((found[-1][1] / "state.json").read_text())
    except (OSError, ValueError):
        return None


def latest_validation_files(run_dir: Path) -> list[Path]:
    """The samples of the newest validation in ``run_dir`` (one per prompt and resolution)."""
    root = run_dir / "validation"
    steps = sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []
    return sorted(steps[-1].glob("*.png")) if steps else []


def _in_comfy_folder(run_file: Path, spec: TrainSpec, *, fresh: bool) -> Path:
    """The file's place in ComfyUI's model folders: put there after training (``fresh``), or again
    when someone deleted it.

    A LoRA is copied to ``loras/comfyui-tuner`` (the engine copied it there already). A fine-tuned
    model (gigabytes) is hard-linked into ``diffusion_models/comfyui-tuner`` where the file system
    allows it, and copied otherwise; more steps rewrite the run's file, so a fresh one replaces it.
    """
    full = spec.model.model_type == "full"
    folder = spec.export.comfyui_model_dir if full else spec.export.comfyui_lora_dir
    target = Path(folder or run_file.parent) / run_file.name
    if target.is_file() and (not fresh or target.samefile(run_file) or not full):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    linked = False
    if full:
        try:
            os.link(run_file, partial)
            linked = True
        except OSError:  # another file system, or one without hard links
            pass
    if not linked:
        shutil.copy2(run_file, partial)
    os.replace(partial, target)  # never a half-written file under a name the loaders list
    return target


def _outcome(spec: TrainSpec, run_file: Path, steps: int, history: list[list[float]], reused: bool) -> RunOutcome:
    run_dir = Path(spec.output_dir)
    state = latest_checkpoint_state(run_dir)
    if state and state.get("loss_history"):
        history = [list(h) for h in state["loss_history"]]
    plot = run_dir / "loss.png"
    return RunOutcome(
        run_dir=run_dir,
        steps=steps,
        comfyui_file=_in_comfy_folder(run_file, spec, fresh=not reused),
        history=history,
        crepa_history=[list(h) for h in (state or {}).get("crepa_history") or []],
        validation_files=latest_validation_files(run_dir),
        loss_plot=plot if plot.is_file() else None,
        reused=reused,
        full=spec.model.model_type == "full",
    )


def finished_run(spec: TrainSpec) -> RunOutcome | None:
    """The outcome of an identical finished run in the spec's folder, or None."""
    record_path = Path(spec.output_dir) / RUN_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    run_file = Path(record.get("run_lora_file", ""))
    if record.get("spec_fingerprint") != spec.fingerprint() or not run_file.is_file():
        return None
    return _outcome(spec, run_file, int(record.get("steps", 0)), [], reused=True)


def _write_record(spec: TrainSpec, outcome: RunOutcome, run_file: Path) -> None:
    atomic_write_json(
        outcome.run_dir / RUN_RECORD,
        {
            "spec_fingerprint": spec.fingerprint(),
            "steps": outcome.steps,
            "run_lora_file": str(run_file),  # the ComfyUI file in the run folder (a LoRA or a model)
            "lora_file": str(outcome.comfyui_file),  # the key predates full fine-tunes: kept for old records
        },
    )


def run_training(spec: TrainSpec, *, node_id: str | None, mode: str = "resume") -> RunOutcome:
    """Return the finished run for ``spec``, training (or continuing) it first if needed."""
    run_dir = Path(spec.output_dir)
    if mode == "restart" and run_dir.exists():
        log.info("comfyui-tuner: restart requested, deleting %s", run_dir)
        shutil.rmtree(run_dir)
    done = finished_run(spec)
    if done is not None:
        _announce_done(node_id, done)
        return done

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_RECORD).unlink(missing_ok=True)
    spec_path = run_dir / "spec.json"
    spec.save(spec_path)
    bridge.free_comfy_memory()

    monitor = TrainMonitor(node_id, spec.training.max_train_steps or 1)
    state = latest_checkpoint_state(run_dir)
    monitor.announce(run_dir, (state or {}).get("loss_history") or [], mode, (state or {}).get("evaluations"))
    worker = WorkerProcess(spec_path, device=bridge.torch_device_name()).start()
    try:
        for event in worker.events(poll=POLL_SECONDS):
            if event is not None:  # recorded before any Cancel check, so no event is lost on Cancel
                monitor.handle(event)
            bridge.check_interrupted()
    except BaseException as exc:
        _stop(worker, monitor, cancelled=bridge.is_interrupt(exc))
        raise
    code = worker.wait()
    if code != 0 or monitor.done is None:
        failure = worker.failure(code)
        monitor.send("error", message=str(failure))
        raise failure

    run_file = Path(monitor.done["lora"]["comfyui"])  # "lora" also names a full fine-tune's files
    outcome = _outcome(spec, run_file, int(monitor.done.get("steps", monitor.step)), monitor.history, reused=False)
    _write_record(spec, outcome, run_file)
    _announce_done(node_id, outcome)
    return outcome


def _stop(worker: WorkerProcess, monitor: TrainMonitor, cancelled: bool) -> None:
    """Cancel (or an error on our side): stop the child cleanly with a checkpoint, never leave it running."""
    code = worker.cancel(CANCEL_TIMEOUT)
    for event in worker.drain():
        monitor.record(event)
    checkpoint = (monitor.cancelled or {}).get("checkpoint") or monitor.checkpoint
    what = "cancelled" if cancelled else "stopped by an error in the node"
    if code < 0:
        text = f"{what}: the trainer did not stop within {CANCEL_TIMEOUT:.0f} s and was killed"
    elif checkpoint:
        text = f"{what} at step {monitor.step}; checkpoint saved to {checkpoint}. Queue again to continue."
    else:
        text = f"{what} at step {monitor.step}, before any training step; caches are kept"
    log.info("comfyui-tuner: %s", text)
    monitor.send("cancelled", step=monitor.step, checkpoint=checkpoint, text=text)


def outcome_summary(outcome: RunOutcome) -> dict[str, Any]:
    """What the web extension shows of a finished run: the ``done`` message and the node's ui output.

    A LoRA is named as the stock LoRA loaders list it (``lora_name``); a fine-tuned model as "Load
    Diffusion Model" lists it (``model_name``).
    """
    kind, folder = ("model", "diffusion_models") if outcome.full else ("lora", "loras")
    return {
        "steps": outcome.steps,
        f"{kind}_path": str(outcome.comfyui_file),
        f"{kind}_name": bridge.model_name(outcome.comfyui_file, folder),
        "reused": outcome.reused,
        "history": outcome.history,
        "images": [bridge.view_ref(f) for f in outcome.validation_files],
    }


def _announce_done(node_id: str | None, outcome: RunOutcome) -> None:
    bridge.send("done", {"node": node_id, **outcome_summary(outcome)})
