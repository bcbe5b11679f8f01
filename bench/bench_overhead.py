"""Overhead of our training loop against a bare torch loop, and cache-encoding throughput.

Runs entirely offline on the tiny, randomly initialised Lumina 2 of ``trainer_core.testing.tiny``.

1. Loop overhead: ``Trainer.train_step`` versus a hand-written loop doing the same forward,
   backward and AdamW step on a second copy of the same transformer with the same LoRA, on the
   same latents and text embeddings (preloaded as tensors) and the same shapes. The two loops
   alternate every ``--block`` steps (ABBA order across rounds) so drift on a busy machine hits
   both alike; each block pair gives a ratio ours / bare, a round's ratio is the median of those,
   and the reported ratio is the median over rounds. Target: <= 1.05. Wall and process-CPU time
   are both recorded. OMP_WAIT_POLICY defaults to PASSIVE (see below) unless set.
2. A per-phase breakdown of both loops (separate, instrumented pass; not used for the ratio).
3. Cache filling: text encoding (prompts/s) and latent encoding (images/s) into fresh cache dirs
   at 128x128 and 256x256, then a second ``fill_caches()`` on the warm cache.

Usage::

    python bench/bench_overhead.py                  # about 1-2 minutes on 2 CPU cores
    python bench/bench_overhead.py --steps 100 --rounds 5 --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer_core.demo import COLOURS, SHAPES, draw_shape  # noqa: E402
from trainer_core.lora.adapters import add_lora, lora_config  # noqa: E402
from trainer_core.spec import TrainSpec  # noqa: E402
from trainer_core.testing.tiny import build_tiny_lumina2  # noqa: E402
from trainer_core.train.engine import Trainer  # noqa: E402

SEED = 11


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
) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "output_dir": str(out),
            "model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(model)},
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
                {
                    "id": "bench",
                    "instance_data_dir": str(data),
                    "caption_strategy": "textfile",
                    "resolution": resolution,
                    "resolution_type": "pixel_area",
                    "cache_dir_vae": str(vae_cache),
                },
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(text_cache)},
            ],
        }
    )


def tiny_model(work: Path) -> Path:
    model = work / "model" / "tiny-lumina2"
    if not (model / "model_index.json").exists():
        model = build_tiny_lumina2(work / "model")
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
    """The same model, LoRA, data and shapes in a plain torch loop."""

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
            self.data.append((x0, text["prompt_embeds"].contiguous(), text["prompt_attention_mask"].contiguous()))
        self.i = 0

    def shapes(self) -> set[tuple]:
        return {(tuple(x.shape), tuple(e.shape), tuple(m.shape)) for x, e, m in self.data}

    def step(self, timer: dict[str, float] | None = None) -> float:
        x0, emb, mask = self.data[self.i % len(self.data)]
        self.i += 1
        t0 = time.perf_counter()
        s = torch.rand(x0.shape[0])
        noise = torch.randn_like(x0)
        sv = s.view(-1, 1, 1, 1)
        noisy = (1 - sv) * x0 + sv * noise
        t1 = time.perf_counter()
        pred = self.transformer(
            hidden_states=noisy,
            timestep=1 - s,
            encoder_hidden_states=emb,
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, x0 - noise)
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


def bench_overhead(work: Path, args: argparse.Namespace) -> dict:
    model = tiny_model(work)
    data = make_dataset(work / "overhead" / "data", args.images, (128, 128))
    out = work / "overhead" / "run"
    shutil.rmtree(out, ignore_errors=True)
    spec = make_spec(
        model,
        data,
        out,
        resolution=128,
        rank=args.rank,
        max_grad_norm=args.max_grad_norm,
        steps=10_000,
        text_cache=out / "cache" / "text",
        vae_cache=out / "cache" / "vae",
    )
    trainer = Trainer(spec, device="cpu")
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    ours, bare = Ours(trainer), Bare(trainer)

    shapes = bare.shapes()
    if len(shapes) != 1:
        raise SystemExit(f"benchmark dataset does not give one fixed shape: {shapes}")
    probe = trainer.batches.build(trainer.sampler.batches_for_epoch(0)[0], torch.Generator().manual_seed(0))
    ours_shape = (tuple(probe.x0.shape), tuple(probe.text["prompt_embeds"].shape))
    if ours_shape != next(iter(shapes))[:2]:
        raise SystemExit(f"shapes differ: ours {ours_shape}, bare {shapes}")
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
        "shape": {"x0": list(ours_shape[0]), "text": list(ours_shape[1])},
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


def bench_caches(work: Path, args: argparse.Namespace) -> list[dict]:
    model = tiny_model(work)
    results = []
    for size in args.sizes:
        base = work / f"cache-{size}"
        shutil.rmtree(base, ignore_errors=True)  # fresh cache dirs
        data = make_dataset(base / "data", args.cache_images, (size, size))
        spec = make_spec(
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
            f"  {size}x{size}: text {tr.encoded} prompts in {tr.seconds:.2f} s, latents {lr.encoded} images in "
            f"{lr.seconds:.2f} s; warm fill {warm * 1e3:.0f} ms (encoded {w['text_encoded']}+{w['latents_encoded']})",
            flush=True,
        )
    return results


# --------------------------------------------------------------------------- report


def summary(res: dict) -> str:
    lines = []
    o = res.get("overhead")
    if o:
        lines += [
            "",
            f"Loop overhead (x0 {o['shape']['x0']}, text {o['shape']['text']}, {o['lora_parameters']} LoRA params, "
            f"{res['config']['steps']} steps x {res['config']['rounds']} rounds, {res['config']['threads']} threads, "
            f"OMP_WAIT_POLICY={res['machine']['omp_wait_policy']})",
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
    c = res.get("caches")
    if c:
        lines += [
            "",
            "Cache filling (fresh dirs; text time includes loading the text encoder, latents the VAE)",
            f"{'size':>9}{'prompts':>9}{'prompts/s':>11}{'images':>8}{'images/s':>10}{'cold s':>8}{'warm ms':>9}"
            f"{'(checks)':>10}{'warm enc':>10}",
        ]
        for r in c:
            lines.append(
                f"{r['image_size']:>5}x{r['image_size']:<3}{r['text']['encoded']:>9}{r['text']['prompts_per_s']:>11.1f}"
                f"{r['latents']['encoded']:>8}{r['latents']['images_per_s']:>10.1f}{r['cold_fill_s']:>8.2f}"
                f"{r['warm']['fill_s'] * 1e3:>9.0f}{(r['warm']['text_s'] + r['warm']['latents_s']) * 1e3:>10.0f}"
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
    p.add_argument("--images", type=int, default=8, help="images in the overhead dataset (128x128)")
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
            print("loop overhead:", flush=True)
            res["overhead"] = bench_overhead(work, args)
        if not args.skip_caches:
            print("cache filling:", flush=True)
            res["caches"] = bench_caches(work, args)
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
