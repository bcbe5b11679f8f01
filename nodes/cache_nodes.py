"""Cache Embeds: fill the text-embedding and latent caches before training, in a child process.

It runs ``python -m trainer_core cache spec.json`` (the trainer's ``cache`` command: discover and
check the data, encode every caption and image that is not cached yet, report a ``cached`` event,
load no transformer). The spec is built exactly as Train LoRA builds its own (``merged_spec`` and
``place_run`` of the same inputs), so both address the same cache folders
(``output/comfyui-tuner/cache/``) and the same entries: Train LoRA afterwards encodes nothing.

The node passes its datasets on unchanged, plus a ``cached`` marker, so it sits between Build Dataset
and Train LoRA and ComfyUI runs it first. Progress comes from the child's ``cache`` events, one bar
per stage (text, then latents); Cancel stops the child (entries written so far are complete files
and are kept); a failing child is a WorkerError naming the cause ("Caching could not start: ...").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_api.latest import io, ui

from ..trainer_core.errors import ConfigError
from ..trainer_core.spec import TrainSpec
from ..trainer_core.worker import WorkerProcess
from . import comfy_bridge as bridge
from .run_spec import TRAINING_TYPES, place_run, run_identity
from .sockets import CATEGORY_TRAIN, TunerDataset, TunerMemory, TunerModel, TunerSpec, TunerValidation
from .train_nodes import merged_spec

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often Cancel is checked while the child is quiet (loading an encoder)
CANCEL_TIMEOUT = 30.0  # seconds the child gets to stop; every cache entry is written atomically
JOBS_FOLDER = "jobs"  # output/comfyui-tuner/cache/jobs/<run id>/spec.json: the caching child's spec
STAGES = {"text": "captions (text encoder)", "latents": "images/videos (VAE)"}


@dataclass
class CacheOutcome:
    text: dict[str, int]  # {"total", "encoded"}
    latents: dict[str, int]
    seconds: float
    media: str = "images"  # what the latents are of: "images", "videos" or "images/videos"

    def summary(self) -> str:
        def line(what: str, counts: dict[str, int]) -> str:
            total, encoded = int(counts.get("total", 0)), int(counts.get("encoded", 0))
            if counts.get("skipped"):  # vae_cache_disable: the trainer encodes them at every draw instead
                return f"{what}: {total} entries, not cached (vae_cache_disable: encoded while training)"
            return f"{what}: {total} entries, {encoded} encoded, {total - encoded} reused"

        return "\n".join((line("captions", self.text), line(self.media, self.latents), f"{self.seconds:.1f} s"))


def media_label(spec: TrainSpec) -> str:
    kinds = {ds.dataset_type for ds in spec.training_datasets}
    return "videos" if kinds == {"video"} else "images/videos" if "video" in kinds else "images"


def cache_spec(
    *,
    model: dict | None,
    dataset: dict | None,
    validation: dict | None,
    spec: dict | None,
    seed: int,
    memory: dict | None = None,
) -> TrainSpec:
    """The spec the caching child runs: Train LoRA's spec for the same inputs, in a job folder of its own."""
    training = (spec or {}).get("training") or {}
    needs_steps = not training.get("max_train_steps") and not training.get("num_train_epochs")
    widgets = {"steps": 1 if needs_steps else 0, "seed": seed}  # the step count changes no cache entry
    train_spec = merged_spec(
        model=model,
        dataset=dataset,
        validation=validation,
        optimizer=None,
        spec=spec,
        widgets=widgets,
        node="Cache Embeds",
        memory=memory,
    )
    root = bridge.output_root()
    placed, _ = place_run(train_spec, root=root, loras_dir=bridge.loras_dir(), name="cache")
    job = root / "cache" / JOBS_FOLDER / run_identity(train_spec)
    return placed.model_copy(update={"output_dir": str(job)})


def passthrough(dataset: dict | None, spec: dict | None, placed: TrainSpec) -> dict[str, Any]:
    """The datasets as they came in (or the imported config's image and video datasets), marked as cached."""
    if dataset is not None:
        datasets = list(dataset.get("datasets") or [])
    else:
        datasets = [d for d in (spec or {}).get("datasets", []) if d.get("dataset_type", "image") in TRAINING_TYPES]
    marker = {
        "text_cache": str(placed.text_cache_dir()),
        "latent_caches": [str(placed.vae_cache_dir(ds)) for ds in placed.training_datasets],
    }
    return {"datasets": datasets, "cached": marker}


def run_caching(spec: TrainSpec, *, node_id: str | None) -> CacheOutcome:
    """Run the trainer's ``cache`` command for ``spec`` and return what it reported."""
    job = Path(spec.output_dir)
    job.mkdir(parents=True, exist_ok=True)
    spec_path = job / "spec.json"
    spec.save(spec_path)
    bridge.free_comfy_memory()
    bar = bridge.progress_bar(1, node_id)
    bridge.progress_text("starting the encoders (ComfyUI's models were unloaded)", node_id)
    worker = WorkerProcess(spec_path, device=bridge.torch_device_name(), subcommand="cache").start()
    cached: dict[str, Any] | None = None
    try:
        for event in worker.events(poll=POLL_SECONDS):
            if event is not None and event["type"] == "cache":
                done, total = int(event.get("done") or 0), max(1, int(event.get("total") or 1))
                what = STAGES.get(str(event.get("stage")), str(event.get("stage")))
                bridge.progress_text(f"caching {what}: {done}/{total}", node_id)
                bar.update_absolute(done, total)  # also a Cancel point
            elif event is not None and event["type"] == "cached":
                cached = event
            elif event is not None and event["type"] == "warning":
                log.warning("comfyui-tuner: %s", event.get("message"))
            bridge.check_interrupted()
    except BaseException as exc:
        code = worker.cancel(CANCEL_TIMEOUT)
        worker.drain()
        what = "cancelled" if bridge.is_interrupt(exc) else "stopped by an error in the node"
        text = f"caching {what}; the entries written so far are kept and a re-run continues"
        if code < 0:
            text += f" (the process did not stop within {CANCEL_TIMEOUT:.0f} s and was killed)"
        log.info("comfyui-tuner: %s", text)
        bridge.progress_text(text, node_id)
        raise
    code = worker.wait()
    if code != 0 or cached is None:
        failure = worker.failure(code)  # worded for caching: "Caching could not start: ..."
        bridge.progress_text(str(failure).splitlines()[0], node_id)
        raise failure
    return CacheOutcome(
        text=cached["text"],
        latents=cached["latents"],
        seconds=float(cached.get("seconds") or 0),
        media=media_label(spec),
    )


class TunerCacheEmbeds(io.ComfyNode):
    """Cache Embeds: encode captions and images once, before training; Train LoRA then reuses them."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerCacheEmbeds",
            display_name="Cache Embeds",
            category=CATEGORY_TRAIN,
            description="Encode the captions (text encoders) and images or videos (VAE) into the caches Train LoRA "
            "reads, in a separate process, before training. Put it between Build Dataset and Train LoRA. Entries "
            "already cached are reused, so a second run encodes nothing.",
            is_output_node=True,
            inputs=[
                TunerModel.Input(
                    "model",
                    optional=True,
                    tooltip="The model whose encoders are used: the same loader you connect to Train LoRA.",
                ),
                TunerDataset.Input(
                    "dataset",
                    optional=True,
                    tooltip="The training images or videos (Build Dataset); passed on to Train LoRA.",
                ),
                io.Int.Input(
                    "seed",
                    default=42,
                    min=-1,
                    max=2**31 - 1,
                    control_after_generate=False,  # must stay equal to Train LoRA's seed, never randomised
                    tooltip="Use Train LoRA's seed: random crops (crop_style or crop_aspect 'random') depend on it. "
                    "Without random crops it changes nothing. -1 keeps the connected config's seed.",
                ),
                TunerValidation.Input(
                    "validation",
                    optional=True,
                    tooltip="The Validation Settings you connect to Train LoRA, so their prompts are cached too.",
                ),
                TunerSpec.Input(
                    "spec",
                    optional=True,
                    tooltip="The imported config you connect to Train LoRA (Import SimpleTuner Config), if any.",
                ),
                TunerMemory.Input(
                    "memory",
                    optional=True,
                    tooltip="The Configure Offload/Quant you connect to Train LoRA: quantised text encoders and the "
                    "VAE's tiling, slicing and patch-conv apply while caching, and text encoders quantised here are "
                    "cached under their own keys.",
                ),
            ],
            outputs=[
                TunerDataset.Output(
                    "dataset", tooltip="The same datasets, now cached; connect to Train LoRA's dataset input."
                ),
                io.String.Output("summary", tooltip="How many captions and images were encoded or reused."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        seed: int,
        model: dict | None = None,
        dataset: dict | None = None,
        validation: dict | None = None,
        spec: dict | None = None,
        memory: dict | None = None,
    ) -> io.NodeOutput:
        if dataset is None and not (spec or {}).get("datasets"):
            raise ConfigError("Cache Embeds needs a dataset", "connect Build Dataset (or an imported config)")
        placed = cache_spec(model=model, dataset=dataset, validation=validation, spec=spec, seed=seed, memory=memory)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        outcome = run_caching(placed, node_id=node_id)
        summary = outcome.summary()
        bridge.progress_text(summary.replace("\n", " · "), node_id)
        return io.NodeOutput(passthrough(dataset, spec, placed), summary, ui=ui.PreviewText(summary))


NODES = [TunerCacheEmbeds]
