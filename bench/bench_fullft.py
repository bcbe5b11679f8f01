"""Full fine-tune against LoRA on the tiny models: step time, peak memory of a step, peak RSS.

The engines, dataset, spec and measures of ``bench_adapters.py`` (imported, not copied): fp32 on the
CPU, batch 1, AdamW, no clipping, validation or checkpoints. Variants, one real engine each
(``Trainer(spec)``, ``prepare()``, ``fill_caches()``, ``build_model()``):

- ``lora-r16``: PEFT LoRA rank 16 on the family's default targets (the baseline);
- ``full``: ``model_type full`` (every transformer weight trains; AdamW: fp32 weights and moments);
- ``full+ema``: the same with ``use_ema`` (EMA on the training device: on the CPU both are RAM).

Measured:

1. Step time: ``bench_adapters.time_steps`` (interleaved blocks, median of paired ratios against
   ``lora-r16``).
2. Peak memory of one step: ``bench_adapters.step_memory`` (torch's CPU allocator peak via
   ``torch.profiler`` plus what was alive before the step; the ``LiveBytes`` tracker's split by kind).
3. Peak RSS of the whole process: each variant again in a child process of its own (``--child``),
   which builds the engine and runs ``--rss-steps`` steps, then reports ``VmHWM`` (Linux's high-water
   RSS, reset at exec; ``ru_maxrss`` would carry the parent's peak over). Torch's own
   ~380 MiB dominates this on tiny models; the difference between variants is the figure to read.

Usage::

    python bench/bench_fullft.py                          # Lumina 2, about a minute on 2 CPU cores
    python bench/bench_fullft.py --family lumina2 kandinsky5-image --out fullft.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see bench_overhead.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapters as ba  # noqa: E402

from trainer_core.spec import TrainSpec  # noqa: E402
from trainer_core.train.engine import Trainer  # noqa: E402

FAMILIES = ("lumina2", "kandinsky5-image", "kandinsky5-video")
LORA = {"lora_rank": 16, "lora_alpha": 16}
VARIANTS: dict[str, dict] = {
    "lora-r16": {},
    "full": {"model": {"model_type": "full"}},
    "full+ema": {"model": {"model_type": "full"}, "training": {"use_ema": True, "ema_device": "accelerator"}},
}


def variant_spec(work: Path, family: str, name: str, args: argparse.Namespace) -> TrainSpec:
    raw = ba.adapter_spec(work, family, name, LORA, args).model_dump(mode="json")
    for section, values in VARIANTS[name].items():
        raw[section].update(values)
    return TrainSpec.model_validate(raw)


def build(work: Path, family: str, name: str, args: argparse.Namespace) -> Trainer:
    trainer = Trainer(variant_spec(work, family, name, args), device=args.device)
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    return trainer


def child(args: argparse.Namespace) -> int:
    """One variant in this process only: build, ``--rss-steps`` steps, print the peak RSS as JSON."""
    from bench_memory import vm_hwm  # VmHWM is reset at exec (ru_maxrss would carry the parent's peak over)

    torch.set_num_threads(args.threads)
    logging.getLogger("trainer_core").setLevel(logging.ERROR)
    family, name = args.child
    trainer = build(args.work, family, name, args)
    built = vm_hwm()
    loop = ba.Loop(name, trainer)
    loop.run(args.rss_steps)
    print(json.dumps({"peak_rss_after_build": built, "peak_rss": vm_hwm()}), flush=True)
    return 0


def rss_in_child(work: Path, family: str, name: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        family,
        name,
        "--work",
        str(work),
        "--threads",
        str(args.threads),
        "--rss-steps",
        str(args.rss_steps),
        "--device",
        args.device,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resident_tensors(trainer: Trainer):
    """bench_adapters' resident tensors plus the EMA shadow (kind ``ema``)."""
    yield from _adapter_resident_tensors(trainer)
    if trainer.ema is not None:
        for t in trainer.ema.shadow_params():
            yield t, "ema"


_adapter_resident_tensors = ba.resident_tensors
ba.resident_tensors = resident_tensors  # step_memory registers what is alive before the step through it


def bench_family(work: Path, family: str, args: argparse.Namespace) -> dict:
    loops = []
    out: dict = {"variants": {}}
    for name in VARIANTS:
        trainer = build(work, family, name, args)
        loops.append(ba.Loop(name, trainer))
        out["variants"][name] = {
            "trainable_parameters": ba.n_params(trainer),
            "transformer_parameters": sum(p.numel() for p in trainer.transformer.parameters()),
        }
    times = ba.time_steps(loops, args)
    for lp in loops:
        v = out["variants"][lp.name]
        v.update(times[lp.name])
        v["optimizer_state_bytes"] = ba.optimizer_state_bytes(lp.trainer)
        v["ema_bytes"] = lp.trainer.ema.nbytes() if lp.trainer.ema is not None else 0
        v["memory"] = ba.step_memory(lp)
    del loops
    for name in VARIANTS:  # fresh processes: ru_maxrss never goes down
        out["variants"][name]["rss"] = rss_in_child(work, family, name, args)
    return out


def summary(res: dict) -> str:
    lines = []
    for family, fam in res["families"].items():
        lines.append(f"{family}:")
        lines.append(
            f"  {'variant':10}{'trainable':>12}{'step ms':>9}{'ratio':>7}{'resident MiB':>14}{'peak MiB':>10}"
            f"{'(tracker)':>10}{'optim MiB':>10}{'EMA MiB':>9}{'peak RSS MiB':>14}"
        )
        for name, v in fam["variants"].items():
            m = v["memory"]
            tracker = m.get("tracker_peak_bytes")
            lines.append(
                f"  {name:10}{v['trainable_parameters']:>12,}{v['median_s'] * 1e3:>9.1f}{v['ratio']:>7.2f}"
                f"{m['resident_bytes'] / 2**20:>14.2f}{m['peak_bytes'] / 2**20:>10.2f}"
                f"{(tracker or 0) / 2**20:>10.2f}{v['optimizer_state_bytes'] / 2**20:>10.2f}"
                f"{v['ema_bytes'] / 2**20:>9.2f}{v['rss']['peak_rss'] / 2**20:>14.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work dir (kept; models, data and caches are reused); default a temp dir")
    p.add_argument("--family", nargs="+", choices=FAMILIES, default=["lumina2"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rss-steps", type=int, default=5, help="steps of each variant in its own process (peak RSS)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--clip-frames", type=int, default=17)
    p.add_argument("--clip-size", type=int, default=96)
    p.add_argument("--child", nargs=2, metavar=("FAMILY", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    logging.getLogger("trainer_core").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    res: dict = {
        "benchmark": "fullft",
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
        "families": {},
    }
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fullft-")))
        work.mkdir(parents=True, exist_ok=True)
        args.work = work
        for family in args.family:
            print(f"full fine-tune vs LoRA, {family}:", flush=True)
            res["families"][family] = bench_family(work, family, args)
    res["machine"]["load_average_at_end"] = os.getloadavg()
    res["seconds"] = time.perf_counter() - start
    print(summary(res))
    print(
        f"load average {res['machine']['load_average_at_start']} -> {res['machine']['load_average_at_end']}; "
        f"{res['seconds']:.0f} s",
        flush=True,
    )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
