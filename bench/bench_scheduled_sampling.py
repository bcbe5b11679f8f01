"""Scheduled sampling (rollout) on CPU: training step time with a rollout of k steps against none.

Runs the engine's own ``Trainer.train_step`` on the tiny, randomly initialised Kandinsky 5 T2V model
of ``trainer_core.testing.tiny`` (the real diffusers classes at toy widths) with one clip latent per
step (``--frames`` frames at ``--clip-size`` px, encoded once by the pre-pass). Configurations: off,
and a rollout of exactly k Euler steps at every step (probability 1) for each ``--offsets``, ReflexFlow
off (the rollout length is pinned to k, where a run with ``scheduled_sampling_max_step_offset`` k draws
1..k); and the same with ReflexFlow on (``k=N+rf``: one more no-grad pass, plus its loss terms) for
each ``--reflexflow-offsets``.

After ``--warmup`` untimed steps of each, ``--rounds`` rounds run one step of every configuration,
in an order that rotates every round. On a shared machine step times swing within seconds, so the
overhead reported is the median over rounds of the paired ratio (rollout step / plain step of the
same round); the median s/step of each configuration is printed too. The "ideal" column is
``1 + k * f / (f + b)``, the cost if a no-grad forward pass cost a forward ``f`` and a training
step cost a forward and a backward ``b = 2f``: ``1 + k/3``.

Usage::

    python bench/bench_scheduled_sampling.py                # about 30 s on 2 CPU cores
    python bench/bench_scheduled_sampling.py --offsets 1 2 4 8 --rounds 12 --out ss.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning (see bench_overhead.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_video import make_clips, make_spec  # noqa: E402

from trainer_core.spec import ScheduledSamplingSpec  # noqa: E402
from trainer_core.testing.tiny import build_tiny_kandinsky5_video  # noqa: E402
from trainer_core.train.engine import Trainer  # noqa: E402
from trainer_core.train.scheduled_sampling import ScheduledSampling  # noqa: E402


class PinnedRollout(ScheduledSampling):
    """Every micro-batch rolls out exactly ``k`` steps (the engine's code path, without the draw)."""

    def __init__(self, k: int, trainer: Trainer, reflexflow: bool = False) -> None:
        spec = ScheduledSamplingSpec(
            scheduled_sampling_max_step_offset=k,
            scheduled_sampling_probability=1.0,
            scheduled_sampling_reflexflow=reflexflow,
        )
        super().__init__(spec, trainer.family)
        self.k = k

    def offset(self, step: int, seed: int) -> int:
        return self.k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work dir (kept; model and clips are reused); default a temp dir")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--offsets", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reflexflow-offsets", type=int, nargs="*", default=[2], help="also these with ReflexFlow on")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (4k+1)")
    p.add_argument("--clip-size", type=int, default=128, help="short side of the clip (px); it is 4:3")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of every configuration each)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.getLogger("trainer_core").setLevel(logging.ERROR)  # the tiny tokenizer's crop warnings
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ss-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model" / "tiny-kandinsky5-t2v"
    if not (model / "model_index.json").exists():
        model = build_tiny_kandinsky5_video(work / "model")
    width = args.clip_size * 4 // 3 // 16 * 16
    data = make_clips(work / "clips", 1, args.frames, (width, args.clip_size))
    spec = make_spec(model, data, work / "run", size=args.clip_size, frames=args.frames, flavour="t2v-lite-sft-5s")
    trainer = Trainer(spec)
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()

    configs: dict[str, ScheduledSampling | None] = {"off": None}
    configs.update({f"k={k}": PinnedRollout(k, trainer) for k in args.offsets})
    configs.update({f"k={k}+rf": PinnedRollout(k, trainer, reflexflow=True) for k in args.reflexflow_offsets})
    names = list(configs)
    step = 0

    def one_step(name: str) -> float:
        nonlocal step
        trainer.rollout = configs[name]
        t0 = time.perf_counter()
        trainer.train_step(step, 1)
        step += 1
        return time.perf_counter() - t0

    for name in names:
        for _ in range(args.warmup):
            one_step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(one_step(name))

    x0 = trainer.batches.build([0], torch.Generator()).x0
    rows = []
    for name in names:
        k = 0 if name == "off" else int(name.split("=")[1].removesuffix("+rf")) + name.endswith("+rf")
        ratios = [t / off for t, off in zip(times[name], times["off"])]
        rows.append(
            {
                "config": name,
                "rollout_passes": k,
                "median_s_per_step": statistics.median(times[name]),
                "overhead_x": statistics.median(ratios),
                "ideal_x": 1 + k / 3,
            }
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads, "load": load},
        "torch": torch.__version__,
        "latent_shape": list(x0.shape),
        "tokens": trainer.family.image_seq_len(x0),
        "rounds": args.rounds,
        "rows": rows,
    }
    print(
        f"tiny K5 T2V, latent {list(x0.shape)} ({results['tokens']} tokens), {args.rounds} rounds, "
        f"{args.threads} threads, load {load}"
    )
    print(f"{'config':<10}{'passes':>8}{'s/step':>10}{'x off':>8}{'ideal':>8}")
    for row in rows:
        print(
            f"{row['config']:<10}{row['rollout_passes']:>8}{row['median_s_per_step']:>10.4f}"
            f"{row['overhead_x']:>8.2f}{row['ideal_x']:>8.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
