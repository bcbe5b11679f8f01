"""TREAD speed-up on CPU: training step time with token routing against the same step without.

Randomly initialised ``Kandinsky5Transformer3DModel``s (the real diffusers class, config from
``trainer_core.testing.tiny.kandinsky5_transformer_config``) with a rank-16 LoRA on the family's
default targets (image: attention; video: attention and FFN), trained through the family's own
``prepare_noisy`` / ``predict`` / ``target`` (routing hook included), i.e. the code path the engine
runs. One step = predict, MSE loss, backward, AdamW step. Two models (``--model``):

- ``image``: ``Kandinsky5ImageFamily`` (T2I) on one ``--size`` x ``--size`` image latent
  (default 256 px: a 32x32 latent, 16x16 patches = 256 visual tokens);
- ``video``: ``Kandinsky5VideoFamily`` (T2V) with a ``visual_cond`` transformer (33 input channels,
  as every published K5 video checkpoint) on one clip latent of ``--frames`` frames at
  ``--video-size`` px square (default 17 frames at 128 px: 5 latent frames x 8x8 patches = 320 tokens).

Sizes (``--preset``): ``small`` (default) is width ``--dim`` 256 (head dim 64), ``--blocks`` 12
visual and 2 text blocks, text widths 64, route ``2..-2``; ``tiny`` is exactly the transformer of
the tiny test models (width 48, 2 visual blocks, 1 text block, head dim 24, text widths 32; the
video one with ``visual_cond``), route ``0..-1`` (both its blocks).

Configurations: no routing, and one route at each ``--ratios`` (fraction dropped). After
``--warmup`` untimed steps of each, ``--steps`` rounds run one step of every configuration, in an
order that rotates every round. On a shared machine step times swing by several times within
seconds, so the speed-up reported is the median over rounds of the paired ratio (no-routing step /
routed step of the same round), for wall time and for process CPU time; the median s/step of each
configuration is printed too.

The "ideal" column is the token-block ratio (blocks outside the route see all tokens, those
inside see the kept share), the speed-up if every block cost were linear in tokens; attention is
quadratic, the embeddings, text blocks and output layer are not routed.

Usage::

    python bench/bench_tread.py                          # image and video, about 2 minutes on 2 CPU cores
    python bench/bench_tread.py --model video --ratios 0.5
    python bench/bench_tread.py --preset tiny            # the tiny test models' transformer
    python bench/bench_tread.py --size 512 --blocks 16 --ratios 0.25 0.5 --out tread.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning (see bench_overhead.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer_core.families.base import ModelFamily  # noqa: E402
from trainer_core.lora.adapters import add_lora, lora_config  # noqa: E402
from trainer_core.routing.tread import parse_routes  # noqa: E402
from trainer_core.spec import LoraSpec, TrainSpec  # noqa: E402
from trainer_core.testing.tiny import build_kandinsky5_transformer, kandinsky5_transformer_config  # noqa: E402

TEXT_TOKENS = 32
FAMILIES = {"image": ("kandinsky5-image", "t2i-lite-sft"), "video": ("kandinsky5-video", "t2v-lite-sft-5s")}


def transformer_config(args: argparse.Namespace, video: bool) -> dict:
    if args.preset == "tiny":
        return kandinsky5_transformer_config(visual_cond=video)
    return kandinsky5_transformer_config(
        model_dim=args.dim,
        ff_dim=args.dim * 4,
        num_visual_blocks=args.blocks,
        num_text_blocks=2,
        text_dim=64,
        pooled_dim=64,
        time_dim=128,
        axes_dims=(16, 24, 24),
        visual_cond=video,
    )


def build_transformer(config: dict, checkpointing: bool) -> torch.nn.Module:
    t = build_kandinsky5_transformer(config, seed=0)
    family = make_family("video" if config["visual_cond"] else "image", None, (0, -1))
    add_lora(t, lora_config(LoraSpec(lora_rank=16), family.lora_target_modules()))
    if checkpointing:
        t.enable_gradient_checkpointing()
    return t.train()


def route_config(ratio: float | None, route: tuple[int, int]) -> dict:
    return {"routes": [{"selection_ratio": ratio, "start_layer_idx": route[0], "end_layer_idx": route[1]}]}


def make_family(model: str, ratio: float | None, route: tuple[int, int]) -> ModelFamily:
    from trainer_core.families import get_family_class

    name, flavour = FAMILIES[model]
    raw: dict = {"model": {"model_family": name, "model_flavour": flavour}}
    if ratio:
        raw["routing"] = {"tread_config": route_config(ratio, route)}
    return get_family_class(name)(TrainSpec.model_validate(raw))


def ideal_speedup(ratio: float | None, blocks: int, tokens: int, route: tuple[int, int]) -> float:
    if not ratio:
        return 1.0
    (r,) = parse_routes(route_config(ratio, route), blocks)
    routed = r.end - r.start + 1
    work = (blocks - routed) * tokens + routed * r.keep_count(tokens)
    return blocks * tokens / work


def bench_model(model: str, args: argparse.Namespace) -> dict:
    video = model == "video"
    config = transformer_config(args, video)
    route = (0, -1) if args.preset == "tiny" else (2, -2)
    if args.route:
        route = tuple(args.route)
    transformer = build_transformer(config, args.checkpointing)
    params = [q for q in transformer.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    if video:
        side, frames = args.video_size // 8, (args.frames - 1) // 4 + 1
    else:
        side, frames = args.size // 8, 1
    x0 = torch.randn(1, frames, side, side, 16, generator=g)  # channels-last (B, F, H, W, C)
    text = {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, config["in_text_dim"], generator=g),
        "pooled_prompt_embeds": torch.randn(1, config["in_text_dim2"], generator=g),
        "prompt_lengths": torch.tensor([TEXT_TOKENS]),
    }
    blocks = config["num_visual_blocks"]
    configs: list[float | None] = [None, *args.ratios]
    families = {c: make_family(model, c, route) for c in configs}
    tokens = families[None].image_seq_len(x0)
    wall: dict[float | None, list[float]] = {c: [] for c in configs}
    cpu: dict[float | None, list[float]] = {c: [] for c in configs}
    step = 0

    def train_step(family: ModelFamily) -> tuple[float, float]:
        nonlocal step
        step += 1
        torch.manual_seed(step)  # as the engine: the routes' tokens come from the global generator
        sigma = torch.rand(1)
        noise = torch.randn_like(x0)
        noisy, _ = family.prepare_noisy(x0, noise, sigma)
        start, start_cpu = time.perf_counter(), time.process_time()
        pred = family.predict(transformer, noisy, sigma, text)
        loss = torch.nn.functional.mse_loss(pred.float(), family.target(x0, noise))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - start_cpu

    for c in configs:
        for _ in range(args.warmup):
            train_step(families[c])
    for r in range(args.steps):
        for c in configs[r % len(configs) :] + configs[: r % len(configs)]:
            w, u = train_step(families[c])
            wall[c].append(w)
            cpu[c].append(u)

    def paired(times: dict[float | None, list[float]], c: float | None) -> float:
        return statistics.median(a / b for a, b in zip(times[None], times[c]))

    rows = []
    for c in configs:
        rows.append(
            {
                "selection_ratio": c,
                "median_s_per_step": statistics.median(wall[c]),
                "min_s_per_step": min(wall[c]),
                "cpu_median_s_per_step": statistics.median(cpu[c]),
                "speedup": paired(wall, c),
                "speedup_cpu_time": paired(cpu, c),
                "ideal_token_block_speedup": ideal_speedup(c, blocks, tokens, route),
            }
        )
    return {
        "model": model,
        "family": FAMILIES[model][0],
        "latent_shape": list(x0.shape),
        "visual_tokens": tokens,
        "visual_blocks": blocks,
        "model_dim": config["model_dim"],
        "parameters": sum(p.numel() for p in transformer.parameters()),
        "route": f"{route[0]}..{route[1]}",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", choices=list(FAMILIES), default=list(FAMILIES), help="default both")
    p.add_argument("--preset", choices=["small", "tiny"], default="small", help="transformer size (see above)")
    p.add_argument("--size", type=int, default=256, help="image side in px (latent /8, tokens /16)")
    p.add_argument("--video-size", type=int, default=128, help="square clip side in px")
    p.add_argument("--frames", type=int, default=17, help="clip frames (4k+1; latent frames (n-1)/4+1)")
    p.add_argument("--blocks", type=int, default=12, help="visual blocks (small preset)")
    p.add_argument("--dim", type=int, default=256, help="model width, small preset (head dim 64)")
    p.add_argument("--route", type=int, nargs=2, metavar=("START", "END"), help="default 2 -2 (tiny: 0 -1)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--steps", type=int, default=30, help="timed rounds (one step of every configuration each)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    logging.getLogger("trainer_core").setLevel(logging.ERROR)  # the ratio > 0.35 advice is known here
    torch.set_num_threads(args.threads)

    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "preset": args.preset,
        "gradient_checkpointing": args.checkpointing,
        "steps_timed_per_config": args.steps,
        "models": [bench_model(m, args) for m in args.model],
    }
    print(
        f"TREAD on CPU ({args.preset} preset): LoRA r16 (image: attention, video: attention+FFN), "
        f"threads {args.threads}, "
        f"OMP_WAIT_POLICY={result['omp_wait_policy']}, checkpointing {args.checkpointing}, {args.steps} rounds"
    )
    for m in result["models"]:
        print(
            f"\n{m['family']}: latent {m['latent_shape']} = {m['visual_tokens']} visual tokens, "
            f"{m['visual_blocks']} visual blocks, dim {m['model_dim']}, {m['parameters'] / 1e6:.1f} M params, "
            f"route {m['route']}"
        )
        print(f"{'ratio':>8} {'s/step':>9} {'min':>9} {'cpu s':>9} {'speed-up':>9} {'(cpu)':>7} {'ideal':>7}")
        for row in m["rows"]:
            ratio = "none" if row["selection_ratio"] is None else f"{row['selection_ratio']:g}"
            print(
                f"{ratio:>8} {row['median_s_per_step']:>9.4f} {row['min_s_per_step']:>9.4f} "
                f"{row['cpu_median_s_per_step']:>9.4f} {row['speedup']:>8.2f}x {row['speedup_cpu_time']:>6.2f}x "
                f"{row['ideal_token_block_speedup']:>6.2f}x"
            )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
