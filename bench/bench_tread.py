"""TREAD speed-up on CPU: training step time with token routing against the same step without.

A randomly initialised ``Kandinsky5Transformer3DModel`` (the real diffusers class) at a small but
not toy width, with a LoRA on attention and FFN, trained on one 256x256 image latent (16x16 = 256
visual tokens) through ``Kandinsky5ImageFamily.predict``, i.e. the exact code path the engine
runs, routing hook included. One step = predict, MSE loss, backward, AdamW step.

Configurations: no routing, and one route ``2..-2`` at each ``--ratios`` (fraction dropped). After
``--warmup`` untimed steps of each, ``--steps`` rounds run one step of every configuration, in an
order that rotates every round. On a shared machine step times swing by several times within
seconds, so the speed-up reported is the median over rounds of the paired ratio (no-routing step /
routed step of the same round), for wall time and for process CPU time; the median s/step of each
configuration is printed too.

The "ideal" column is the token-block ratio (blocks outside the route see all tokens, those
inside see the kept share), the speed-up if every block cost were linear in tokens; attention is
quadratic, the embeddings, text blocks and output layer are not routed.

Usage::

    python bench/bench_tread.py                          # about 1 minute on 2 quiet CPU cores
    python bench/bench_tread.py --size 512 --blocks 16 --ratios 0.25 0.5 --out tread.json

The Kandinsky 5 video model is not benchmarked yet; with tens of thousands of tokens per clip
attention dominates there and the gain should be larger (SimpleTuner reports 25-40 % on video).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer_core.families.kandinsky5 import Kandinsky5ImageFamily  # noqa: E402
from trainer_core.lora.adapters import add_lora, lora_config  # noqa: E402
from trainer_core.routing.tread import parse_routes  # noqa: E402
from trainer_core.spec import LoraSpec, TrainSpec  # noqa: E402
from trainer_core.testing.tiny import randomize_zero_init  # noqa: E402

TEXT_TOKENS = 32


def build_transformer(args: argparse.Namespace) -> torch.nn.Module:
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    t = Kandinsky5Transformer3DModel(
        in_visual_dim=16,
        out_visual_dim=16,
        in_text_dim=64,
        in_text_dim2=64,
        time_dim=128,
        patch_size=(1, 2, 2),
        model_dim=args.dim,
        ff_dim=args.dim * 4,
        num_text_blocks=2,
        num_visual_blocks=args.blocks,
        axes_dims=(16, 24, 24),
    )
    randomize_zero_init(t)
    family = Kandinsky5ImageFamily(TrainSpec())
    add_lora(t, lora_config(LoraSpec(lora_rank=16), family.lora_target_modules()))
    if args.checkpointing:
        t.enable_gradient_checkpointing()
    return t.train()


def family_for(ratio: float | None) -> Kandinsky5ImageFamily:
    routing = {"tread_config": route_config(ratio)} if ratio else {}
    return Kandinsky5ImageFamily(TrainSpec.model_validate({"routing": routing}))


def route_config(ratio: float | None) -> dict:
    return {"routes": [{"selection_ratio": ratio, "start_layer_idx": 2, "end_layer_idx": -2}]}


def ideal_speedup(ratio: float | None, blocks: int, tokens: int) -> float:
    if not ratio:
        return 1.0
    (route,) = parse_routes(route_config(ratio), blocks)
    routed = route.end - route.start + 1
    work = (blocks - routed) * tokens + routed * route.keep_count(tokens)
    return blocks * tokens / work


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="image side in px (latent /8, tokens /16)")
    p.add_argument("--blocks", type=int, default=12, help="visual blocks")
    p.add_argument("--dim", type=int, default=256, help="model width (head dim 64)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--steps", type=int, default=30, help="timed rounds (one step of every configuration each)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    logging.getLogger("trainer_core.routing").setLevel(logging.ERROR)  # the ratio > 0.35 advice is known here
    torch.set_num_threads(args.threads)

    transformer = build_transformer(args)
    params = [q for q in transformer.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = args.size // 8
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, side, side, 16, generator=g)
    text = {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 64, generator=g),
        "prompt_lengths": torch.tensor([TEXT_TOKENS]),
    }
    tokens = (side // 2) ** 2
    configs: list[float | None] = [None, *args.ratios]
    families = {c: family_for(c) for c in configs}
    wall: dict[float | None, list[float]] = {c: [] for c in configs}
    cpu: dict[float | None, list[float]] = {c: [] for c in configs}
    step = 0

    def train_step(family: Kandinsky5ImageFamily) -> tuple[float, float]:
        nonlocal step
        step += 1
        torch.manual_seed(step)  # as the engine: the routes' tokens come from the global generator
        sigma = torch.rand(1)
        noise = torch.randn_like(x0)
        noisy = (1 - sigma) * x0 + sigma * noise
        start, start_cpu = time.perf_counter(), time.process_time()
        pred = family.predict(transformer, noisy, sigma, text)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
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
                "speedup": paired(wall, c),
                "speedup_cpu_time": paired(cpu, c),
                "ideal_token_block_speedup": ideal_speedup(c, args.blocks, tokens),
            }
        )
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "size": args.size,
        "visual_tokens": tokens,
        "visual_blocks": args.blocks,
        "model_dim": args.dim,
        "route": "2..-2",
        "gradient_checkpointing": args.checkpointing,
        "steps_timed_per_config": args.steps,
        "rows": rows,
    }
    print(
        f"TREAD on CPU: {args.size}x{args.size} image = {tokens} visual tokens, {args.blocks} visual blocks, "
        f"dim {args.dim}, LoRA r16, threads {args.threads}, checkpointing {args.checkpointing}, route 2..-2"
    )
    print(f"{'ratio':>8} {'s/step':>9} {'min':>9} {'speed-up':>9} {'(cpu)':>7} {'ideal':>7}")
    for row in rows:
        ratio = "none" if row["selection_ratio"] is None else f"{row['selection_ratio']:g}"
        print(
            f"{ratio:>8} {row['median_s_per_step']:>9.4f} {row['min_s_per_step']:>9.4f} "
            f"{row['speedup']:>8.2f}x {row['speedup_cpu_time']:>6.2f}x {row['ideal_token_block_speedup']:>6.2f}x"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
