"""What report_to costs: the same tiny Lumina 2 run with no tracker, TensorBoard and offline wandb.

Each variant trains the same steps (with validation images every ``--validate-every`` steps, so
the image logging is in it) from warm caches, ``--repeats`` times in alternating order. Reported
per variant: the median wall time of ``Trainer.run`` and the time spent inside the trackers
themselves (start, per-step logging, images, close), which is the overhead that does not depend
on the machine's noise. wandb runs with ``WANDB_MODE=offline`` into a scratch folder: nothing is
sent anywhere.

    python bench/bench_tracking.py --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--validate-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="none,tensorboard,wandb")
    args = p.parse_args()

    import torch
    from helpers.datasets import lumina_spec, write_dataset

    from trainer_core import tracking
    from trainer_core.events import ListSink
    from trainer_core.spec import TrainSpec
    from trainer_core.testing.tiny import build_tiny_lumina2
    from trainer_core.train.engine import Trainer

    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    os.environ.update({"WANDB_MODE": "offline", "WANDB_DIR": str(scratch), "WANDB_SILENT": "true"})
    model = build_tiny_lumina2(scratch / "model")
    data = write_dataset(scratch / "data", {"a": "a red circle", "b": "a blue circle"})
    variants = args.variants.split(",")

    # the trackers' own time: every call of a tracker method, summed
    spent = {"t": 0.0}
    for cls in tracking.TRACKER_CLASSES.values():
        for name in ("start", "resumed", "metrics", "media", "close"):
            original = getattr(cls, name)

            def timed(self, *a, _original=original, **k):
                t0 = time.perf_counter()
                try:
                    return _original(self, *a, **k)
                finally:
                    spent["t"] += time.perf_counter() - t0

            setattr(cls, name, timed)

    def run(variant: str, index: int) -> tuple[float, float]:
        out = scratch / f"{variant}-{index}"
        spec = TrainSpec.model_validate(
            lumina_spec(
                model,
                data,
                out,
                training={"max_train_steps": args.steps},
                checkpointing={"checkpoint_step_interval": None},
                validation={
                    "validation_disable": False,
                    "validation_prompt": "a red circle",
                    "validation_resolution": "64x64",
                    "validation_num_inference_steps": 1,
                    "validation_disable_unconditional": True,
                    "validation_step_interval": args.validate_every,
                },
                tracking={"report_to": variant},
                datasets=[
                    {
                        "id": "d",
                        "instance_data_dir": str(data),
                        "resolution": 64,
                        "resolution_type": "pixel_area",
                        "cache_dir_vae": str(scratch / "vae-cache"),
                    },
                    {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(scratch / "text")},
                ],
            )
        )
        spent["t"] = 0.0
        t0 = time.perf_counter()
        with tracking.tracked(spec, ListSink()) as events:
            Trainer(spec, events).run()
        return time.perf_counter() - t0, spent["t"]

    run("none", -1)  # fills the caches and warms the imports
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else reversed(variants):
            results[v].append(run(v, r))
    print(f"tiny Lumina 2, {args.steps} steps, validation every {args.validate_every} (CPU, 1 thread)")
    print(f"{'report_to':<12}{'run s (median)':>16}{'in trackers s':>16}")
    base = statistics.median(w for w, _ in results[variants[0]])
    for v, rows in results.items():
        wall = statistics.median(w for w, _ in rows)
        inside = statistics.median(t for _, t in rows)
        print(f"{v:<12}{wall:>16.2f}{inside:>16.3f}   ({wall - base:+.2f} s vs {variants[0]})")


if __name__ == "__main__":
    main()
