"""The training engine: runs one TrainSpec from raw files to LoRA files.

``Trainer.run`` reads as the table of contents of a run:

1. resolve and check the spec and the whole dataset (no model loaded yet);
   read and verify the checkpoint to resume from, and stop if the run's settings changed;
2. fill the text-embedding and latent caches (encoders loaded only for what is missing, and
   released before the transformer loads);
3. load the transformer, attach the LoRA, build optimizer, LR schedule, EMA and sampler;
4. resume from the checkpoint found in step 1 (``resume_from_checkpoint``) if there is one;
5. train, with checkpoints and validation renders at their intervals;
6. export the LoRA in diffusers and ComfyUI formats, the loss plot, and report ``done``.

Every random draw of step ``n`` comes from generators seeded by (seed, n, micro-batch), so a run
resumed from step ``n`` continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache.latents import LatentCache
from ..cache.on_the_fly import OnTheFlyLatents
from ..cache.text import CacheReport, PromptRequest, TextEmbedCache
from ..data.buckets import bucket_label
from ..data.discovery import DatasetIndex, discover
from ..data.sampler import BucketBatchSampler
from ..errors import CheckpointError, ConfigError
from ..events import EventSink, ListSink
from ..families.base import ModelFamily
from ..lora.adapter import build_adapter, prepare_transformer
from ..lora.export import LoraFiles, lora_metadata
from ..media import save_sample
from ..routing.crepa_run import CrepaRun
from ..spec import TrainSpec, parse_resolution_list
from . import checkpoint as ckpt
from . import evaluation as clip_eval
from . import run_definition as definition
from .batches import CachedBatches
from .ema import build_ema
from .flow import flow_loss, resolve_shift, sample_sigmas
from .fullft import FullFinetune
from .optim import build_lr_scheduler, build_optimizer, clip_gradients
from .plots import save_loss_plot
from .precision import LossScaler, PrecisionPlan, plan_precision
from .preflight import preflight
from .resolve import resolve_spec
from .scheduled_sampling import ScheduledSampling

log = logging.getLogger(__name__)

@dataclass
class RunResult:
    output_dir: Path
    steps: int
    lora: LoraFiles | None
    ema_lora: LoraFiles | None = None
    loss_history: list[list[float]] = field(default_factory=list)
    crepa_history: list[list[float]] = field(default_factory=list)  # [step, CREPA term]: CREPA runs only
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # {step, clip_score, scores}: evaluation runs
    loss_plot: Path | None = None
    validation_files: list[Path] = field(default_factory=list)
    cancelled: bool = False
    resumed_from: Path | None = None
    checkpoint: Path | None = None


def _step_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63 - 1)


def pick_device(preferred: str | None = None) -> torch.device:
    if preferred:
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    """Runs one TrainSpec. ``cancel`` (a threading.Event) stops it cleanly with a checkpoint."""

    def __init__(
        self,
        spec: TrainSpec,
        events: EventSink | None = None,
        *,
        device: str | None = None,
        cancel: threading.Event | None = None,
        honour_precision_on_cpu: bool = False,
    ) -> None:
        self.raw_spec = spec
        self.events = events or ListSink()
        self.device = pick_device(device)
        self.cancel = cancel or threading.Event()
        self.honour_precision_on_cpu = honour_precision_on_cpu  # tests: run the fp16/bf16 paths on a CPU
        self.spec: TrainSpec
        self.family: ModelFamily
        self.index: DatasetIndex
        self.crepa_run: CrepaRun | None = None  # set when the caches are filled (CREPA's teacher comes first)

    # ================================================================== phases
    def run(self) -> RunResult:
        self.prepare()
        self.open_resume()
        self.fill_caches()
        self.build_model()
        result = self.train()
        return result

    def warn(self, message: str) -> None:
        """Report something the user should act on, as a ``warning`` event only.

        Not also a log record: the CLI prints events on stderr, so a logged copy would show every
        warning twice (issue 14). Whoever runs a Trainer reads its events.
        """
        self.events.emit("warning", message=message)

    def prepare(self) -> None:
        """Resolve the spec and check every dataset file before any model loads."""
        self.spec, self.family, warnings = resolve_spec(self.raw_spec, self.device)
        warnings += preflight(self.spec, self.family)  # output_dir and model files, in seconds, before the scan
        for w in warnings:
            self.warn(w)
        s = self.spec
        self.output_dir = Path(s.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        removed = ckpt.clean_incomplete(self.output_dir)
        for r in removed:
            self.warn(f"removed incomplete checkpoint {r} left by an interrupted save")
        self.index = discover(
            s,
            alignment=s.training.aspect_bucket_alignment or self.family.bucket_alignment,
            frame_rule=self.family.frame_rule,
        )
        for w in self.index.warnings:
            self.warn(w)
        self.sampler = BucketBatchSampler(
            self.index,
            s.training.train_batch_size,
            seed=s.training.seed + s.training.dataloader_seed_offset,
            prune=not s.training.disable_bucket_pruning,
        )
        for note in self.sampler.pruned:
            self.warn(note)
        per_epoch = max(1, len(self.sampler) // s.training.gradient_accumulation_steps)
        if s.training.max_train_steps:
            self.total_steps = s.training.max_train_steps
        else:
            self.total_steps = per_epoch * (s.training.num_train_epochs or 1)
        self.precision: PrecisionPlan = plan_precision(s.training, self.device, self.honour_precision_on_cpu)
        if self.precision.note:
            self.warn(self.precision.note)
        self.weight_dtype = self.precision.weight_dtype
        self.events.emit(
            "started",
            family=self.family.name,
            flavour=self.family.flavour.name,
            source=self.family.source,
            samples=len(self.index.samples),
            buckets={bucket_label(b): len(ix) for b, ix in self.index.buckets().items()},
            total_steps=self.total_steps,
            device=str(self.device),
            dtype=str(self.weight_dtype).removeprefix("torch."),
            output_dir=str(self.output_dir),
        )

    def open_resume(self) -> ckpt.LoadedCheckpoint | None:
        """Read the checkpoint to resume from, verified, and compare the settings it was trained with.

        Runs after the dataset scan (the definition includes each dataset's content) and before any
        model loads, so a changed setting costs seconds, not a model load. A damaged newest checkpoint
        falls back to the newest intact one with a warning (checkpoint.py).
        """
        s = self.spec
        self.definition = definition.run_definition(s, definition.dataset_content(self.index.samples))
        # the family's default targets may change between versions: the adapter's shape as resolved
        self.definition[definition.RESOLVED_TARGETS] = sorted(self.family.lora_target_modules())
        self.resume = ckpt.resolve_resume(self.output_dir, s.checkpointing.resume_from_checkpoint, self.warn)
        self.resume_changes: list[tuple[str, Any, Any]] = []
        loaded = self.resume
        if loaded is None:
            return None
        old = loaded.state.run_definition
        if old is None and loaded.spec is not None:  # written before definitions were stored: from its spec
            old = definition.run_definition(loaded.spec)
        if old is None:
            self.warn(f"checkpoint {loaded.folder} does not say which settings it was trained with; not compared")
            return loaded
        diff = definition.changes(old, self.definition)
        if not diff:
            return loaded
        if not s.checkpointing.resume_with_changes:
            raise definition.mismatch_error(loaded.folder.name, str(self.output_dir), diff)
        refusal = definition.refuse_fixed(loaded.folder.name, diff)
        if refusal is not None:
            raise refusal
        self.warn(
            f"resume_with_changes: continuing {loaded.folder.name} with changed settings "
            f"(they apply from step {loaded.state.step} on):\n{definition.describe(diff)}"
        )
        self.resume_changes = diff
        return loaded

    # ------------------------------------------------------------------ caches
    def _prompt_requests(self) -> list[PromptRequest]:
        reqs = []
        for smp in self.index.samples:
            reqs += [PromptRequest(c, "caption", str(smp.path), smp.reference) for c in smp.captions]
            if smp.reference is not None and self.spec.training.caption_dropout_probability > 0:
                reqs.append(PromptRequest("", "caption", str(smp.path), smp.reference))  # dropout keeps the image
        reqs.append(PromptRequest("", "caption"))  # caption dropout and unconditional renders
        negative = self.spec.validation.validation_negative_prompt or ""
        images: dict[Any, Any] = {}  # the negative is encoded once per distinct validation reference
        for case in self._validation_cases():
            reqs.append(PromptRequest(case.prompt, "caption", f"validation prompt {case.name!r}", case.image))
            images[None if case.image is None else (case.image.identity, case.image.plan)] = case.image
        for image in images.values() or [None]:
            reqs.append(PromptRequest(negative, "negative", image=image))
        return reqs

    def _validation_cases(self) -> list[ValidationCase]:
        """Every validation render: prompt, size and, for image editing, the reference it edits.

        The prompts are the spec's (validation_prompt, then the library), then the family's own
        from the data (i2i with ``validation_using_datasets``: the eval pair's edit caption), then
        the unconditional one unless disabled.
        """
        if hasattr(self, "_cases"):
            return self._cases
        v = self.spec.validation
        prompts = dict(self.spec.validation_prompts())
        prompts.update(self.family.validation_prompts_from_data(self.index))
        if prompts and not v.validation_disable_unconditional:
            prompts["unconditional"] = ""
        sizes = parse_resolution_list(v.validation_resolution or "1024x1024") if prompts else []
        images = {(w, h): self.family.validation_reference(self.index, w, h) for w, h in sizes}
        cases = [ValidationCase(n, text, w, h, images[w, h]) for n, text in prompts.items() for w, h in sizes]
        self._cases: list[ValidationCase] = cases
        return cases

    def fill_caches(self, *, latents: str = "auto") -> None:
        """Fill the text cache, then (``latents``) the latent cache.

        ``"auto"`` (training): the pre-pass runs unless latents are made while training
        (``vae_cache_ondemand`` or ``vae_cache_disable``); then the VAE is loaded here, before the
        transformer, and kept. ``"cache"``: the pre-pass runs whatever the spec says (the ``cache``
        command for an on-demand run: caching is what it was asked for). ``"skip"``: no pre-pass and no
        VAE (the ``cache`` command with ``vae_cache_disable``, which may write no latent).
        """
        from ..memory.startup import Startup

        if latents not in ("auto", "cache", "skip"):
            raise ValueError(f"latents must be 'auto', 'cache' or 'skip', not {latents!r}")
        s = self.spec  # memory options were checked by resolve_spec in prepare(), before anything loads
        # Start-up sequencing (memory/startup.py): text encoders, then the VAE, each released and checked.
        startup = self.startup = Startup(self.family, s, self.device, self.events.emit, self.warn)
        progress = self._cache_progress
        self.text_cache = TextEmbedCache(s.text_cache_dir(), self.family)
        self.text_cache.identity.update(startup.text_identity_extra())
        report = self.text_cache.ensure(
            self._prompt_requests(),
            lambda: startup.load_text_encoders(self.weight_dtype),
            progress=progress,
        )
        for w in report.warnings:
            self.warn(w)
        self.text_report = report
        startup.release("text_encoders")
        roots = {ds.id: s.vae_cache_dir(ds) for ds in s.training_datasets}
        cache = LatentCache(roots, self.family)
        cache.identity.update(startup.latent_identity_extra())
        references = [smp.reference for smp in self.index.samples if smp.reference is not None]
        samples = self.index.samples + references
        vae_dtype = torch.float32 if self.device.type == "cpu" else self.weight_dtype
        if latents == "cache" or (latents == "auto" and not s.memory.latents_on_the_fly):
            self.latent_cache: LatentCache | OnTheFlyLatents = cache
            self.latent_report = cache.ensure(
                samples, lambda: startup.load_vae(vae_dtype), batch_size=s.training.vae_batch_size, progress=progress
            )
            startup.release("vae")
            self._crepa_teacher()
            return
        live = OnTheFlyLatents(
            cache,
            lambda: startup.load_vae(vae_dtype),
            write=not s.memory.vae_cache_disable,
            batch_size=s.training.vae_batch_size,
        )
        unique = len({(smp.dataset_id, cache.key(smp)) for smp in samples})
        missing = unique if s.memory.vae_cache_disable else live.missing(samples)
        self.latent_report = CacheReport(total=unique, reused=unique - missing)
        if missing and latents == "auto":  # loaded before the transformer: the memory report and peak include it
            live.vae = startup.load_vae(vae_dtype)
        how = "encoded at every draw, never written" if s.memory.vae_cache_disable else "encoded at their first draw"
        log.info("latents are made while training: %d of %d to encode (%s)", missing, unique, how)
        self.latent_cache = live
        self._crepa_teacher()

    def _crepa_teacher(self) -> None:
        """CREPA's teacher (routing/crepa_run.py); its cached features are made here, before the transformer loads."""
        self.crepa_run = CrepaRun(self.spec, self.family, self.device) if self.spec.crepa.crepa_enabled else None
        if self.crepa_run is None:
            return
        vae_dtype = torch.float32 if self.device.type == "cpu" else self.weight_dtype

        def latents(samples: list[Any]) -> list[dict[str, torch.Tensor]]:  # while training: the batches' memory
            return self.batches.latents(samples) if hasattr(self, "batches") else self.latent_cache.load_many(samples)

        cached = self.crepa_run.build_teacher(self.latent_cache.key, latents, vae_dtype)
        if cached and isinstance(self.latent_cache, LatentCache):
            self.teacher.ensure(self.index.samples, progress=self._cache_progress)
            self.teacher.release()
            self._free()

    @property
    def crepa(self) -> Any:
        """CREPA's regulariser (projector, loss), None when CREPA is off or the model is not built yet."""
        return self.crepa_run.regulariser if self.crepa_run is not None else None

    @property
    def teacher(self) -> Any:
        """CREPA's DINOv2 teacher features, None without one (CREPA off, or the backbone teacher)."""
        return self.crepa_run.teacher if self.crepa_run is not None else None

    def _cache_progress(self, stage: str, done: int, total: int) -> None:
        self.events.emit("cache", stage=stage, done=done, total=total)
        if self.cancel.is_set():
            from ..errors import CancelledError

            raise CancelledError(f"cancelled while caching {stage} ({done}/{total} ready, kept on disk)")

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ model
    def build_model(self) -> None:
        from ..memory import transformer as memory  # quantise before the LoRA, place (offload) after it
        from ..memory.estimate import measured_training_state
        from ..memory.report import module_bytes, same_device

        s = self.spec
        self.transformer = self.family.load_transformer(memory.load_device(s, self.device), self.weight_dtype)
        prepare_transformer(s, self.family, self.transformer)
        self.quantization = memory.quantize_transformer(self.transformer, s, self.family, self.device)
        torch.manual_seed(s.training.seed)  # adapters are randomly initialised: same seed, same adapter
        self.adapter = build_adapter(s, self.family, self.transformer, quantised=bool(self.quantization.quantized))
        self.params = self.adapter.params
        if s.lora.init_lora:
            self.adapter.load_file(s.lora.init_lora)
        self.offloader = memory.place_transformer(self.transformer, s, self.device)
        if s.training.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.trained_params = list(self.params)  # what the optimizer steps: the adapter, and CREPA's projector
        if self.crepa_run is not None:
            self.trained_params += self.crepa_run.build_regulariser(self.transformer, self.total_steps)
        self.optimizer = build_optimizer(
            self.trained_params, s.optimizer, float(s.optimizer.learning_rate), seed=s.training.seed
        )
        self.lr_scheduler = build_lr_scheduler(self.optimizer, s.optimizer, self.total_steps)
        self.ema = build_ema(self.params, s.training, self.device) if s.training.use_ema else None
        self.scaler = LossScaler(self.precision)
        self.rollout = ScheduledSampling.build(s.scheduled_sampling, self.family)  # None: off
        self.rollout_passes = 0  # rollout forward passes of the latest step
        self.crepa_history: list[list[float]] = []  # [step, CREPA term] per step (CREPA runs), for the loss plot
        self.evaluations: list[dict[str, Any]] = []  # {step, clip_score, scores} per evaluation (evaluation runs)
        self._scorer: clip_eval.ClipScorer | None = None  # loaded at the first evaluation
        self.batches = CachedBatches(
            self.index.samples,
            self.family,
            self.text_cache,
            self.latent_cache,
            s.training.caption_dropout_probability,
            latent_memory_entries=0 if s.memory.vae_cache_disable else None,
        )
        report = memory.memory_report(
            self.transformer,
            self.device,
            self.weight_dtype,
            self.quantization,
            self.offloader,
            s.training.gradient_checkpointing,
        )
        report["model_type"] = s.model.model_type
        ema = self.ema
        report.update(
            measured_training_state(
                self.params,
                s.optimizer.optimizer,
                ema_bytes=ema.nbytes() if ema else 0,
                ema_on_device=ema is not None and same_device(ema.device, self.device),
            ).as_report()
        )
        report["ema_device"] = s.training.ema_device if ema else None
        report["ema_shadow_device"] = str(ema.device) if ema else None
        report["ema_update_device"] = str(ema.update_device) if ema else None
        vae = getattr(self.latent_cache, "vae", None)  # on-the-fly latents keep their VAE loaded
        report["vae_bytes"] = module_bytes(vae) if vae is not None else 0
        report["vae_device_bytes"] = module_bytes(vae, self.device) if vae is not None else 0
        self.events.emit("memory", **report)

    # ------------------------------------------------------------------ loop
    def train(self) -> RunResult:
        s = self.spec
        start_step = 0
        history: list[list[float]] = []
        if not hasattr(self, "resume"):
            self.open_resume()
        loaded = self.resume
        resumed_from = loaded.folder if loaded is not None else None
        if loaded is not None:
            self._restore(loaded)
            start_step = loaded.state.step
            history = [list(h) for h in loaded.state.loss_history]
            self.crepa_history = [list(h) for h in loaded.state.crepa_history]
            self.evaluations = [dict(e) for e in loaded.state.evaluations]
            if self.rollout is not None:
                self.rollout.passes_total = loaded.state.rollout_passes
            self.events.emit("resumed", step=start_step, checkpoint=str(resumed_from))
        result = RunResult(self.output_dir, start_step, None, resumed_from=resumed_from, loss_history=history)

        v = s.validation
        if not v.validation_disable and not v.disable_benchmark and start_step == 0:
            result.validation_files += self.validate(0)

        accum = s.training.gradient_accumulation_steps
        t_start = time.perf_counter()
        step = start_step
        while step < self.total_steps:
            if self.cancel.is_set():
                result.cancelled = True
                break
            loss_value = self.train_step(step, accum)
            step += 1
            history.append([step, loss_value])
            if self.crepa is not None and "crepa_loss" in self.crepa_run.log:
                self.crepa_history.append([step, self.crepa_run.log["crepa_loss"]])
            elapsed = time.perf_counter() - t_start
            rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
            self.events.emit(
                "progress",
                step=step,
                total=self.total_steps,
                loss=loss_value,
                lr=self.lr_scheduler.get_last_lr()[0],
                it_s=rate,
                eta_s=(self.total_steps - step) / rate if rate > 0 else None,
                epoch=self.sampler.epoch,
                **(self.crepa_run.log if self.crepa is not None else {}),
                **self._rollout_counts(),
                **self._grad_norm(),
            )
            self._check_finite(step, loss_value, result.checkpoint or resumed_from)
            every = s.checkpointing.checkpoint_step_interval
            if every and step % every == 0 and step < self.total_steps:
                result.checkpoint = self.save_checkpoint(step, history)
            vevery = v.validation_step_interval
            eevery = v.eval_steps_interval if v.evaluation_type != "none" else None
            due = (vevery and step % vevery == 0) or (eevery and step % eevery == 0)  # evaluations render too
            if not v.validation_disable and due and step < self.total_steps:
                result.validation_files += self.validate(step)

        result.steps = step
        result.loss_history = history
        result.crepa_history = self.crepa_history
        result.evaluations = self.evaluations
        if result.cancelled:
            if step > start_step:
                result.checkpoint = self.save_checkpoint(step, history)
            self.events.emit("cancelled", step=step, checkpoint=str(result.checkpoint) if result.checkpoint else None)
            return result
        if step > start_step and v.evaluation_type != "none" and not v.validation_disable:
            # scored first, so the final checkpoint holds the final score (a re-queue with more steps resumes
            # from it); the checkpoint is written even when the render or the scoring fails
            try:
                result.validation_files += self.validate(step, final=True)
            finally:
                result.checkpoint = self.save_checkpoint(step, history)
        elif step > start_step:
            result.checkpoint = self.save_checkpoint(step, history)
            if not v.validation_disable:
                result.validation_files += self.validate(step, final=True)
        result.lora, result.ema_lora = self.export_final(step)
        result.loss_plot = save_loss_plot(history, self.output_dir / "loss.png", self.crepa_history)
        self.events.emit(
            "done",
            steps=step,
            lora={"diffusers": str(result.lora.diffusers), "comfyui": str(result.lora.comfyui)},
            ema_lora=(
                {"diffusers": str(result.ema_lora.diffusers), "comfyui": str(result.ema_lora.comfyui)}
                if result.ema_lora
                else None
            ),
            loss_plot=str(result.loss_plot),
            final_loss=history[-1][1] if history else None,
            validation_files=[str(f) for f in result.validation_files],
            loss_history=history,
            **({"evaluations": self.evaluations} if self.evaluations else {}),
        )
        return result

    def _grad_norm(self) -> dict[str, float]:
        """The step's gradient norm before clipping, for the progress event (clipping by norm only)."""
        norm = self.grad_norm
        return {"grad_norm": norm} if norm is not None and math.isfinite(norm) else {}

    def _rollout_counts(self) -> dict[str, int]:
        """Scheduled sampling's forward passes for the progress event: this step's and the run's (none when off)."""
        if self.rollout is None:
            return {}
        return {"rollout_passes": self.rollout_passes, "rollout_passes_total": self.rollout.passes_total}

    def _check_finite(self, step: int, loss: float, last_checkpoint: Path | None) -> None:
        """Stop on a NaN or infinite loss (checked at every step; the item() already synchronised)."""
        if not math.isfinite(loss):
            raise ConfigError(
                f"the loss became {loss} at step {step}; training stopped ({_kept(last_checkpoint)})",
                "lower learning_rate, or enable max_grad_norm (gradient clipping)",
            )

    def _check_weights(self, step: int) -> None:
        """Refuse to save adapter weights that became NaN or infinite.

        An update with an infinite learning rate leaves a finite loss for its own step and NaN
        weights behind; the loss of the next step would stop the run, but a checkpoint saved in
        between would keep the broken weights as the one to resume from.
        """
        if all(bool(torch.isfinite(p).all()) for p in self.params):
            return
        found = ckpt.list_checkpoints(self.output_dir)
        raise ConfigError(
            f"the LoRA weights became NaN or infinite at step {step}; training stopped "
            f"({_kept(found[-1][1] if found else None)})",
            "lower learning_rate, or enable max_grad_norm (gradient clipping)",
        )

    def _restore(self, loaded: ckpt.LoadedCheckpoint) -> None:
        """Put the checkpoint's adapter and loop states into the freshly built model and optimizer."""
        fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        fresh_base_lrs = list(self.lr_scheduler.base_lrs)
        states = loaded.states
        try:
            self.adapter.load_state_dict(loaded.adapter, source=f"checkpoint {loaded.folder}")
            self.optimizer.load_state_dict(states["optimizer"])
            self.lr_scheduler.load_state_dict(states["scheduler"])
            if self.ema is not None and "ema" in states:
                self.ema.load_state_dict(states["ema"])
            elif self.ema is not None:  # use_ema turned on when continuing: average from the resumed weights
                self.ema = build_ema(self.params, self.spec.training, self.device)
            self.sampler.load_state_dict(loaded.state.sampler)
            if "grad_scaler" in states:  # fp16: the loss scale it had reached, so resume stays exact
                self.scaler.load_state_dict(states["grad_scaler"])
            if self.crepa is not None and "crepa" in states:
                self.crepa.load_state(states["crepa"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {loaded.folder} does not fit this run: {type(e).__name__}: {e}",
                "resume from a checkpoint of this run, or start over with resume_from_checkpoint ''",
            ) from e
        if self.resume_changes:
            self._apply_new_settings(fresh_groups, fresh_base_lrs)
        if "rng" in states:
            ckpt.restore_rng(states["rng"])

    def _apply_new_settings(self, fresh_groups: list[dict[str, Any]], fresh_base_lrs: list[float]) -> None:
        """resume_with_changes: the optimizer's hyper-parameters and the LR schedule of the new spec.

        Loading the optimizer and scheduler states brings back the old learning rate, betas and
        decay; the new ones are put back, and the learning rate of the current step is recomputed
        from the new schedule (built for the new length), so the change applies from here on.
        """
        for group, fresh in zip(self.optimizer.param_groups, fresh_groups):
            group.update(fresh)
        sched = self.lr_scheduler
        sched.base_lrs = fresh_base_lrs
        if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            lrs = [base * fn(sched.last_epoch) for base, fn in zip(fresh_base_lrs, sched.lr_lambdas)]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs  # what get_last_lr() reports
        if self.ema is not None:
            self.ema.decay = float(self.spec.training.ema_decay)

    def train_step(self, step: int, accum: int) -> float:
        """One optimizer step over ``accum`` micro-batches; returns the mean loss."""
        s = self.spec.training
        total = 0.0
        if self.crepa_run is not None:
            self.crepa_run.log = {}
        self.rollout_passes = 0
        for micro in range(accum):
            seed = _step_seed(s.seed, step, micro)
            generator = torch.Generator().manual_seed(seed)
            # adapter dropouts (PEFT lora_dropout, LyCORIS dropout/rank_dropout/module_dropout) draw from the
            # global generator: seeding it per micro-batch makes a resumed run draw what the straight run drew
            torch.default_generator.manual_seed(seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            batch = self.batches.build(self.sampler.next_batch(), generator)
            x0 = batch.x0
            shift = resolve_shift(s, self.family.defaults.train_shift, self.family.image_seq_len(x0))
            sigma = sample_sigmas(
                x0.shape[0],
                generator,
                sigmoid_scale=s.flow_sigmoid_scale,
                uniform=s.flow_use_uniform_schedule,
                shift=shift,
            )
            noise = torch.randn(x0.shape, generator=generator)
            noisy, weights = self.family.prepare_noisy(x0, noise, sigma)
            target = self.family.target(x0, noise).to(self.device)
            text = {k: v.to(self.device) for k, v in batch.text.items()}
            extra = {} if batch.condition is None else {"condition": batch.condition.to(self.device)}
            rollout = None
            if self.rollout is not None:  # scheduled sampling: maybe train on a self-generated input instead
                predict = self._predictor(text, extra)
                rollout = self.rollout.apply(step, seed, noisy, predict, x0, noise, sigma, self.device)
                noisy = rollout.noisy
                self.rollout_passes += rollout.passes
            with self._autocast(), self._capture() as capture:
                pred = self.family.predict(
                    self.transformer, noisy.to(self.device), sigma.to(self.device), text, **extra
                )
            if weights is not None:
                weights = weights.to(self.device)
            if rollout is None:
                loss = flow_loss(pred.float(), target.float(), s.loss_type, s.huber_c, weights=weights).mean()
            else:  # ReflexFlow's terms, when on
                loss = self.rollout.loss(
                    rollout, pred, target, x0, loss_type=s.loss_type, huber_c=s.huber_c, weights=weights
                ).mean()
            objective = loss
            if capture is not None:
                term = self.crepa_run.term(self.transformer, step, batch.samples, x0, text, capture, accum)
                objective = loss if term is None else loss + term
            self.scaler.scale(objective / accum).backward()
            total += loss.detach().item()
        self.scaler.unscale(self.optimizer)  # clipping sees the true gradients
        self.grad_norm = clip_gradients(self.trained_params, self.spec.optimizer)
        scale = self.scaler.scale_value
        stepped = self.scaler.step(self.optimizer)
        if stepped:  # as accelerate does: a skipped update does not advance the LR schedule
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not stepped:
            self.events.emit(
                "step_skipped",
                step=step + 1,
                reason="fp16 gradients overflowed (inf/NaN); the weights were not updated",
                loss_scale=scale,
                next_loss_scale=self.scaler.scale_value,
            )
        elif self.ema is not None:
            self.ema.update(step)
        return total / accum

    def _autocast(self):
        return self.precision.autocast()

    def _capture(self) -> Any:
        """CREPA's hook on its block for the forward calls of one micro-batch (nothing when CREPA is off)."""
        return self.crepa_run.capture(self.transformer) if self.crepa is not None else _nullcontext()

    def _predictor(self, text: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]):
        """``predict(noisy, sigma)`` with this micro-batch's text and condition, as the training pass calls it."""

        def predict(noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                device = self.device
                return self.family.predict(self.transformer, noisy.to(device), sigma.to(device), text, **extra)

        return predict

    # ------------------------------------------------------------------ outputs
    def _metadata(self, step: int, ema: bool = False) -> dict[str, str]:
        s = self.spec
        extra = dict(self.family.lora_metadata_extra())
        extra.update(self.adapter.metadata())
        extra["spec_hash"] = s.fingerprint()
        captions = sorted({c for smp in self.index.samples for c in smp.captions})
        extra["captions"] = f"{len(captions)} distinct; e.g. " + " | ".join(c[:60] for c in captions[:3])
        extra["ema"] = str(ema).lower()
        return lora_metadata(
            family=self.family.name,
            flavour=self.family.flavour.name,
            rank=self.adapter.rank,
            alpha=self.adapter.alpha,
            steps=step,
            target_modules=self.adapter.target_modules,
            extra=extra,
        )

    def _save_lora(self, folder: Path, step: int, name: str, ema: bool = False) -> LoraFiles:
        return self.adapter.save(folder, name, self._metadata(step, ema))

    def save_checkpoint(self, step: int, history: list[list[float]]) -> Path:
        self._check_weights(step)
        s = self.spec
        full = self.adapter if isinstance(self.adapter, FullFinetune) else None
        folder = ckpt.save_checkpoint(
            self.output_dir,
            ckpt.TrainingState(
                step,
                self.sampler.state_dict(),
                history,
                s.fingerprint(),
                self.definition,
                rollout_passes=self.rollout.passes_total if self.rollout is not None else 0,
                crepa_history=self.crepa_history,
                evaluations=self.evaluations,
            ),
            adapter=self.adapter.state_dict(),
            states={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "grad_scaler": self.scaler.state_dict() if self.scaler.enabled else None,
                "crepa": self.crepa.state() if self.crepa is not None else None,
            },
            spec_json=s.to_json(),
            # a full fine-tune's checkpoint is its weights, sharded; no export copy of them beside it
            write_extra=None if full else lambda d: self._save_lora(d / "lora", step, s.export.output_name),
            keep_last=s.checkpointing.checkpoints_total_limit,
            shard_bytes=full.shard_bytes if full else None,
        )
        self.events.emit("checkpoint", step=step, path=str(folder))
        return folder

    def export_final(self, step: int) -> tuple[LoraFiles, LoraFiles | None]:
        name = self.spec.export.output_name
        files = self._save_lora(self.output_dir, step, name)
        ema_files = None
        full = self.adapter if isinstance(self.adapter, FullFinetune) else None
        if self.ema is not None and full is not None:
            # the shadow tensors are written directly: swapping them in would back up every weight
            shadow = dict(zip(full.names, self.ema.shadow_params()))
            meta = self._metadata(step, ema=True)
            ema_files = full.save(self.output_dir / "ema", f"{name}_ema", meta, weights=shadow)
        elif self.ema is not None:
            with self.ema.swapped_in(self.params):
                ema_files = self._save_lora(self.output_dir / "ema", step, f"{name}_ema", ema=True)
        target = self.spec.export.comfyui_lora_dir
        if target and full is None:  # a fine-tuned model is no LoRA
            dest = Path(target)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(files.comfyui, dest / files.comfyui.name)
        return files, ema_files

    # ------------------------------------------------------------------ validation
    def validate(self, step: int, final: bool = False) -> list[Path]:
        """Render every validation prompt at every validation resolution with the current weights.

        When the run evaluates (``evaluation_type``) and this step is due, the renders are then scored.
        """
        from ..data.images import load_image
        from ..memory.validation_offload import model_cpu_offload

        v = self.spec.validation
        cases = self._validation_cases()
        if not cases:
            return []
        if not hasattr(self, "_val_vae"):
            self._val_vae = self.family.load_vae(torch.device("cpu"), torch.float32)
            self._val_scheduler = self.family.load_scheduler()
        self.family.prepare_validation(self.index)
        folder = self.output_dir / "validation" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        scored = clip_eval.is_due(self.spec, step, final)
        renders: list[tuple[str, str, Any]] = []  # (name, prompt, render) to score
        one_size = len({(c.width, c.height) for c in cases}) == 1
        self.transformer.eval()
        context = self.ema.swapped_in(self.params) if self.ema is not None else _nullcontext()
        strength = self.adapter.at_strength(v.validation_lycoris_strength)
        # the VAE joins the transformer on the device, or with enable_model_cpu_offload they take turns
        # (innermost, so the EMA weights go in and out with the transformer on the device, as without it)
        placement = model_cpu_offload(
            self.transformer, self._val_vae, self.device, self.spec.memory.enable_model_cpu_offload
        )
        try:
            with context, strength, torch.no_grad(), self._autocast(), placement as offload:
                for case in cases:
                    image = case.image
                    prompt = self.family.collate_text([self.batches.text(case.prompt, image=image)])
                    negative_text = v.validation_negative_prompt or ""
                    negative = self.family.collate_text([self.batches.text(negative_text, "negative", image)])
                    extra = {} if image is None else {"reference": load_image(image)}
                    offload.before_render()
                    rendered = self.family.render(
                        self.transformer,
                        self._val_vae,
                        self._val_scheduler,
                        prompt,
                        negative,
                        width=case.width,
                        height=case.height,
                        steps=v.validation_num_inference_steps,
                        guidance=float(v.validation_guidance or 1.0),
                        guidance_rescale=v.validation_guidance_rescale,
                        seed=v.validation_seed if v.validation_seed is not None else self.spec.training.seed,
                        **extra,
                    )
                    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in case.name)[:60]
                    files += save_sample(rendered, folder / f"{safe}-{case.width}x{case.height}")
                    if scored:
                        name = case.name if one_size else f"{case.name}-{case.width}x{case.height}"
                        renders.append((name, case.prompt, rendered))
        finally:
            self.transformer.train()
            self._val_vae.to("cpu")
            self._free()
        self.events.emit("validation", step=step, files=[str(f) for f in files])
        if scored:
            self._evaluate(step, renders)
        return files

    def _evaluate(self, step: int, renders: list[tuple[str, str, Any]]) -> None:
        """CLIP-score the renders of ``step``; an ``evaluation`` event, kept for checkpoints and the summary."""
        if self._scorer is None:
            source = self.spec.validation.pretrained_evaluation_model_name_or_path
            self._scorer = clip_eval.ClipScorer(source, self.device)
        found = clip_eval.evaluate(self._scorer, step, renders)
        if found is None:
            return
        self.evaluations[:] = [e for e in self.evaluations if e["step"] != step] + [found.as_dict()]  # the result's
        self.events.emit("evaluation", **found.as_dict())


@dataclass(frozen=True)
class ValidationCase:
    """One validation render. ``image`` (a fitted Sample) is the reference an image-editing model edits."""

    name: str
    prompt: str
    width: int
    height: int
    image: Any = None


def _kept(last_checkpoint: Path | None) -> str:
    return f"checkpoint {last_checkpoint.name} is the last one saved" if last_checkpoint else "no checkpoint was saved"


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def train(spec: TrainSpec, events: EventSink | None = None, **kwargs: Any) -> RunResult:
    """Convenience: run ``spec`` in this process."""
    return Trainer(spec, events, **kwargs).run()
