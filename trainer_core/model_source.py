"""Is the model there? Checked in seconds, before the dataset scan and before anything loads.

Without this check a wrong ``pretrained_model_name_or_path`` was found only when the first
component loaded, after the whole dataset had been scanned: a missing local folder came back in
Hugging Face's repo-id wording ("Repo id must be in the form ..."), and a repo id that is not in the
cache on a machine without network spent close to a minute in the hub client's retries. Here:

- a local folder must exist and hold every part the family loads (``ModelFamily.weight_folders``):
  a model part needs ``config.json`` and a weights file, the scheduler its
  ``scheduler_config.json``, a tokenizer any file;
- a repo id is looked up in the Hugging Face cache without any network call
  (``snapshot_download(local_files_only=True)``, the same lookup offline mode uses). With
  ``HF_HUB_OFFLINE`` set, it must be there and complete. Online, a repo that still has to be
  downloaded needs the hub to be reachable: one TCP connection with a short timeout tells, where the
  download itself would retry for a minute. A cached repo with the hub unreachable gets a warning
  (the hub client retries every file before it falls back to the cache; ``HF_HUB_OFFLINE=1`` skips
  that). Behind a proxy the probe cannot judge, so it is skipped.

Either way the user gets one :class:`~trainer_core.errors.ModelLoadError` naming the source, what is
missing and the fix.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from .errors import ModelLoadError

PROBE_TIMEOUT_S = 5.0
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.safetensors.index.json", "*.bin.index.json")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def missing_parts(folder: Path, parts: Iterable[str]) -> list[str]:
    """What of ``parts`` (diffusers subfolders) ``folder`` lacks, as ``vae/`` or ``vae/config.json``."""
    missing: list[str] = []
    for part in parts:
        sub = folder / part
        if not sub.is_dir():
            missing.append(f"{part}/")
        elif part == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                missing.append(f"{part}/scheduler_config.json")
        elif part.startswith("tokenizer"):
            if not any(p.is_file() for p in sub.iterdir()):
                missing.append(f"{part}/ (empty)")
        else:
            if not (sub / "config.json").is_file():
                missing.append(f"{part}/config.json")
            if not any(any(sub.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
                missing.append(f"{part}/ weights (*.safetensors)")
    return missing


def _is_repo_id(source: str) -> bool:
    """Whether ``source`` is a valid Hugging Face repo id (``org/name``), as the hub client judges it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The repo's folder in the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, or a cache entry too broken to resolve: not usable offline
        return None


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face endpoint cannot be reached (one TCP connect), or None when it can or we cannot tell."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None  # the download goes through the proxy; a direct connection proves nothing
    url = urlparse(constants.ENDPOINT)
    host = url.hostname
    if not host:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{constants.ENDPOINT} cannot be reached ({e.strerror or type(e).__name__})"


def check_model_source(
    source: str,
    revision: str | None,
    parts: Iterable[str],
    family: str,
    default_repo: str,
) -> list[str]:
    """Raise ModelLoadError unless ``source`` can give the ``parts`` that ``family`` loads; return warnings.

    ``default_repo`` is the flavour's published repo, named in the fix.
    """
    from huggingface_hub import constants

    parts = list(parts)
    key = "pretrained_model_name_or_path"
    layout = ", ".join(f"{p}/" for p in parts)
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(
                f"{key} {local} is a file, but {family} loads a diffusers folder",
                f"point {key} at the folder that holds model_index.json and {layout} (as in {default_repo})",
            )
        missing = missing_parts(local, parts)
        if missing:
            raise ModelLoadError(
                f"{key} {local} is not a complete {family} diffusers folder; missing: {', '.join(missing)}",
                f"point {key} at the folder that holds model_index.json and {layout} "
                f"(a download of {default_repo}), or finish copying it",
            )
        return []
    if not _is_repo_id(source):
        raise ModelLoadError(
            f"{key} {str(local.absolute())!r}: no such folder",
            f"fix the path (it should hold model_index.json and {layout}), or give a Hugging Face repo id "
            f"such as {default_repo}",
        )

    offline = constants.is_offline_mode()
    snapshot = _cached_snapshot(source, revision)
    missing = missing_parts(snapshot, parts) if snapshot is not None else [f"{p}/" for p in parts]
    if not missing:
        unreachable = None if offline else hub_unreachable()
        if unreachable:  # the hub client still asks for updates, retrying each file for up to a minute
            return [
                f"{unreachable}: model {source!r} is in the Hugging Face cache, but each part will retry the "
                "network before using it; set HF_HUB_OFFLINE=1 to start at once"
            ]
        return []
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    what = f"{source!r}" + (f" at revision {revision!r}" if revision else "")
    state = f"is not in {where}" if snapshot is None else f"is only partly in {where}; missing: {', '.join(missing)}"
    # a user-given "models/my-model" is both a repo id and a relative path: say that the folder is not there either
    also = "" if source == default_repo else f" (and there is no local folder {str(local.absolute())!r})"
    fix = (
        f"download it where there is network (huggingface-cli download {source}), or point {key} at a local "
        "diffusers folder"
    )
    if offline:
        raise ModelLoadError(f"model {what} {state}{also}, and HF_HUB_OFFLINE is set", fix)
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelLoadError(f"model {what} {state}{also}, and {unreachable}", fix + ", then run again")
    return []
