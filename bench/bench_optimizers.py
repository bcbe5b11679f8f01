"""Optimizer state bytes and step time of a tiny full fine-tune, per optimizer.

A randomly initialised Lumina 2 transformer (diffusers' ``Lumina2Transformer2DModel``, ``--width``
wide, 2 layers + 1 refiner layer, every weight trained) takes full fine-tune steps on random
16x32x32 latents and an 8-token caption: forward, MSE to a random target, backward, the optimizer
built by ``trainer_core.train.optim.build_optimizer`` exactly as the trainer builds it, zero_grad.

Per optimizer:

- *state B/param*: bytes of optimizer state per trained weight (``lowmem_optim.state_bytes``:
  torchao's quantized state counted by its codes, scales and lookup tables);
- *weights+state B/param*: that plus the weights themselves. Optimizers that keep bf16 weights
  exactly (``adamw_bf16``: stochastic rounding; ``optimi-*``: Kahan summation) train bf16 weights
  here; every other optimizer trains fp32 weights, as the trainer's fp32 master weights;
- *first step*: the first step's time (torchao compiles its step there);
- *step ms*: median of ``--steps`` steps after two warm-up steps, optimizers interleaved round by
  round so that drift on a busy machine hits them alike.

Gradients (4 bytes per fp32 weight, 2 per bf16) and activations are the same for every optimizer
of one weight dtype and are not counted. Optimizers whose package is missing are skipped.

Usage::

    python bench/bench_optimizers.py                      # ~1-2 minutes on 2 CPU cores
    python bench/bench_optimizers.py --width 512 --steps 10 --out optimizers.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer_core.errors import ConfigError  # noqa: E402
from trainer_core.spec import OptimizerSpec  # noqa: E402
from trainer_core.train.lowmem_optim import check_available, keeps_low_precision_weights, state_bytes  # noqa: E402
from trainer_core.train.optim import build_optimizer  # noqa: E402

DEFAULT = [
    "adamw",
    "adamw_bf16",
    "lion",
    "ao-adamw8bit",
    "ao-adamw4bit",
    "ao-adamfp8",
    "ao-adamwfp8",
    "optimi-adamw",
    "optimi-lion",
    "bnb-adamw8bit",
    "bnb-lion8bit",
]


def build_model(width: int, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import Lumina2Transformer2DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its note on casting with .to() (nothing here must stay fp32)
    torch.manual_seed(0)
    heads = max(1, width // 64)
    model = Lumina2Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        hidden_size=width,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=heads,
        num_kv_heads=heads,
        multiple_of=16,
        norm_eps=1e-5,
        axes_dim_rope=(width // heads // 4, width // heads * 3 // 8, width // heads * 3 // 8),
        axes_lens=(300, 64, 64),
        cap_feat_dim=64,
    )
    return model.to(dtype).train()


def inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 32, 32, generator=g).to(dtype)
    cap = torch.randn(1, 8, 64, generator=g).to(dtype)
    return x, torch.tensor([0.5]), cap, torch.ones(1, 8, dtype=torch.bool), torch.randn(x.shape, generator=g)


class Runner:
    def __init__(self, name: str, width: int, lr: float) -> None:
        self.name = name
        self.dtype = torch.bfloat16 if name == "adamw_bf16" or keeps_low_precision_weights(name) else torch.float32
        self.model = build_model(width, self.dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = build_optimizer(self.params, OptimizerSpec(optimizer=name), lr)
        self.batch = inputs(self.dtype)
        self.times: list[float] = []

    def step(self) -> float:
        x, t, cap, mask, target = self.batch
        start = time.perf_counter()
        out = self.model(x, t, cap, mask, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def report(self) -> dict:
        n = sum(p.numel() for p in self.params)
        weights = sum(p.numel() * p.element_size() for p in self.params)
        state = state_bytes(self.opt)
        return {
            "optimizer": self.name,
            "weights": str(self.dtype).removeprefix("torch."),
            "params": n,
            "state_bytes": state,
            "state_per_param": state / n,
            "weights_and_state_per_param": (weights + state) / n,
            "step_ms": 1000 * statistics.median(self.times),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", nargs="+", default=DEFAULT)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    runners, skipped = [], {}
    for name in args.optimizers:
        try:
            check_available(name)
        except ConfigError as exc:
            skipped[name] = exc.message
            continue
        runners.append(Runner(name, args.width, args.lr))
    first = {r.name: r.step() for r in runners}
    for r in runners:
        r.step()
    for i in range(args.steps):
        for r in runners if i % 2 == 0 else reversed(runners):
            r.times.append(r.step())

    rows = [{**r.report(), "first_step_s": first[r.name]} for r in runners]
    print(f"width {args.width}: {rows[0]['params'] if rows else 0:,} trained weights, torch {torch.__version__}")
    head = f"{'optimizer':<15} {'weights':<9} {'state B/param':>13} {'weights+state':>14}"
    print(f"{head} {'first step':>10} {'step ms':>8}")
    for row in rows:
        print(
            f"{row['optimizer']:<15} {row['weights']:<9} {row['state_per_param']:>13.2f} "
            f"{row['weights_and_state_per_param']:>14.2f} {row['first_step_s']:>9.1f}s {row['step_ms']:>8.1f}"
        )
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    if args.out:
        args.out.write_text(json.dumps({"width": args.width, "rows": rows, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
