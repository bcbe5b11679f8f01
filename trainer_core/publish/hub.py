"""Upload a run to the Hugging Face Hub while it trains, without ever stopping it.

How it hangs together:

- :func:`final_plan` and :func:`checkpoint_plan` say what is uploaded: a list of
  :class:`UploadItem` (local file -> path in the repository). They are the only place that decides,
  and the uploader sends each plan as it is, in one commit (tests compare the two).
- :class:`HubUploader` is a daemon thread that consumes upload jobs. It creates the repository on
  its first job (``create_repo(exist_ok=True)``, private per ``model_card_private``). A failure
  (no token, refused, network down) becomes a ``warning`` event naming the cause; the run goes on.
  A job that went through is reported as a ``published`` event {what, repo_id, url, files}.
- :class:`HubPublisher` is an event sink placed in front of the run's sinks: it passes every event
  on, and on ``checkpoint`` (with ``push_checkpoints_to_hub``) and ``done`` it queues a job. The
  engine knows nothing of it. :func:`publishing` wraps a run with it when ``push_to_hub`` is on.

At the end of a run :meth:`HubPublisher.close` waits for the queued uploads, at most
:data:`WAIT_AT_END_S` seconds (20 minutes, enough for a LoRA and its samples on a slow line;
a full fine-tune of several GB may need more). Past that it gives up with a warning; the files stay
in ``output_dir`` and can be uploaded by hand (``hf upload``).

The token is huggingface_hub's: ``HF_TOKEN`` or the one ``hf auth login`` stored. ``HF_ENDPOINT``
selects another Hub endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..events import EventSink
from ..spec import TrainSpec
from .model_card import Sample, card_facts, render_card, sample_prompt

WAIT_AT_END_S = 1200.0
STAGING = "hub"  # output_dir/hub/: the README.md and spec written for the upload
SPEC_NAME = "comfyui_tuner_spec.json"


@dataclass(frozen=True)
class UploadItem:
    local: Path
    path_in_repo: str


# ---------------------------------------------------------------------------------------- plans
def _folder(folder: Path, prefix: str) -> list[UploadItem]:
    """Every file under ``folder`` (links followed: a fine-tune's pipeline links the base's parts)."""
    items = []
    for root, _dirs, names in os.walk(folder, followlinks=True):
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            items.append(UploadItem(path, f"{prefix}{rel}"))
    return sorted(items, key=lambda i: i.path_in_repo)


def _export(files: dict[str, str] | None, prefix: str = "") -> list[UploadItem]:
    """A LoRA's two files, or a fine-tune's ComfyUI file and diffusers folder (at ``prefix``)."""
    if not files:
        return []
    items = []
    for kind in ("diffusers", "comfyui"):
        path = Path(files[kind])
        if path.is_dir():
            items += _folder(path, prefix)
        else:
            items.append(UploadItem(path, prefix + path.name))
    return items


def _latest_samples(validation_files: list[str]) -> list[Path]:
    """The validation files of the last step that rendered (``validation/step-N/``)."""
    paths = [Path(f) for f in validation_files]
    if not paths:
        return []
    last = max(p.parent.name for p in paths)
    return sorted(p for p in paths if p.parent.name == last)


def final_plan(
    spec: TrainSpec,
    done: dict[str, Any],
    *,
    base_model: str,
    staging: Path | None = None,
) -> list[UploadItem]:
    """What the end of a run uploads, given its ``done`` event; writes the card and spec to ``staging``.

    Repository layout: the exports at the root (``pytorch_lora_weights.safetensors`` and
    ``<name>_comfyui.safetensors``; a full fine-tune's diffusers pipeline folder and its ComfyUI
    file), the EMA exports under ``ema/``, the last validation step's samples and the loss plot
    under ``assets/``, the resolved spec (``comfyui_tuner_spec.json``) and ``README.md``.
    """
    staging = staging or Path(spec.output_dir) / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    weights = _export(done.get("lora"))
    ema = _export(done.get("ema_lora"), "ema/")
    prompts = {**spec.validation_prompts(), "unconditional": ""}  # the engine's names for its renders
    latest = _latest_samples(done.get("validation_files") or [])
    latest.sort(key=lambda p: (not sample_prompt(p, prompts), p.name))  # prompted renders first: the Hub's thumbnail
    samples = [UploadItem(p, f"assets/{p.name}") for p in latest]
    extras = [UploadItem(Path(done["loss_plot"]), "assets/loss.png")] if done.get("loss_plot") else []
    spec_file = staging / SPEC_NAME
    spec_file.write_text(spec.to_json())
    lora = done.get("lora") or {}
    files = {k: Path(v).name for k, v in lora.items() if k in ("diffusers", "comfyui")}
    facts = card_facts(
        spec,
        base_model=base_model,
        steps=int(done.get("steps") or 0),
        samples=[Sample(i.path_in_repo, sample_prompt(i.local, prompts)) for i in samples],
        files=files,
    )
    card = staging / "README.md"
    card.write_text(render_card(facts))
    return [*weights, *ema, *samples, *extras, UploadItem(spec_file, SPEC_NAME), UploadItem(card, "README.md")]


def checkpoint_plan(spec: TrainSpec, folder: Path) -> list[UploadItem]:
    """A checkpoint's weights under ``checkpoints/step-N/``: its LoRA exports (``lora/``), or a
    fine-tune's weight shards, and its spec. Not the optimizer and sampler states: they resume a
    run on this machine and are several times the weights' size."""
    prefix = f"checkpoints/{folder.name}/"
    exports = folder / "lora"
    if exports.is_dir():
        items = _folder(exports, prefix)
    else:
        items = [UploadItem(p, prefix + p.name) for p in sorted(folder.glob("adapter*")) if p.is_file()]
    if (folder / "spec.json").is_file():
        items.append(UploadItem(folder / "spec.json", prefix + SPEC_NAME))
    return items


def base_model_id(spec: TrainSpec, source: str | None) -> str:
    """The Hub id of the model trained on, for the card: the run's source when it is a repo id, else
    the flavour's published repo (a run from local or ComfyUI files still names its base model)."""
    if source and not Path(source).expanduser().exists() and source.count("/") == 1 and not source.startswith("."):
        return source
    from ..families import get_family_class

    cls = get_family_class(spec.model.model_family)
    return cls.get_flavour(spec.model.model_flavour).repo_id


# ---------------------------------------------------------------------------------------- uploader
@dataclass
class _Job:
    what: str
    plan: list[UploadItem]


class HubUploader:
    """One daemon thread sending upload jobs in order, one commit each; never raises to its callers."""

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool,
        report: EventSink,
        api: Any = None,
        output_dir: str = "",
    ) -> None:
        self.repo_id = repo_id
        self.private = private
        self.report = report
        self.output_dir = output_dir
        self._api = api
        self._created = False
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="hub-upload", daemon=True)
        self._thread.start()

    def api(self) -> Any:
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        return self._api

    def submit(self, what: str, plan: list[UploadItem]) -> None:
        self._jobs.put(_Job(what, plan))

    def close(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Stop after the queued jobs; True when they all finished within ``timeout`` seconds.

        ``stop`` (the run's cancel event) ends the wait early: Cancel must not wait for an upload."""
        self._jobs.put(None)
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            self._thread.join(min(0.5, max(0.0, deadline - time.monotonic())))
        return not self._thread.is_alive()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._send(job)
            except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
                self.report.emit(
                    "warning",
                    message=f"Hub upload of the {job.what} to {self.repo_id} failed ({type(e).__name__}: "
                    f"{_first_line(e)}); training goes on and the files stay in {self.output_dir}",
                )

    def _send(self, job: _Job) -> None:
        from huggingface_hub import CommitOperationAdd

        api = self.api()
        if not self._created:
            api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            self._created = True
        missing = [str(i.local) for i in job.plan if not i.local.is_file()]
        if missing:  # a checkpoint rotated away (checkpoints_total_limit) before its turn came
            raise FileNotFoundError(f"gone before the upload: {', '.join(missing[:3])}")
        operations = [CommitOperationAdd(path_in_repo=i.path_in_repo, path_or_fileobj=str(i.local)) for i in job.plan]
        api.create_commit(self.repo_id, operations, commit_message=f"comfyui-tuner: {job.what}")
        self.report.emit(
            "published",
            what=job.what,
            repo_id=self.repo_id,
            url=f"{getattr(api, 'endpoint', None) or 'https://huggingface.co'}/{self.repo_id}",
            files=[i.path_in_repo for i in job.plan],
        )


def _first_line(e: Exception) -> str:
    text = str(e).strip() or repr(e)
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------------------------------- the sink
class HubPublisher:
    """An event sink that passes every event to ``sink`` and publishes on ``checkpoint`` and ``done``."""

    def __init__(
        self,
        spec: TrainSpec,
        sink: EventSink,
        *,
        api: Any = None,
        wait_s: float = WAIT_AT_END_S,
        plan_hook: Callable[[str, list[UploadItem]], None] | None = None,
    ) -> None:
        e = spec.export
        if not e.push_to_hub or not e.hub_model_id:
            raise ConfigError("HubPublisher needs push_to_hub and hub_model_id")
        self.spec = spec
        self.sink = sink
        self.wait_s = wait_s
        self.plan_hook = plan_hook  # tests: see each plan as it is queued
        self.source: str | None = None
        self.last_checkpoint: Path | None = None
        self.uploader = HubUploader(
            e.hub_model_id, private=e.model_card_private, report=sink, api=api, output_dir=spec.output_dir
        )
        if api is None and not _token_known():
            sink.emit(
                "warning",
                message=f"push_to_hub: no Hugging Face token found, so uploading to {e.hub_model_id} will fail; "
                "log in with `hf auth login` or set HF_TOKEN (training runs anyway)",
            )

    def emit(self, type: str, **payload: Any) -> None:
        self.sink.emit(type, **payload)
        try:
            if type == "started":
                self.source = payload.get("source")
            elif type == "checkpoint":
                self.last_checkpoint = Path(payload["path"])
                if self.spec.export.push_checkpoints_to_hub:
                    plan = checkpoint_plan(self.spec, self.last_checkpoint)
                    self._queue(f"checkpoint {self.last_checkpoint.name}", plan)
            elif type == "done":
                spec = self._resolved()
                plan = final_plan(spec, payload, base_model=base_model_id(spec, self.source))
                self._queue(f"final model ({payload.get('steps')} steps)", plan)
        except Exception as e:  # noqa: BLE001 - publishing never stops a run
            cause = f"{e.__class__.__name__}: {e}"  # (``type`` is the event's name here)
            self.sink.emit("warning", message=f"push_to_hub: could not prepare the {type} upload ({cause})")

    def _queue(self, what: str, plan: list[UploadItem]) -> None:
        if self.plan_hook is not None:
            self.plan_hook(what, plan)
        self.uploader.submit(what, plan)

    def _resolved(self) -> TrainSpec:
        """The run's resolved spec (family defaults filled in), as its last checkpoint stored it."""
        if self.last_checkpoint is not None and (self.last_checkpoint / "spec.json").is_file():
            with contextlib.suppress(Exception):
                return TrainSpec.model_validate(json.loads((self.last_checkpoint / "spec.json").read_text()))
        return self.spec

    def close(self, timeout: float | None = None, stop: threading.Event | None = None) -> bool:
        """Wait for the queued uploads (at most ``timeout``, default ``wait_s``, or until ``stop`` is set);
        warn when cut short."""
        limit = self.wait_s if timeout is None else timeout
        finished = self.uploader.close(limit, stop)
        if not finished:
            self.sink.emit(
                "warning",
                message=f"push_to_hub: uploads to {self.spec.export.hub_model_id} unfinished after {limit:.0f} s "
                f"(or the run was stopped); stopped waiting. The files are in {self.spec.output_dir} "
                "(upload them with `hf upload`).",
            )
        return finished


def _token_known() -> bool:
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def publishing(
    spec: TrainSpec, sink: EventSink, stop: threading.Event | None = None, **kwargs: Any
) -> Iterator[EventSink]:
    """``sink`` with Hub publishing in front of it when the spec asks for it (``push_to_hub``).

    ``with publishing(spec, events) as sink: Trainer(spec, sink).run()``; on leaving, waits for
    the uploads (bounded, see :data:`WAIT_AT_END_S`; ``stop``, the run's cancel event, ends the wait),
    whether the run finished, stopped or failed.
    """
    if not spec.export.push_to_hub:
        yield sink
        return
    publisher = HubPublisher(spec, sink, **kwargs)
    try:
        yield publisher
    finally:
        publisher.close(stop=stop)
