"""Kandinsky 5 video on CPU: clip decoding and latent caching, patch-conv memory, training step time.

Runs offline on the tiny, randomly initialised K5 video model of ``trainer_core.testing.tiny`` (the
real diffusers classes at toy widths: an 8-channel HunyuanVideo VAE, a 2-block DiT). Clips are
encoded with PyAV into the work dir first.

1. Caching throughput: discovery (probe) of ``--clips`` clips, then decoding them to pixels
   (``load_pixels``: PyAV decode + resize/crop), then ``LatentCache.ensure`` (decode + VAE encode +
   write) into a fresh cache; frames per second for each.
2. VAE memory on one ``--vae-size`` clip (default 256x256, 33 frames): peak CPU memory held by torch
   tensors (allocations recorded by the profiler, kernel workspaces included) and wall time (a
   second run, without the profiler) of an encode and a decode, for: plain, diffusers tiling alone,
   our patch conv alone, and both. The tiny VAE only has 8 channels, so tiles are set to 128 px
   (stride 96, the same 3/4 overlap as diffusers' 256/192 defaults; at the defaults a 256 px clip
   is not tiled at all). Each is also compared with the plain output (patch conv is exact; tiling
   blends seams).
3. Training step time (median seconds per ``Trainer.train_step``) for T2V and I2V at the clip size.
4. Where latents come from (``--skip-latent-modes`` to skip): the usual pre-pass, ``vae_cache_ondemand``
   (a first run with an empty cache, then a rerun that finds it full) and ``vae_cache_disable``. For
   each: seconds until the first step is done (caching, model load, step 1), median s/step over the
   first epoch (where on-demand encodes) and the second (where only "disable" still encodes), bytes
   written to the latent cache and bytes of VAE kept loaded while training.

Usage::

    python bench/bench_video.py                 # about 1-2 minutes on 2 CPU cores
    python bench/bench_video.py --out video.json --threads 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning (see bench_overhead.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer_core.cache.latents import LatentCache  # noqa: E402
from trainer_core.data import discover, load_pixels  # noqa: E402
from trainer_core.events import ListSink  # noqa: E402
from trainer_core.families import get_family_class  # noqa: E402
from trainer_core.memory.patch_conv import disable_patch_conv, enable_patch_conv  # noqa: E402
from trainer_core.spec import TrainSpec  # noqa: E402
from trainer_core.testing.tiny import build_tiny_kandinsky5_video, make_hunyuan_video_vae  # noqa: E402
from trainer_core.train.engine import Trainer  # noqa: E402

MiB = 2**20


# --------------------------------------------------------------------------- data and spec
def write_clip(path: Path, frames: int, size: tuple[int, int], seed: int, fps: int = 24) -> Path:
    """A textured square moving over noise: costs the decoder about what real footage does."""
    import av

    rng = np.random.default_rng(seed)
    w, h = size
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            arr = np.roll(base, 3 * i, axis=1)
            arr[h // 4 : h // 2, (5 * i) % (w // 2) : (5 * i) % (w // 2) + w // 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_clips(folder: Path, count: int, frames: int, size: tuple[int, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if not (folder / f"clip_{i:03d}.mp4").exists():
            write_clip(folder / f"clip_{i:03d}.mp4", frames, size, seed=i)
        (folder / f"clip_{i:03d}.txt").write_text(f"bench clip {i:03d}, a square moving over noise\n")
    return folder


def make_spec(model: Path, data: Path, out: Path, *, size: int, frames: int, flavour: str, **memory) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "output_dir": str(out),
            "model": {
                "model_family": "kandinsky5-video",
                "model_flavour": flavour,
                "pretrained_model_name_or_path": str(model),
            },
            "lora": {"lora_rank": 16, "lora_alpha": 16},
            "optimizer": {"optimizer": "adamw", "learning_rate": 1e-4},
            "training": {
                "max_train_steps": 1000,
                "mixed_precision": "no",
                "base_model_default_dtype": "fp32",
                "gradient_checkpointing": False,
                "vae_batch_size": 1,
                "seed": 0,
            },
            "memory": memory,
            "checkpointing": {"checkpoint_step_interval": None},
            "validation": {"validation_disable": True},
            "datasets": [
                {
                    "id": "clips",
                    "dataset_type": "video",
                    "instance_data_dir": str(data),
                    "resolution": size,
                    "resolution_type": "pixel",
                    "video": {"num_frames": frames},
                },
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(out / "text")},
            ],
        }
    )


# --------------------------------------------------------------------------- 1. caching
def bench_caching(model: Path, data: Path, work: Path, args: argparse.Namespace) -> dict:
    spec = make_spec(
        model, data, work / "cache-run", size=args.clip_size, frames=args.frames, flavour="t2v-lite-sft-5s"
    )
    family = get_family_class("kandinsky5-video")(spec)
    t0 = time.perf_counter()
    index = discover(spec, 16, frame_rule=family.frame_rule)
    t_probe = time.perf_counter() - t0
    frames = sum(s.frames.count for s in index.samples if s.frames)
    t0 = time.perf_counter()
    for sample in index.samples:
        load_pixels(sample)
    t_decode = time.perf_counter() - t0
    cache_root = work / "cache-run" / "vae"
    shutil.rmtree(cache_root, ignore_errors=True)
    cache = LatentCache({"clips": cache_root}, family)
    t0 = time.perf_counter()
    report = cache.ensure(index.samples, lambda: family.load_vae(torch.device("cpu"), torch.float32), batch_size=1)
    t_cache = time.perf_counter() - t0
    return {
        "clips": len(index.samples),
        "frames": frames,
        "size": list(index.samples[0].plan.bucket),
        "probe_s": t_probe,
        "decode_s": t_decode,
        "decode_frames_per_s": frames / t_decode,
        "cache_s": t_cache,
        "cache_frames_per_s": frames / t_cache,
        "encoded": report.encoded,
    }


# --------------------------------------------------------------------------- 2. VAE memory
def peak_bytes(fn) -> tuple[int, float, object]:
    """(peak bytes held by torch allocations, wall seconds, result) of ``fn()``, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return peak, seconds, result


def bench_vae_memory(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    vae = make_hunyuan_video_vae()
    side, frames = args.vae_size, args.vae_frames
    clip = torch.rand(1, 3, frames, side, side) * 2 - 1
    z = torch.randn(1, 16, (frames - 1) // 4 + 1, side // 8, side // 8)
    configs = [
        ("plain", False, False),
        ("tiling", True, False),
        ("patch_conv", False, True),
        ("tiling+patch", True, True),
    ]
    rows = []
    reference: dict[str, torch.Tensor] = {}
    for name, tiling, patch in configs:
        vae.use_tiling = False
        disable_patch_conv(vae)
        if tiling:
            vae.enable_tiling(
                tile_sample_min_height=128,
                tile_sample_min_width=128,
                tile_sample_stride_height=96,
                tile_sample_stride_width=96,
            )
        if patch:
            enable_patch_conv(vae, budget_bytes=args.budget_mib * MiB)
        row = {"config": name}
        with torch.no_grad():
            for what, fn in (
                ("encode", lambda: vae.encode(clip).latent_dist.mean),
                ("decode", lambda: vae.decode(z).sample),
            ):
                peak, _, out = peak_bytes(fn)
                # timed again without the profiler: recording every allocation slows the many small
                # ops of tiling far more than the few big ones of the plain pass
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
                reference.setdefault(what, out)
                row[f"{what}_peak_mib"] = peak / MiB
                row[f"{what}_s"] = seconds
                row[f"{what}_max_abs_diff"] = float((out - reference[what]).abs().max())
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- 3. training steps
def bench_steps(model: Path, data: Path, work: Path, args: argparse.Namespace, flavour: str) -> dict:
    out = work / f"steps-{flavour}"
    shutil.rmtree(out, ignore_errors=True)
    spec = make_spec(model, data, out, size=args.clip_size, frames=args.frames, flavour=flavour)
    trainer = Trainer(spec)
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    for step in range(args.warmup):
        trainer.train_step(step, 1)
    times = []
    for step in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.train_step(step, 1)
        times.append(time.perf_counter() - t0)
    x0 = trainer.batches.build([0], torch.Generator()).x0
    return {
        "flavour": flavour,
        "latent_shape": list(x0.shape),
        "tokens": trainer.family.image_seq_len(x0),
        "median_s_per_step": statistics.median(times),
        "min_s_per_step": min(times),
    }


# --------------------------------------------------------------------------- 4. latent modes
LATENT_MODES = {
    "pre-pass": {},
    "ondemand (empty cache)": {"vae_cache_ondemand": True},
    "ondemand (full cache)": {"vae_cache_ondemand": True},
    "disable": {"vae_cache_disable": True},
}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def bench_latent_modes(model: Path, data: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """Two epochs of ``--clips`` clips (batch 1) per mode; the on-demand rerun reuses the first run's cache."""
    rows = []
    vae_dir = work / "latent-modes" / "vae"
    for mode, memory in LATENT_MODES.items():
        out = work / "latent-modes" / mode.split()[0]
        shutil.rmtree(out, ignore_errors=True)
        if mode != "ondemand (full cache)":
            shutil.rmtree(vae_dir, ignore_errors=True)
        spec = make_spec(model, data, out, size=args.clip_size, frames=args.frames, flavour="t2v-lite-sft-5s", **memory)
        spec.datasets[0].cache_dir_vae = str(vae_dir)
        sink = ListSink()
        t0 = time.perf_counter()
        trainer = Trainer(spec, sink)
        trainer.prepare()
        trainer.fill_caches()
        trainer.build_model()
        times = []
        for step in range(2 * args.clips):
            t_step = time.perf_counter()
            trainer.train_step(step, 1)
            times.append(time.perf_counter() - t_step)
            if step == 0:
                first_step_s = time.perf_counter() - t0
        report = next(e for e in sink.of("memory") if e.get("stage") == "training")
        rows.append(
            {
                "mode": mode,
                "first_step_s": first_step_s,
                "epoch1_median_s_per_step": statistics.median(times[: args.clips]),
                "epoch2_median_s_per_step": statistics.median(times[args.clips :]),
                "cache_bytes": folder_bytes(vae_dir),
                "vae_bytes_while_training": report["vae_bytes"],
            }
        )
        del trainer
    return rows


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work dir (kept; model and clips are reused); default a temp dir")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--clips", type=int, default=8, help="clips for the caching and step benchmarks")
    p.add_argument("--frames", type=int, default=33, help="frames per clip (4k+1)")
    p.add_argument("--clip-size", type=int, default=128, help="short side of the clips (px); they are 4:3")
    p.add_argument("--vae-size", type=int, default=256, help="side of the square clip for the VAE memory bench")
    p.add_argument("--vae-frames", type=int, default=33)
    p.add_argument("--budget-mib", type=float, default=8.0, help="patch-conv slab budget in MiB")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per flavour")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-caching", action="store_true")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--skip-latent-modes", action="store_true")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    # The tiny byte-level tokenizer cuts every caption (the template crop is calibrated to real Qwen
    # tokens) and 128 px is outside diffusers' RoPE range: both warn once per run, which says nothing here.
    logging.getLogger("trainer_core").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-video-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model" / "tiny-kandinsky5-t2v"
    if not (model / "model_index.json").exists():
        model = build_tiny_kandinsky5_video(work / "model")
    width = args.clip_size * 4 // 3 // 16 * 16
    data = make_clips(work / "clips", args.clips, args.frames, (width, args.clip_size))
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "torch": torch.__version__,
    }
    if not args.skip_caching:
        c = results["caching"] = bench_caching(model, data, work, args)
        print(
            f"caching {c['clips']} clips of {args.frames} frames at {c['size'][0]}x{c['size'][1]}: "
            f"probe {c['probe_s']:.2f} s, decode {c['decode_frames_per_s']:.0f} frames/s, "
            f"decode+encode+write {c['cache_frames_per_s']:.1f} frames/s"
        )
    if not args.skip_vae:
        rows = results["vae_memory"] = bench_vae_memory(args)
        print(
            f"\nVAE on a {args.vae_size}x{args.vae_size}x{args.vae_frames} clip (patch budget {args.budget_mib} MiB):"
        )
        header = ("config", "enc peak MiB", "enc s", "enc diff", "dec peak MiB", "dec s", "dec diff")
        print("".join(f"{h:<14}" if i == 0 else f"{h:>13}" for i, h in enumerate(header)))
        for r in rows:
            print(
                f"{r['config']:<14}{r['encode_peak_mib']:>13.1f}{r['encode_s']:>13.2f}{r['encode_max_abs_diff']:>13.2g}"
                f"{r['decode_peak_mib']:>13.1f}{r['decode_s']:>13.2f}{r['decode_max_abs_diff']:>13.2g}"
            )
    if not args.skip_steps:
        results["steps"] = [bench_steps(model, data, work, args, f) for f in ("t2v-lite-sft-5s", "i2v-lite-5s")]
        print()
        for s in results["steps"]:
            print(
                f"train step {s['flavour']}: latents {s['latent_shape']} ({s['tokens']} tokens), "
                f"median {s['median_s_per_step'] * 1000:.1f} ms, min {s['min_s_per_step'] * 1000:.1f} ms"
            )
    if not args.skip_latent_modes:
        rows = results["latent_modes"] = bench_latent_modes(model, data, work, args)
        print(f"\nlatents for {args.clips} clips, 2 epochs of batch 1:")
        header = ("mode", "first step s", "epoch 1 s/step", "epoch 2 s/step", "cache MiB", "VAE MiB kept")
        print("".join(f"{h:<24}" if i == 0 else f"{h:>15}" for i, h in enumerate(header)))
        for r in rows:
            print(
                f"{r['mode']:<24}{r['first_step_s']:>15.2f}{r['epoch1_median_s_per_step']:>15.3f}"
                f"{r['epoch2_median_s_per_step']:>15.3f}{r['cache_bytes'] / MiB:>15.2f}"
                f"{r['vae_bytes_while_training'] / MiB:>15.2f}"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
