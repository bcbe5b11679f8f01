"""Checkpoints: everything needed to continue a run exactly, written atomically, read distrustfully.

``output_dir/checkpoints/step-N/`` holds the adapter weights, the named states of the loop
(:data:`STATES`: optimizer, LR schedule, RNG, EMA shadow), the counters and loss history
(``state.json``, with the settings that define the run: :mod:`.run_definition`), the TrainSpec, and
the LoRA files of that step. It is assembled in a hidden temporary folder and renamed into place as
the last act, so a run killed mid-save (even by SIGKILL) leaves either no ``step-N`` or a complete
one; the leftover temporary folder is removed on the next start.

Nothing read back is trusted:

- ``manifest.json`` lists every file with its size and sha256, computed from the file as written;
  a file damaged later (a disk error, a half-finished copy, a synced folder) is caught before it is
  read, and ``latest`` falls back to the newest intact checkpoint with a warning naming the damaged
  one, which is renamed ``damaged-step-N`` so that it cannot shadow the new checkpoints;
- nothing that can execute code is loaded: tensors are safetensors, everything else JSON
  (:mod:`.state_files`). A folder from someone else can hold wrong numbers, never a program.

Adding a state (fp16's GradScaler, say) is one entry in :data:`STATES` plus, in the engine, one
line that passes ``scaler.state_dict()`` to :func:`save_checkpoint` and one that gives
``loaded.states["grad_scaler"]`` back to the scaler; a state must be a nest of dicts, lists,
tuples, numbers, strings and tensors. An optional state (one that older checkpoints lack) is simply
absent from ``loaded.states``.

Checkpoints written before manifests had checksums (format 1: a list of file names, and the states
pickled as ``*.pt``) still resume, with a warning that they cannot be verified; their pickles are
read with ``torch.load(weights_only=True)`` and an allow-list of exactly the numpy types of the
RNG state, so they cannot run code either (see :func:`_load_legacy_states`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..io_utils import atomic_save_safetensors, atomic_write_json
from .shards import LazyTensors, index_name, write_sharded
from .state_files import load_state, save_state, state_files

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_SIMPLETUNER_DIR = re.compile(r"^checkpoint-(\d+)$")  # SimpleTuner's name for step N's folder
MANIFEST = "manifest.json"
FORMAT = 2  # 1: manifest lists names only, states pickled; 2: sizes + sha256, states safetensors + JSON
FAULT_ENV = "COMFYUI_TUNER_FAULT"  # "kill-during-checkpoint[:STEP]": test hook for crash safety
DAMAGED_PREFIX = "damaged-"
ADAPTER_STEM = "adapter"  # adapter.safetensors, or adapter-0000i-of-0000N.safetensors + its index

# The named states of the training loop. The engine passes a dict with these keys to
# save_checkpoint (None: not used in this run, e.g. no EMA) and reads them from LoadedCheckpoint.states.
STATES = ("optimizer", "scheduler", "rng", "ema", "grad_scaler", "crepa")  # crepa: projector + its schedule


@dataclass
class TrainingState:
    """Counters and small state of the loop, stored as JSON."""

    step: int
    sampler: dict[str, Any]
    loss_history: list[list[float]]  # [step, loss]
    spec_fingerprint: str
    run_definition: dict[str, Any] | None = None  # None: a checkpoint from before definitions were stored
    rollout_passes: int = 0  # scheduled sampling's forward passes so far (the progress event's running total)
    crepa_history: list[list[float]] = field(default_factory=list)  # [step, CREPA term]: CREPA runs only
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # {step, clip_score, scores}: evaluation runs


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` folder, complete or not, oldest first."""
    root = checkpoints_root(output_dir)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                found.append((int(m.group(1)), d))
    return sorted(found)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (every listed file present; checksums are not read here), oldest first."""
    return [(n, d) for n, d in step_folders(output_dir) if is_complete(d)]


def _manifest(folder: Path) -> dict[str, Any]:
    manifest = json.loads((folder / MANIFEST).read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), (list, dict)):
        raise ValueError("it has no file list")
    return manifest


def is_complete(folder: Path) -> bool:
    try:
        files = _manifest(folder)["files"]
    except (OSError, ValueError):
        return False
    return all((folder / f).is_file() for f in files)


def is_legacy(folder: Path) -> bool:
    """A format-1 checkpoint: file names without sizes or checksums, states pickled."""
    try:
        return isinstance(_manifest(folder)["files"], list)
    except (OSError, ValueError):
        return False


def damage(folder: Path) -> str | None:
    """What is wrong with ``folder`` as a checkpoint (None: every file matches its manifest).

    Format 1 checkpoints have no checksums; only the presence of their files can be checked.
    """
    try:
        files = _manifest(folder)["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} cannot be read ({e})"
    if isinstance(files, list):
        missing = [f for f in files if not (folder / f).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{name} has {size} bytes, the manifest says {expected.get('size')}"
        if _sha256(path) != expected.get("sha256"):
            return f"{name} does not match its checksum (its content changed after it was written)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_incomplete(output_dir: str | Path) -> list[Path]:
    """Remove temporary folders left by a killed save. Returns what was removed.

    A ``step-N`` folder is never removed here, even a damaged one: saves are atomic, so only
    something outside the trainer can have damaged it, and resume reports it by name.
    """
    root = checkpoints_root(output_dir)
    removed = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


# ----------------------------------------------------------------------------- saving
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put the global generators back where the checkpoint left them."""
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
    states: dict[str, Any],
    spec_json: str,
    write_extra: Callable[[Path], Any] | None = None,
    keep_last: int | None = None,
    shard_bytes: int | None = None,
) -> Path:
    """Write ``step-N`` atomically; ``write_extra(folder)`` may add files (the LoRA exports).

    ``shard_bytes`` (a full fine-tune's gigabytes of weights): the adapter is written as numbered
    shards of at most that size with an index (``adapter.safetensors.index.json``), one shard in
    memory at a time, and read back lazily; without it, one ``adapter.safetensors`` as always.

    ``states`` maps names of :data:`STATES` to state dicts (None: not used in this run); the RNG
    state is added here.
    """
    unknown = set(states) - set(STATES)
    if unknown:
        raise ValueError(f"unknown checkpoint states {sorted(unknown)}; add them to checkpoint.STATES")
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if shard_bytes:
        write_sharded(tmp, ADAPTER_STEM, adapter, max_bytes=shard_bytes, always_index=True)
    else:
        atomic_save_safetensors(tmp / "adapter.safetensors", adapter)
    for name, value in {**states, "rng": _rng_state()}.items():
        if value is not None:
            save_state(tmp, name, value)
    (tmp / "spec.json").write_text(spec_json)
    atomic_write_json(
        tmp / "state.json",
        {
            "step": state.step,
            "sampler": state.sampler,
            "loss_history": state.loss_history,
            "spec_fingerprint": state.spec_fingerprint,
            "run_definition": state.run_definition,
            "rollout_passes": state.rollout_passes,
            **({"crepa_history": state.crepa_history} if state.crepa_history else {}),  # CREPA runs only
            **({"evaluations": state.evaluations} if state.evaluations else {}),  # evaluation (CLIP score) runs only
        },
    )
    _maybe_inject_fault(state.step)
    if write_extra is not None:
        write_extra(tmp)
    files = {
        str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "files": files, "step": state.step})
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


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadedCheckpoint:
    folder: Path
    state: TrainingState
    adapter: Mapping[str, torch.Tensor]  # sharded: read tensor by tensor (shards.LazyTensors)
    states: dict[str, Any] = field(default_factory=dict)  # name in STATES -> state; absent: not saved
    spec: dict[str, Any] | None = None  # the TrainSpec it was trained with, as JSON data
    legacy: bool = False


def load_checkpoint(folder: Path) -> LoadedCheckpoint:
    """Verify ``folder`` against its manifest and read it; a CheckpointError says what is wrong."""
    from safetensors.torch import load_file

    problem = damage(folder)
    if problem:
        raise CheckpointError(
            f"checkpoint {folder} is damaged: {problem}",
            "resume from another checkpoint (resume_from_checkpoint 'latest' takes the newest intact one), "
            "or start over with resume_from_checkpoint ''",
        )
    legacy = is_legacy(folder)
    try:
        raw = json.loads((folder / "state.json").read_text())
        state = TrainingState(
            step=int(raw["step"]),
            sampler=dict(raw["sampler"]),
            loss_history=[list(h) for h in raw["loss_history"]],
            spec_fingerprint=str(raw.get("spec_fingerprint", "")),
            run_definition=raw.get("run_definition"),
            rollout_passes=int(raw.get("rollout_passes", 0)),
            crepa_history=[list(h) for h in raw.get("crepa_history") or []],
            evaluations=[dict(e) for e in raw.get("evaluations") or []],
        )
        states = _load_legacy_states(folder) if legacy else _load_states(folder)
        if (folder / index_name(ADAPTER_STEM)).is_file():
            adapter: Mapping[str, torch.Tensor] = LazyTensors(folder, ADAPTER_STEM)
        else:
            adapter = load_file(str(folder / "adapter.safetensors"))
        spec = json.loads((folder / "spec.json").read_text()) if (folder / "spec.json").is_file() else None
    except CheckpointError:
        raise
    except Exception as e:  # whatever a malformed file raises: it is reported, never half-used
        raise CheckpointError(
            f"checkpoint {folder} cannot be read: {type(e).__name__}: {e}",
            "resume from another checkpoint, or start over with resume_from_checkpoint ''",
        ) from e
    return LoadedCheckpoint(folder, state, adapter, states, spec, legacy)


def _load_states(folder: Path) -> dict[str, Any]:
    out = {}
    for name in STATES:
        tensor_file, json_file = state_files(name)
        if (folder / json_file).is_file() or (folder / tensor_file).is_file():
            out[name] = load_state(folder, name)
    return out


def _legacy_safe_globals() -> list[Any]:
    """Format 1 pickled the RNG state, whose numpy part needs exactly these globals; nothing else is allowed."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed = [_reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles uint32 through its DType class
    if dtypes is not None:
        allowed.append(dtypes.UInt32DType)
    return allowed


def _load_legacy_states(folder: Path) -> dict[str, Any]:
    """Read a format-1 checkpoint's pickles with torch's restricted unpickler.

    ``weights_only=True`` only builds tensors, containers and primitives plus the allow-listed
    globals; a pickle that asks for anything else (``os.system``, a ``__reduce__`` payload) is
    refused with an UnpicklingError before any of it runs.
    """
    out = {}
    with torch.serialization.safe_globals(_legacy_safe_globals()):
        for name in STATES:
            path = folder / f"{name}.pt"
            if path.is_file():
                out[name] = torch.load(path, weights_only=True, map_location="cpu")
    return out


# ----------------------------------------------------------------------------- choosing what to resume
def resolve_resume(output_dir: str | Path, resume: str | None, warn: Callable[[str], None]) -> LoadedCheckpoint | None:
    """Read the checkpoint ``resume_from_checkpoint`` names, or None to start fresh.

    ``resume`` is SimpleTuner's value: ``"latest"`` (the newest intact checkpoint of
    ``output_dir``, or a fresh start when there is none), a folder (``step-N``, SimpleTuner's
    ``checkpoint-N``, or any path), or None / "" to start fresh. A damaged newest checkpoint is
    skipped with a warning (and renamed ``damaged-step-N``); a named one that is damaged or missing
    is an error, since the user asked for that one.
    """
    if resume is None or not str(resume).strip():
        return None
    resume = str(resume).strip()
    if resume.lower() == "latest":
        return _latest_intact(output_dir, warn)
    folder = _named_checkpoint(output_dir, resume)
    loaded = load_checkpoint(folder)
    if loaded.legacy:
        warn(_legacy_warning(folder))
    return loaded


def _named_checkpoint(output_dir: str | Path, resume: str) -> Path:
    root = checkpoints_root(output_dir)
    candidates = [Path(resume).expanduser(), root / resume]
    m = _SIMPLETUNER_DIR.match(Path(resume).name)
    if m:
        candidates.append(root / f"step-{m.group(1)}")
    existing = [d.name for _, d in step_folders(output_dir)]
    hint = "use 'latest' (the newest checkpoint of output_dir), '' to start fresh, or one of: " + (
        ", ".join(existing) if existing else f"(none: {root} holds no checkpoint yet)"
    )
    for path in candidates:
        if path.is_dir():
            if not (path / MANIFEST).exists() and not (path / "state.json").exists():
                raise CheckpointError(
                    f"resume_from_checkpoint {resume!r}: {path} is not a checkpoint folder (it has no {MANIFEST})",
                    hint,
                )
            return path
    looked = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise CheckpointError(f"resume_from_checkpoint {resume!r} names no folder (looked for {looked})", hint)


def _latest_intact(output_dir: str | Path, warn: Callable[[str], None]) -> LoadedCheckpoint | None:
    damaged: list[tuple[Path, str]] = []
    for _, folder in reversed(step_folders(output_dir)):
        try:
            loaded = load_checkpoint(folder)
        except CheckpointError as e:
            damaged.append((folder, e.message))
            continue
        for bad, message in damaged:
            warn(f"{message}; resuming from {folder.name} instead ({_set_aside(bad)})")
        if loaded.legacy:
            warn(_legacy_warning(folder))
        return loaded
    if damaged:
        raise CheckpointError(
            "no intact checkpoint to resume from:\n" + "\n".join(f"  - {m}" for _, m in damaged),
            "start over with resume_from_checkpoint '' (or another output_dir); the damaged folders are left "
            "as they are",
        )
    return None


def _set_aside(folder: Path) -> str:
    """Rename a damaged checkpoint so that later saves, retention and 'latest' never pick it up."""
    target = folder.with_name(DAMAGED_PREFIX + folder.name)
    n = 2
    while target.exists():
        target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}-{n}")
        n += 1
    try:
        os.replace(folder, target)
    except OSError as e:
        return f"{folder.name} could not be renamed: {e}"
    return f"{folder.name} was renamed {target.name}; delete it when you no longer need it"


def _legacy_warning(folder: Path) -> str:
    return (
        f"checkpoint {folder} was written by an earlier version without checksums: its files cannot be "
        "verified (its states were read with a loader that cannot run code)"
    )
