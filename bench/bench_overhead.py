"""Overhead of our training loop against a bare torch loop, and cache-encoding throughput.

Runs entirely offline on the tiny, randomly initialised models of ``trainer_core.testing.tiny``:
Lumina 2, Kandinsky 5 image (T2I) and Kandinsky 5 video (T2V, on short PyAV-encoded clips);
``--family`` picks which (default: all three, one after the other).

1. Loop overhead: ``Trainer.train_step`` versus a hand-written loop doing the family's own minimal
   forward (the diffusers transformer called directly with the arguments the family's ``predict``
   gives it, from tensors preloaded once), backward and AdamW step on a second copy of the same
   transformer with the same LoRA, on the same latents and text embeddings and the same shapes.
   Before timing, both forwards are run once on the same input and must agree. The two loops
   alternate every ``--block`` steps (ABBA order across rounds) so drift on a busy machine hits
   both alike; each block pair gives a ratio ours / bare, a round's ratio is the median of those,
   and the reported ratio is the median over rounds. Target: <= 1.05. Wall and process-CPU time
   are both recorded. OMP_WAIT_POLICY defaults to PASSIVE (see below) unless set.
2. A per-phase breakdown of both loops (separate, instrumented pass; not used for the ratio).
3. Cache filling (image families only; video caching is ``bench_video.py``): text encoding
   (prompts/s) and latent encoding (images/s) into fresh cache dirs at 128x128 and 256x256, then
   a second ``fill_caches()`` on the warm cache.

Usage::

    python bench/bench_overhead.py                  # all three families, about 1-2 minutes on 2 CPU cores
    python bench/bench_overhead.py --family lumina2 --skip-caches
    python bench/bench_overhead.py --steps 100 --rounds 5 --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a machine shared with
# other jobs, spinning threads that lose their core make step times swing by 10x and the comparison
# meaningless; with passive waiting the ratio is stable. Run with OMP_WAIT_POLICY=active to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_video import make_clips  # noqa: E402

from trainer_core.demo import COLOURS, SHAPES, draw_shape  # noqa: E402
from trainer_core.lora.adapters import add_lora, lora_config  # noqa: E402
from trainer_core.spec import TrainSpec  # noqa: E402
from trainer_core.testing.tiny import (  # noqa: E402
    build_tiny_kandinsky5_image,
    build_tiny_kandinsky5_video,
    build_tiny_lumina2,
)
from trainer_core.train.engine import Trainer  # noqa: E402

SEED = 11
FAMILIES = ("lumina2", "kandinsky5-image", "kandinsky5-video")
FLAVOURS = {"lumina2": None, "kandinsky5-image": "t2i-lite-sft", "kandinsky5-video": "t2v-lite-sft-5s"}
BUILDERS = {
    "lumina2": (build_tiny_lumina2, "tiny-lumina2"),
    "kandinsky5-image": (build_tiny_kandinsky5_image, "tiny-kandinsky5-t2i"),
    "kandinsky5-video": (build_tiny_kandinsky5_video, "tiny-kandinsky5-t2v"),
}


# --------------------------------------------------------------------------- setup


def make_dataset(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` drawn shapes at ``size``, with captions that all have the same length.

    The tiny Gemma tokenizer makes one token per character, so equal-length captions give every
    step the same text length: both loops then run exactly the same shapes every step.
    """
    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.values())
    for i in range(count):
        img = draw_shape(SHAPES[i % len(SHAPES)], colours[i % len(colours)], size, seed=i)
        img.save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(f"bench sample {i:03d}, a drawn shape, flat colours\n")
    return folder


def make_spec(
    family: str,
    model: Path,
    data: Path,
    out: Path,
    *,
    resolution: int,
    rank: int,
    max_grad_norm: float,
    steps: int,
    text_cache: Path,
    vae_cache: Path,
    frames: int | None = None,
) -> TrainSpec:
    """fp32 on CPU, batch 1, no validation or checkpoints. ``frames`` makes it a video dataset
    (``resolution`` is then the short side in px, else the pixel area's side)."""
    dataset = {
        "id": "bench",
        "instance_data_dir": str(data),
        "caption_strategy": "textfile",
        "resolution": resolution,
        "resolution_type": "pixel_area",
        "cache_dir_vae": str(vae_cache),
    }
    if frames:
        dataset.update(dataset_type="video", resolution_type="pixel", video={"num_frames": frames})
    model_section = {"model_family": family, "pretrained_model_name_or_path": str(model)}
    if FLAVOURS[family]:
        model_section["model_flavour"] = FLAVOURS[family]
    return TrainSpec.model_validate(
        {
            "output_dir": str(out),
            "model": model_section,
            "lora": {"lora_rank": rank, "lora_alpha": rank},
            "optimizer": {"optimizer": "adamw", "learning_rate": 1e-4, "max_grad_norm": max_grad_norm},
            "training": {
                "max_train_steps": steps,
                "train_batch_size": 1,
                "mixed_precision": "no",
                "base_model_default_dtype": "fp32",
                "gradient_checkpointing": False,
                "caption_dropout_probability": 0.0,
                "seed": SEED,
            },
            "checkpointing": {"checkpoint_step_interval": None},
            "validation": {"validation_disable": True},
            "datasets": [
                dataset,
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(text_cache)},
            ],
        }
    )


def tiny_model(work: Path, family: str = "lumina2") -> Path:
    builder, name = BUILDERS[family]
    model = work / "model" / name
    if not (model / "model_index.json").exists():
        model = builder(work / "model")
    return model


# --------------------------------------------------------------------------- the two loops


class Ours:
    """``Trainer.train_step`` after prepare / fill_caches / build_model."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.step = 0

    def run(self, n: int) -> list[tuple[float, float]]:
        """(wall, process CPU) seconds of each of ``n`` steps."""
        times = []
        for _ in range(n):
            w0, c0 = time.perf_counter(), time.process_time()
            self.trainer.train_step(self.step, 1)
            times.append((time.perf_counter() - w0, time.process_time() - c0))
            self.step += 1
        return times


class Bare:
    """The same model, LoRA, data and shapes in a plain torch loop; subclasses do the family's forward."""

    def __init__(self, trainer: Trainer) -> None:
        s = trainer.spec
        fam = trainer.family
        self.transformer = fam.load_transformer(torch.device("cpu"), torch.float32)
        torch.manual_seed(s.training.seed)  # the engine's seed before add_lora: the same initial adapter
        self.params = add_lora(self.transformer, lora_config(s.lora, fam.lora_target_modules()))
        self.transformer.train()
        o = s.optimizer
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=float(o.learning_rate),
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_epsilon,
            weight_decay=o.adam_weight_decay,
        )
        # preloaded once from the caches: posterior means and the collated text of each sample
        self.data = []
        for smp in trainer.index.samples:
            x0 = trainer.latent_cache.load(smp)["mean"][None].float().contiguous()
            text = fam.collate_text([trainer.text_cache.load(smp.captions[0])])
            self.data.append(self.preload(trainer, x0, text))
        self.i = 0

    @staticmethod
    def for_trainer(trainer: Trainer) -> Bare:
        return BareLumina2(trainer) if trainer.family.name == "lumina2" else BareKandinsky5(trainer)

    def preload(self, trainer: Trainer, x0: torch.Tensor, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, noisy: torch.Tensor, s: torch.Tensor, item: dict) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shapes(self) -> set[tuple]:
        return {(tuple(d["x0"].shape), tuple(d["emb"].shape)) for d in self.data}

    def step(self, timer: dict[str, float] | None = None) -> float:
        item = self.data[self.i % len(self.data)]
        self.i += 1
        x0 = item["x0"]
        t0 = time.perf_counter()
        s = torch.rand(x0.shape[0])
        noise = torch.randn_like(x0)
        sv = s.view(-1, *[1] * (x0.dim() - 1))
        noisy = (1 - sv) * x0 + sv * noise
        t1 = time.perf_counter()
        pred = self.forward(noisy, s, item)
        loss = F.mse_loss(pred, self.target(x0, noise))
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        t4 = time.perf_counter()
        if timer is not None:
            timer["batch + noise"] += t1 - t0
            timer["forward + loss"] += t2 - t1
            timer["backward"] += t3 - t2
            timer["optimizer (+clip, sched)"] += t4 - t3
        return value

    def run(self, n: int) -> list[tuple[float, float]]:
        """(wall, process CPU) seconds of each of ``n`` steps."""
        times = []
        for _ in range(n):
            w0, c0 = time.perf_counter(), time.process_time()
            self.step()
            times.append((time.perf_counter() - w0, time.process_time() - c0))
        return times


class BareLumina2(Bare):
    """``Lumina2Transformer2DModel(noisy, 1 - sigma, text, mask)``; target ``x0 - noise``."""

    def preload(self, trainer, x0, text):
        return {
            "x0": x0,
            "emb": text["prompt_embeds"].contiguous(),
            "mask": text["prompt_attention_mask"].contiguous(),
        }

    def forward(self, noisy, s, item):
        return self.transformer(
            hidden_states=noisy,
            timestep=1 - s,
            encoder_hidden_states=item["emb"],
            encoder_attention_mask=item["mask"],
            return_dict=False,
        )[0]

    def target(self, x0, noise):
        return x0 - noise


class BareKandinsky5(Bare):
    """``Kandinsky5Transformer3DModel`` as ``Kandinsky5Base.predict`` calls it; target ``noise - x0``.

    Latents are channels-last ``(B, F, H, W, C)``. For ``visual_cond`` checkpoints (every K5 video
    one, T2V included) the input is ``[noisy | zeros | mask 0]``; the zeros and the mask are
    preloaded, so a step only concatenates. Timestep ``sigma * 1000`` (fp32), the pooled CLIP
    embedding, RoPE positions (latent frames, patch rows, patch columns; preloaded), text positions
    ``0..n-1`` (preloaded) and the flavour's RoPE ``scale_factor``. One caption length per batch
    here, so no split by length.
    """

    def preload(self, trainer, x0, text):
        pt, ph, pw = self.transformer.config.patch_size
        frames, height, width = x0.shape[1:4]
        n = int(text["prompt_lengths"][0])
        cond = None
        if self.transformer.config.visual_cond:
            cond = torch.cat([torch.zeros_like(x0), x0.new_zeros(*x0.shape[:-1], 1)], dim=-1)
        self.scale_factor = trainer.family.scale_factor
        return {
            "x0": x0,
            "emb": text["prompt_embeds"][:, :n].contiguous(),
            "pooled": text["pooled_prompt_embeds"].contiguous(),
            "cond": cond,
            "rope": [torch.arange(frames // pt), torch.arange(height // ph), torch.arange(width // pw)],
            "text_pos": torch.arange(n),
        }

    def forward(self, noisy, s, item):
        x = noisy if item["cond"] is None else torch.cat([noisy, item["cond"]], dim=-1)
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=item["emb"],
            pooled_projections=item["pooled"],
            timestep=s * 1000.0,
            visual_rope_pos=item["rope"],
            text_rope_pos=item["text_pos"],
            scale_factor=self.scale_factor,
            return_dict=False,
        )
        return out[0] if isinstance(out, tuple) else out  # this diffusers returns the bare tensor

    def target(self, x0, noise):
        return noise - x0


def check_same_forward(trainer: Trainer, bare: Bare) -> float:
    """Both forwards on the same noisy latent and sigma (before any step): max abs difference."""
    item = bare.data[0]
    g = torch.Generator().manual_seed(0)
    x0 = item["x0"]
    s = torch.rand(x0.shape[0], generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sv = s.view(-1, *[1] * (x0.dim() - 1))
    noisy = (1 - sv) * x0 + sv * noise
    smp = trainer.index.samples[0]
    text = trainer.family.collate_text([trainer.text_cache.load(smp.captions[0])])
    with torch.no_grad():
        ours = trainer.family.predict(trainer.transformer, noisy, s, text)
        theirs = bare.forward(noisy, s, item)
    if ours.shape != theirs.shape:
        raise SystemExit(
            f"the two forwards give different shapes: ours {tuple(ours.shape)}, bare {tuple(theirs.shape)}"
        )
    return float((ours - theirs).abs().max())


# --------------------------------------------------------------------------- breakdown of ours


@contextlib.contextmanager
def instrument(trainer: Trainer, timer: dict[str, float]):
    """Time the phases of ``train_step`` by wrapping what it calls (benchmark-only monkeypatching)."""
    import trainer_core.train.engine as engine

    def wrap(fn, key):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timer[key] += time.perf_counter() - t0

        return timed

    saved_backward = torch.Tensor.backward
    saved_clip = engine.clip_gradients
    batches, family, opt, sched = trainer.batches, trainer.family, trainer.optimizer, trainer.lr_scheduler
    patched = [
        (batches, "build", "batch build"),
        (family, "predict", "forward"),
        (opt, "step", "optimizer"),
        (opt, "zero_grad", "optimizer"),
        (sched, "step", "lr scheduler"),
    ]
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patched]  # the lr scheduler wraps opt.step
    for obj, name, key in patched:
        setattr(obj, name, wrap(getattr(obj, name), key))
    engine.clip_gradients = wrap(saved_clip, "grad clip")
    torch.Tensor.backward = wrap(saved_backward, "backward")
    try:
        yield
    finally:
        torch.Tensor.backward = saved_backward
        engine.clip_gradients = saved_clip
        for obj, name, before in saved:
            if before is None:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = before


def breakdown(ours: Ours, bare: Bare, n: int) -> dict[str, dict[str, float]]:
    """Median ms per phase over ``n`` steps of each loop, the two loops alternating step by step."""
    per_ours: dict[str, list[float]] = defaultdict(list)
    per_bare: dict[str, list[float]] = defaultdict(list)
    t_ours: dict[str, float] = defaultdict(float)
    with instrument(ours.trainer, t_ours):
        for _ in range(n):
            t_ours.clear()
            total = ours.run(1)[0][0]
            t_ours["other (seeding, sigmas, noise, loss, .item)"] = total - sum(t_ours.values())
            t_ours["total"] = total
            for k, v in t_ours.items():
                per_ours[k].append(v)
            t_bare: dict[str, float] = defaultdict(float)
            t0 = time.perf_counter()
            bare.step(t_bare)
            total = time.perf_counter() - t0
            t_bare["other"] = total - sum(t_bare.values())
            t_bare["total"] = total
            for k, v in t_bare.items():
                per_bare[k].append(v)
    return {
        "ours_ms_per_step": {k: 1000 * statistics.median(v) for k, v in per_ours.items()},
        "bare_ms_per_step": {k: 1000 * statistics.median(v) for k, v in per_bare.items()},
    }


# --------------------------------------------------------------------------- benchmarks


def clip_width(short_side: int) -> int:
    """4:3 clips, width a multiple of 16."""
    return short_side * 4 // 3 // 16 * 16


def bench_overhead(work: Path, args: argparse.Namespace, family: str = "lumina2") -> dict:
    model = tiny_model(work, family)
    video = family == "kandinsky5-video"
    if video:
        data = make_clips(
            work / "overhead-video" / "data", args.clips, args.clip_frames, (clip_width(args.clip_size), args.clip_size)
        )
    else:
        data = make_dataset(work / "overhead" / "data", args.images, (128, 128))
    out = work / f"overhead-{family}" / "run"
    shutil.rmtree(out, ignore_errors=True)
    spec = make_spec(
        family,
        model,
        data,
        out,
        resolution=args.clip_size if video else 128,
        rank=args.rank,
        max_grad_norm=args.max_grad_norm,
        steps=10_000,
        text_cache=out / "cache" / "text",
        vae_cache=out / "cache" / "vae",
        frames=args.clip_frames if video else None,
    )
    trainer = Trainer(spec, device="cpu")
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    ours, bare = Ours(trainer), Bare.for_trainer(trainer)

    shapes = bare.shapes()
    if len(shapes) != 1:
        raise SystemExit(f"benchmark dataset does not give one fixed shape: {shapes}")
    probe = trainer.batches.build(trainer.sampler.batches_for_epoch(0)[0], torch.Generator().manual_seed(0))
    ours_shape = (tuple(probe.x0.shape), tuple(probe.text["prompt_embeds"].shape))
    if ours_shape != next(iter(shapes)):
        raise SystemExit(f"shapes differ: ours {ours_shape}, bare {shapes}")
    forward_diff = check_same_forward(trainer, bare)
    if forward_diff > 1e-4:
        raise SystemExit(f"the bare forward does not match the family's predict (max abs diff {forward_diff:.3g})")
    n_lora = sum(p.numel() for p in trainer.params)
    same = len(trainer.params) == len(bare.params) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(trainer.params, bare.params)
    )
    if not same:
        raise SystemExit("the two loops do not start from the same LoRA")
    if getattr(trainer, "offloader", None) is not None:
        raise SystemExit("the benchmark spec must not offload (the bare loop does not)")

    rounds = []
    for r in range(args.rounds):
        # warm-up, then the timed steps in alternating blocks (and ABBA order across rounds), so
        # drift on a busy machine lands on both loops alike; each block pair gives its own ratio
        first, second = (("ours", ours), ("bare", bare)) if r % 2 == 0 else (("bare", bare), ("ours", ours))
        for _, loop in (first, second):
            loop.run(args.warmup)
        wall: dict[str, list[float]] = {"ours": [], "bare": []}
        cpu: dict[str, list[float]] = {"ours": [], "bare": []}
        pairs_wall, pairs_cpu = [], []
        done = 0
        while done < args.steps:
            k = min(args.block, args.steps - done)
            block = {name: loop.run(k) for name, loop in (first, second)}
            for name, steps in block.items():
                wall[name] += [w for w, _ in steps]
                cpu[name] += [c for _, c in steps]
            med = {
                name: (statistics.median(w for w, _ in st), statistics.median(c for _, c in st))
                for name, st in block.items()
            }
            pairs_wall.append(med["ours"][0] / med["bare"][0])
            pairs_cpu.append(med["ours"][1] / max(med["bare"][1], 1e-9))
            done += k
        res: dict = {
            name: {
                "median_s": statistics.median(wall[name]),
                "mean_s": statistics.fmean(wall[name]),
                "min_s": min(wall[name]),
                "cpu_median_s": statistics.median(cpu[name]),
            }
            for name in ("ours", "bare")
        }
        res["ratio"] = statistics.median(pairs_wall)
        res["ratio_cpu"] = statistics.median(pairs_cpu)
        res["ratio_of_medians"] = res["ours"]["median_s"] / res["bare"]["median_s"]
        res["ratio_of_means"] = res["ours"]["mean_s"] / res["bare"]["mean_s"]
        rounds.append(res)
        print(
            f"  round {r + 1}/{args.rounds} ({first[0]} first): ours {res['ours']['median_s'] * 1e3:.2f} ms, "
            f"bare {res['bare']['median_s'] * 1e3:.2f} ms, ratio {res['ratio']:.3f} (cpu {res['ratio_cpu']:.3f})",
            flush=True,
        )

    def across(key: str, who: str | None = None, how=statistics.median) -> float:
        return how(r[who][key] if who else r[key] for r in rounds)

    result = {
        "family": family,
        "flavour": trainer.family.flavour.name,
        "shape": {"x0": list(ours_shape[0]), "text": list(ours_shape[1])},
        "visual_tokens": trainer.family.image_seq_len(probe.x0),
        "forward_max_abs_diff": forward_diff,
        "lora_parameters": n_lora,
        "rounds": rounds,
        "ours_median_s": across("median_s", "ours"),
        "ours_mean_s": across("mean_s", "ours", statistics.fmean),
        "ours_min_s": across("min_s", "ours", min),
        "ours_cpu_median_s": across("cpu_median_s", "ours"),
        "bare_median_s": across("median_s", "bare"),
        "bare_mean_s": across("mean_s", "bare", statistics.fmean),
        "bare_min_s": across("min_s", "bare", min),
        "bare_cpu_median_s": across("cpu_median_s", "bare"),
        "ratio": across("ratio"),
        "ratio_cpu": across("ratio_cpu"),
        "ratio_of_medians": across("ratio_of_medians"),
        "ratio_of_means": across("ratio_of_means"),
        "target": 1.05,
    }
    result["within_target"] = result["ratio"] <= result["target"]
    if args.breakdown:
        result["breakdown"] = breakdown(ours, bare, args.steps)
    return result


def bench_caches(work: Path, args: argparse.Namespace, family: str = "lumina2") -> list[dict]:
    model = tiny_model(work, family)
    results = []
    for size in args.sizes:
        base = work / f"cache-{family}-{size}"
        shutil.rmtree(base, ignore_errors=True)  # fresh cache dirs
        data = make_dataset(base / "data", args.cache_images, (size, size))
        spec = make_spec(
            family,
            model,
            data,
            base / "run",
            resolution=size,
            rank=args.rank,
            max_grad_norm=args.max_grad_norm,
            steps=1,
            text_cache=base / "cache" / "text",
            vae_cache=base / "cache" / "vae",
        )
        trainer = Trainer(spec, device="cpu")
        trainer.prepare()
        t0 = time.perf_counter()
        trainer.fill_caches()
        cold = time.perf_counter() - t0
        tr, lr = trainer.text_report, trainer.latent_report
        t0 = time.perf_counter()
        trainer.fill_caches()
        warm = time.perf_counter() - t0
        tw, lw = trainer.text_report, trainer.latent_report
        buckets = sorted({f"{s.plan.bucket[0]}x{s.plan.bucket[1]}" for s in trainer.index.samples})
        results.append(
            {
                "family": family,
                "image_size": size,
                "buckets": buckets,
                "cold_fill_s": cold,
                "text": {
                    "total": tr.total,
                    "encoded": tr.encoded,
                    "seconds": tr.seconds,
                    "prompts_per_s": tr.encoded / tr.seconds if tr.seconds else None,
                },
                "latents": {
                    "total": lr.total,
                    "encoded": lr.encoded,
                    "seconds": lr.seconds,
                    "images_per_s": lr.encoded / lr.seconds if lr.seconds else None,
                },
                "warm": {
                    "fill_s": warm,
                    "text_encoded": tw.encoded,
                    "text_reused": tw.reused,
                    "text_s": tw.seconds,
                    "latents_encoded": lw.encoded,
                    "latents_reused": lw.reused,
                    "latents_s": lw.seconds,
                },
            }
        )
        w = results[-1]["warm"]
        print(
            f"  {family} {size}x{size}: text {tr.encoded} prompts in {tr.seconds:.2f} s, "
            f"latents {lr.encoded} images in {lr.seconds:.2f} s; "
            f"warm fill {warm * 1e3:.0f} ms (encoded {w['text_encoded']}+{w['latents_encoded']})",
            flush=True,
        )
    return results


# --------------------------------------------------------------------------- report


def summary(res: dict) -> str:
    lines = []
    cfg, machine = res["config"], res["machine"]
    for o in res.get("overhead", {}).values():
        lines += [
            "",
            f"Loop overhead, {o['family']} ({o['flavour']}): x0 {o['shape']['x0']} "
            f"({o['visual_tokens']} visual tokens), text {o['shape']['text']}, {o['lora_parameters']} LoRA params, "
            f"{cfg['steps']} steps x {cfg['rounds']} rounds, {cfg['threads']} threads, "
            f"OMP_WAIT_POLICY={machine['omp_wait_policy']}; forwards agree to {o['forward_max_abs_diff']:.1g}",
            f"{'':8}{'median ms/step':>16}{'mean ms/step':>14}{'min ms/step':>13}{'cpu ms/step':>13}",
            *(
                f"{who:8}{o[who + '_median_s'] * 1e3:>16.2f}{o[who + '_mean_s'] * 1e3:>14.2f}"
                f"{o[who + '_min_s'] * 1e3:>13.2f}{o[who + '_cpu_median_s'] * 1e3:>13.2f}"
                for who in ("ours", "bare")
            ),
            f"ratio ours/bare: {o['ratio']:.3f}  (median over rounds of the median paired-block ratio, wall clock)",
            f"  also: process-CPU {o['ratio_cpu']:.3f}, ratio of medians {o['ratio_of_medians']:.3f}, "
            f"of means {o['ratio_of_means']:.3f}, of minima {o['ours_min_s'] / o['bare_min_s']:.3f}",
            f"  target <= {o['target']}: {'OK' if o['within_target'] else 'ABOVE TARGET'}",
        ]
        b = o.get("breakdown")
        if b:
            lines.append("Per-step breakdown, instrumented pass, loops alternating per step (median ms/step):")
            for who in ("ours", "bare"):
                parts = ", ".join(f"{k} {v:.2f}" for k, v in b[f"{who}_ms_per_step"].items())
                lines.append(f"  {who}: {parts}")
    if len(res.get("overhead", {})) > 1:
        lines += ["", f"{'family':18}{'ours ms':>9}{'bare ms':>9}{'ratio':>8}{'ratio cpu':>11}  rounds"]
        for o in res["overhead"].values():
            rounds = ", ".join(f"{r['ratio']:.3f}" for r in o["rounds"])
            lines.append(
                f"{o['family']:18}{o['ours_median_s'] * 1e3:>9.2f}{o['bare_median_s'] * 1e3:>9.2f}"
                f"{o['ratio']:>8.3f}{o['ratio_cpu']:>11.3f}  {rounds}"
            )
    c = [r for rows in res.get("caches", {}).values() for r in rows]
    if c:
        lines += [
            "",
            "Cache filling (fresh dirs; text time includes loading the text encoder, latents the VAE)",
            f"{'family':18}{'size':>9}{'prompts':>9}{'prompts/s':>11}{'images':>8}{'images/s':>10}{'cold s':>8}"
            f"{'warm ms':>9}{'(checks)':>10}{'warm enc':>10}",
        ]
        for r in c:
            lines.append(
                f"{r['family']:18}{r['image_size']:>5}x{r['image_size']:<3}{r['text']['encoded']:>9}"
                f"{r['text']['prompts_per_s']:>11.1f}{r['latents']['encoded']:>8}{r['latents']['images_per_s']:>10.1f}"
                f"{r['cold_fill_s']:>8.2f}{r['warm']['fill_s'] * 1e3:>9.0f}"
                f"{(r['warm']['text_s'] + r['warm']['latents_s']) * 1e3:>10.0f}"
                f"{r['warm']['text_encoded'] + r['warm']['latents_encoded']:>10}"
            )
        lines.append(
            "  warm ms = the whole second fill_caches(); (checks) = the two caches' own reports, the rest is outside "
            "them (the engine's own work around the two caches)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work dir (kept; the tiny model is reused); default a temp dir")
    p.add_argument("--steps", type=int, default=60, help="timed steps per loop per round")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before each timed run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and bare")
    p.add_argument("--block", type=int, default=1, help="steps per loop before switching to the other loop")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--family",
        nargs="+",
        choices=[*FAMILIES, "all"],
        default=["all"],
        help="families to measure, one after the other (default all: lumina2 kandinsky5-image kandinsky5-video)",
    )
    p.add_argument("--images", type=int, default=8, help="images in the overhead dataset (128x128)")
    p.add_argument("--clips", type=int, default=4, help="clips in the video overhead dataset")
    p.add_argument("--clip-frames", type=int, default=17, help="frames per clip (4k+1)")
    p.add_argument("--clip-size", type=int, default=96, help="short side of the 4:3 clips (px)")
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="our loop's gradient clipping (the bare loop never clips); 0 = off, the spec's default is 1.0",
    )
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the per-phase breakdown")
    p.add_argument("--cache-images", type=int, default=24, help="images per size for the cache benchmark")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="square image sizes for the cache bench")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-caches", action="store_true")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    families = list(FAMILIES) if "all" in args.family else list(dict.fromkeys(args.family))
    # The tiny byte-level Qwen tokenizer is cut by the K5 template crop and tiny sizes are outside
    # diffusers' K5 RoPE range: both warn once per run, which says nothing here.
    logging.getLogger("trainer_core").setLevel(logging.ERROR)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    res: dict = {
        "benchmark": "overhead",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-overhead-")))
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_overhead:
            res["overhead"] = {}
            for family in families:
                print(f"loop overhead, {family}:", flush=True)
                res["overhead"][family] = bench_overhead(work, args, family)
        image_families = [f for f in families if f != "kandinsky5-video"]
        if not args.skip_caches and image_families:
            res["caches"] = {}
            for family in image_families:
                print(f"cache filling, {family}:", flush=True)
                res["caches"][family] = bench_caches(work, args, family)
    res["wall_s"] = time.perf_counter() - start
    res["machine"]["load_average_at_end"] = os.getloadavg()
    print(summary(res))
    load = res["machine"]["load_average_at_start"][0], res["machine"]["load_average_at_end"][0]
    print(f"\ntotal {res['wall_s']:.0f} s; 1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
