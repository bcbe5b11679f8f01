"""Checkpoints: everything needed to continue a run exactly, written atomically.

``output_dir/checkpoints/step-N/`` holds the adapter weights, optimizer and LR-scheduler state,
RNG states, sampler position, EMA shadow, loss history, the TrainSpec, and the LoRA files of that
step. It is assembled in a hidden temporary folder and renamed into place as the last act, with a
``manifest.json`` listing its files, so a run killed mid-save (even by SIGKILL) leaves either no
``step-N`` or a complete one; the leftover temporary folder is removed on the next start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..io_utils import atomic_save_safetensors, atomic_write_json

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
FAULT_ENV = "COMFYUI_TUNER_FAULT"  # "kill-during-checkpoint[:STEP]": test hook for crash safety


@dataclass
class TrainingState:
    """Counters and small state of the loop, stored as JSON."""

    step: int
    sampler: dict[str, Any]
    loss_history: list[list[float]]  # [step, loss]
    spec_fingerprint: str


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir() and is_complete(d):
                found.append((int(m.group(1)), d))
    return sorted(found)


def is_complete(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / f).is_file() for f in files)


def clean_incomplete(output_dir: str | Path) -> list[Path]:
    """Remove temporary folders left by a killed save. Returns what was removed."""
    root = checkpoints_root(output_dir)
    removed = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-") or (_STEP_DIR.match(d.name) and not is_complete(d)):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def find_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """Resolve ``resume_from_checkpoint`` ('latest', a folder, or None) to a checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        path = checkpoints_root(output_dir) / resume
    if not path.is_dir() or not is_complete(path):
        raise CheckpointError(
            f"resume_from_checkpoint {resume!r} is not a complete checkpoint folder",
            f"use 'latest' or one of: {[str(p) for _, p in list_checkpoints(output_dir)] or 'none exist yet'}",
        )
    return path


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _maybe_inject_fault(step: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith("kill-during-checkpoint"):
        _, _, at = fault.partition(":")
        if not at or int(at) == step:
            os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    output_dir: str | Path,
    state: TrainingState,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema_state: dict[str, Any] | None,
    spec_json: str,
    write_extra: Any = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``step-N`` atomically; ``write_extra(folder)`` may add files (the LoRA exports)."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    atomic_save_safetensors(tmp / "adapter.safetensors", adapter)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    if ema_state is not None:
        torch.save(ema_state, tmp / "ema.pt")
    (tmp / "spec.json").write_text(spec_json)
    atomic_write_json(
        tmp / "state.json",
        {
            "step": state.step,
            "sampler": state.sampler,
            "loss_history": state.loss_history,
            "spec_fingerprint": state.spec_fingerprint,
        },
    )
    _maybe_inject_fault(state.step)
    if write_extra is not None:
        write_extra(tmp)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    atomic_write_json(tmp / MANIFEST, {"files": files, "step": state.step})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last:
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class LoadedCheckpoint:
    folder: Path
    state: TrainingState
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, Any] | None


def load_checkpoint(folder: Path) -> LoadedCheckpoint:
    from safetensors.torch import load_file

    try:
        raw = json.loads((folder / "state.json").read_text())
        loaded = LoadedCheckpoint(
            folder=folder,
            state=TrainingState(
                step=int(raw["step"]),
                sampler=raw["sampler"],
                loss_history=raw["loss_history"],
                spec_fingerprint=raw["spec_fingerprint"],
            ),
            adapter=load_file(str(folder / "adapter.safetensors")),
            optimizer=torch.load(folder / "optimizer.pt", weights_only=False),
            scheduler=torch.load(folder / "scheduler.pt", weights_only=False),
            ema=torch.load(folder / "ema.pt", weights_only=False) if (folder / "ema.pt").exists() else None,
        )
        _set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {folder} cannot be read: {e}", "delete that folder to resume from an earlier one"
        ) from e
    return loaded
