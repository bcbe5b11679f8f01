"""LoKr, LoHa and DoRA against LoRA on the tiny models: step time, peak memory, parameters, file sizes.

Runs offline on the tiny, randomly initialised models of ``trainer_core.testing.tiny`` (Lumina 2,
Kandinsky 5 image T2I, Kandinsky 5 video T2V), with the datasets and the spec of
``bench_overhead.py`` (imported, not copied): fp32 on the CPU, batch 1, AdamW, no clipping,
validation or checkpoints; only the ``lora`` section changes between adapters.

For each family, one real engine per adapter (``Trainer(spec)``; ``prepare()``, ``fill_caches()``,
``build_model()``), then:

1. Step time. Every adapter's ``train_step(step, 1)`` runs ``--block`` steps in turn, in one
   order in even rounds and the reverse order in odd ones. In each cycle (one block of every
   adapter) each adapter's block median is divided by the baseline's (``lora-r16``); a round's
   ratio is the median over its cycles and the reported ratio the median over rounds. So drift
   on a busy machine hits every adapter alike.
2. Peak memory of one step, after the timed steps (AdamW's state exists). On a GPU:
   ``torch.cuda.max_memory_allocated`` over the step. On the CPU, where torch has no such counter,
   two independent measures of the same step:

   - *allocator*: ``torch.profiler`` with ``profile_memory`` records every allocation and free of
     torch's CPU allocator (kernel scratch included); the peak of the running sum over the step is
     added to the bytes alive when the step began (frozen weights, adapter, optimizer state);
   - *tracker*: ``estimate_vram.LiveBytes``, a ``TorchDispatchMode`` that follows every storage an
     aten op returns until its last tensor dies, by kind. It gives the split at the peak (frozen
     weights, adapter, grads, optimizer state, activations) and agrees with the allocator to
     0.15 % in ``estimate_vram``'s validation. Peak RSS is useless here: it is dominated by
     torch's ~380 MiB and never goes down.
3. Trainable parameters and AdamW state bytes.
4. The two files the adapter's ``save`` writes through ``trainer.export_final``: its own
   ``pytorch_lora_weights.safetensors`` and ``<name>_comfyui.safetensors`` (bytes on disk). An
   adapter whose export fails has its error recorded instead.

Adapters (``--adapters``; ``lora-r16`` is always measured, as the baseline):

- ``lora-r16``: PEFT LoRA rank 16 (alpha 16) on the family's default targets;
- ``dora-r16``: the same with ``use_dora``;
- ``loha-d8``: LyCORIS LoHa, linear_dim 8: two rank-8 pairs per module, so the count of LoRA r16
  on the same modules;
- ``lokr-f4-full`` / ``lokr-f2-full``: LyCORIS LoKr with ``full_matrix`` and factor 4 / 2, the
  style of SimpleTuner's LoKr presets (no low-rank factor; the count follows from the factor);
- ``lokr-k5-example`` (Kandinsky 5 only): SimpleTuner's shipped K5 LoKr example:
  ``apply_preset`` on the classes ``Kandinsky5Attention`` (factor 2) and ``Kandinsky5FeedForward``
  (factor 4), ``full_matrix``, ``linear_dim`` 10000, ``linear_alpha`` 1, ``bypass_mode``;
- ``lokr-f2-d8``: LoKr factor 2 with a rank-8 second factor (``linear_dim`` 8);
- ``lora-matched``: LoRA at the rank whose parameter count is nearest ``lokr-f2-d8``'s, chosen at
  run time from the built adapters (a LoRA's count is linear in its rank). On the 48-wide tiny
  models no LoKr except factor 1 (a full delta) reaches LoRA r16's count, so the comparable pair
  is matched from the LoKr side.

Usage::

    python bench/bench_adapters.py                  # all three families, a few minutes on 2 CPU cores
    python bench/bench_adapters.py --family kandinsky5-image --adapters lokr-f2-d8 lora-matched
    python bench/bench_adapters.py --steps 40 --rounds 5 --out adapters.json --work /tmp/ba
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning (see bench_overhead.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_overhead import FAMILIES, clip_width, make_dataset, make_spec, tiny_model  # noqa: E402
from bench_video import make_clips  # noqa: E402
from estimate_vram import LiveBytes, allocator_peak  # noqa: E402

from trainer_core.spec import TrainSpec  # noqa: E402
from trainer_core.train.engine import Trainer  # noqa: E402

BASELINE = "lora-r16"
MATCHED = "lora-matched"
MATCH_TARGET = "lokr-f2-d8"
K5_ONLY = {"lokr-k5-example"}


def _lycoris(rank: int, **settings: Any) -> dict:
    return {"lora_type": "lycoris", "lora_rank": rank, "lora_alpha": rank, "lycoris": settings}


# name -> the spec's lora section (lora-matched is filled in at run time)
ADAPTERS: dict[str, dict] = {
    BASELINE: {"lora_rank": 16, "lora_alpha": 16},
    "dora-r16": {"lora_rank": 16, "lora_alpha": 16, "use_dora": True},
    "loha-d8": _lycoris(8, algo="loha", linear_dim=8, linear_alpha=8),
    "lokr-f4-full": _lycoris(16, algo="lokr", factor=4, full_matrix=True),
    "lokr-f2-full": _lycoris(16, algo="lokr", factor=2, full_matrix=True),
    "lokr-k5-example": _lycoris(
        16,
        algo="lokr",
        multiplier=1.0,
        linear_dim=10000,
        linear_alpha=1,
        factor=16,
        full_matrix=True,
        bypass_mode=True,
        apply_preset={
            "target_module": ["Kandinsky5Attention", "Kandinsky5FeedForward"],
            "module_algo_map": {"Kandinsky5Attention": {"factor": 2}, "Kandinsky5FeedForward": {"factor": 4}},
        },
    ),
    MATCH_TARGET: _lycoris(8, algo="lokr", factor=2, linear_dim=8, linear_alpha=8),
    MATCHED: {},
}


# --------------------------------------------------------------------------- set-up


def family_data(work: Path, family: str, args: argparse.Namespace) -> tuple[Path, int, int | None]:
    """bench_overhead's dataset for ``family``: (folder, resolution, frames or None)."""
    if family == "kandinsky5-video":
        folder = work / "data-video"
        if not folder.exists():
            make_clips(folder, args.clips, args.clip_frames, (clip_width(args.clip_size), args.clip_size))
        return folder, args.clip_size, args.clip_frames
    folder = work / "data-images"
    if not folder.exists():
        make_dataset(folder, args.images, (128, 128))
    return folder, 128, None


def adapter_spec(work: Path, family: str, name: str, lora: dict, args: argparse.Namespace) -> TrainSpec:
    """bench_overhead's spec with ``lora`` as its lora section; caches shared by every adapter of the family."""
    data, resolution, frames = family_data(work, family, args)
    base = work / family
    out = base / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    spec = make_spec(
        family,
        tiny_model(work, family),
        data,
        out,
        resolution=resolution,
        rank=16,
        max_grad_norm=0.0,
        steps=100_000,
        text_cache=base / "cache" / "text",
        vae_cache=base / "cache" / "vae",
        frames=frames,
    )
    raw = spec.model_dump(mode="json")
    raw["lora"] = lora
    return TrainSpec.model_validate(raw)


def build(work: Path, family: str, name: str, lora: dict, args: argparse.Namespace) -> Trainer:
    trainer = Trainer(adapter_spec(work, family, name, lora, args), device=args.device)
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    return trainer


def n_params(trainer: Trainer) -> int:
    return sum(p.numel() for p in trainer.params)


def adapted_modules(trainer: Trainer) -> int:
    """Modules that carry an adapter (PEFT: layers with a LoRA; LyCORIS: its network's modules)."""
    names = getattr(trainer.adapter, "module_names", None)
    if names is not None:
        return len(names)
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in trainer.transformer.modules() if isinstance(m, BaseTunerLayer))


def optimizer_state_bytes(trainer: Trainer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in trainer.optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


class Loop:
    """One adapter's trainer and its step counter."""

    def __init__(self, name: str, trainer: Trainer) -> None:
        self.name, self.trainer, self.step = name, trainer, 0

    def run(self, n: int) -> list[float]:
        """Wall seconds of each of ``n`` steps."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.trainer.train_step(self.step, 1)
            if self.trainer.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            self.step += 1
        return times


# --------------------------------------------------------------------------- measurements


def time_steps(loops: list[Loop], args: argparse.Namespace) -> dict[str, dict]:
    """Interleaved timing; per adapter its median step and the paired ratio against the baseline."""
    names = [lp.name for lp in loops]
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        order = loops if r % 2 == 0 else loops[::-1]
        for lp in order:
            lp.run(args.warmup)
        wall: dict[str, list[float]] = {n: [] for n in names}
        cycle_ratios: dict[str, list[float]] = {n: [] for n in names}
        pair_ratios: list[float] = []
        done = 0
        while done < args.steps:
            k = min(args.block, args.steps - done)
            med = {}
            for lp in order:
                steps = lp.run(k)
                wall[lp.name] += steps
                med[lp.name] = statistics.median(steps)
            for n in names:
                cycle_ratios[n].append(med[n] / med[BASELINE])
            if MATCH_TARGET in med and MATCHED in med:
                pair_ratios.append(med[MATCH_TARGET] / med[MATCHED])
            done += k
        rounds.append(
            {n: {"median_s": statistics.median(wall[n]), "ratio": statistics.median(cycle_ratios[n])} for n in names}
        )
        if pair_ratios:
            rounds[-1][MATCH_TARGET]["ratio_vs_matched"] = statistics.median(pair_ratios)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {rounds[-1][n]['median_s'] * 1e3:.1f} ms ({rounds[-1][n]['ratio']:.3f})" for n in names),
            flush=True,
        )
    out = {
        n: {
            "median_s": statistics.median(rd[n]["median_s"] for rd in rounds),
            "ratio": statistics.median(rd[n]["ratio"] for rd in rounds),
            "round_ratios": [rd[n]["ratio"] for rd in rounds],
        }
        for n in names
    }
    if MATCH_TARGET in out and MATCHED in out:  # the comparable-count pair, paired directly
        out[MATCH_TARGET]["ratio_vs_matched"] = statistics.median(rd[MATCH_TARGET]["ratio_vs_matched"] for rd in rounds)
    return out


@contextlib.contextmanager
def tagged_optimizer_step(trainer: Trainer, tracker: LiveBytes) -> Iterator[None]:
    """Storages the optimizer step makes (AdamW's temporaries) count as optimizer memory."""
    opt = trainer.optimizer
    plain: Callable = opt.step

    def step(*a: Any, **kw: Any) -> Any:
        with tracker.tagging("optimizer"):
            return plain(*a, **kw)

    opt.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del opt.step


def resident_tensors(trainer: Trainer) -> Iterator[tuple[torch.Tensor, str]]:
    """What is alive between steps, by kind: frozen weights, the adapter, the optimizer state."""
    trainable = {id(p) for p in trainer.params}
    for module in trainer.transformer.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None:
                    yield t, "lora" if id(t) in trainable else "weights"
    network = getattr(trainer.adapter, "network", None)  # LyCORIS keeps its modules outside the transformer
    if network is not None:
        for t in [*network.parameters(), *network.buffers()]:
            yield t, "lora" if id(t) in trainable else "weights"
    for p in trainer.params:
        yield p, "lora"
    for state in trainer.optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                yield t, "optimizer"


def step_memory(loop: Loop) -> dict:
    """Peak memory of one ``train_step`` (see the module docstring for the two CPU measures)."""
    trainer = loop.trainer
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loop.run(1)
        return {
            "method": "cuda max_memory_allocated",
            "resident_bytes": before,
            "peak_bytes": torch.cuda.max_memory_allocated(),
        }
    tracker = LiveBytes(torch.device("cpu"))
    for t, kind in resident_tensors(trainer):
        tracker.register(t, kind)
    resident, resident_by_kind = tracker.total, dict(tracker.by_kind)
    tracker.reset_peak()
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "grads")) for p in trainer.params]
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    try:
        with tagged_optimizer_step(trainer, tracker), tracker, prof:
            loop.run(1)
    finally:
        for h in hooks:
            h.remove()
    alloc = resident + allocator_peak(prof)
    return {
        "method": "cpu: allocator (torch.profiler profile_memory) + LiveBytes tracker",
        "resident_bytes": resident,
        "resident_by_kind": resident_by_kind,
        "peak_bytes": alloc,
        "tracker_peak_bytes": tracker.peak,
        "tracker_peak_by_kind": tracker.peak_by_kind,
        "tracker_over_allocator": tracker.peak / alloc,
    }


def export_sizes(trainer: Trainer, step: int) -> dict:
    """Bytes of the two files ``export_final`` writes, or the error it raised."""
    try:
        files, _ = trainer.export_final(step)
    except Exception as e:  # the export of some adapter kinds may not exist yet: record, do not stop
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "own_file": files.diffusers.name,
        "own_bytes": files.diffusers.stat().st_size,
        "comfyui_file": files.comfyui.name,
        "comfyui_bytes": files.comfyui.stat().st_size,
    }


def bench_family(work: Path, family: str, args: argparse.Namespace) -> dict:
    names = [n for n in ADAPTERS if n in args.adapters or n == BASELINE]
    if family not in ("kandinsky5-image", "kandinsky5-video"):
        names = [n for n in names if n not in K5_ONLY]
    if MATCHED in names and MATCH_TARGET not in names:
        names.insert(names.index(MATCHED), MATCH_TARGET)
    trainers: dict[str, Trainer] = {}
    for name in names:
        lora = dict(ADAPTERS[name])
        if name == MATCHED:  # LoRA's count is linear in the rank: count(r) = r * count(16) / 16
            per_rank = n_params(trainers[BASELINE]) / ADAPTERS[BASELINE]["lora_rank"]
            rank = max(1, round(n_params(trainers[MATCH_TARGET]) / per_rank))
            lora = {"lora_rank": rank, "lora_alpha": rank}
        trainers[name] = build(work, family, name, lora, args)
    loops = [Loop(n, trainers[n]) for n in names]
    print(
        f"  {len(loops)} adapters: "
        + ", ".join(
            f"{lp.name} ({trainers[lp.name].spec.lora.adapter_kind}, {n_params(lp.trainer)} params)" for lp in loops
        ),
        flush=True,
    )
    times = time_steps(loops, args)
    result: dict = {"family": family, "flavour": loops[0].trainer.family.flavour.name, "adapters": {}}
    for lp in loops:
        t = lp.trainer
        mem = step_memory(lp)
        result["adapters"][lp.name] = {
            "kind": t.spec.lora.adapter_kind,
            "lora": t.spec.lora.model_dump(mode="json", exclude_defaults=True),
            "adapted_modules": adapted_modules(t),
            "trainable_params": n_params(t),
            "optimizer_state_bytes": optimizer_state_bytes(t),
            **times[lp.name],
            "memory": mem,
            "files": export_sizes(t, lp.step),
        }
    return result


# --------------------------------------------------------------------------- report


def summary(res: dict) -> str:
    cfg = res["config"]
    lines = []
    for fam in res["families"].values():
        lines += [
            "",
            f"{fam['family']} ({fam['flavour']}): {cfg['steps']} steps x {cfg['rounds']} rounds, block {cfg['block']}, "
            f"{cfg['threads']} threads, device {cfg['device']}; ratio = median paired ratio vs {BASELINE}",
            f"{'adapter':16}{'kind':6}{'mods':>5}{'params':>8}{'opt KiB':>9}{'ms/step':>9}{'ratio':>7}"
            f"{'peak KiB':>10}{'(tracker)':>10}{'act+grad KiB':>13}{'own KiB':>9}{'comfy KiB':>10}",
        ]
        for name, a in fam["adapters"].items():
            m, f = a["memory"], a["files"]
            transient = m["peak_bytes"] - m["resident_bytes"]
            tracker = f"{m['tracker_peak_bytes'] / 1024:>10.1f}" if "tracker_peak_bytes" in m else f"{'':>10}"
            files = (
                f"{f['own_bytes'] / 1024:>9.1f}{f['comfyui_bytes'] / 1024:>10.1f}"
                if "error" not in f
                else f"{'failed':>9}{'failed':>10}"
            )
            lines.append(
                f"{name:16}{a['kind']:6}{a['adapted_modules']:>5}{a['trainable_params']:>8}"
                f"{a['optimizer_state_bytes'] / 1024:>9.1f}{a['median_s'] * 1e3:>9.2f}{a['ratio']:>7.3f}"
                f"{m['peak_bytes'] / 1024:>10.1f}{tracker}{transient / 1024:>13.1f}{files}"
            )
        pair = fam["adapters"].get(MATCH_TARGET, {}).get("ratio_vs_matched")
        if pair is not None:
            m = fam["adapters"][MATCHED]
            lines.append(
                f"  {MATCH_TARGET} / {MATCHED} (LoRA r{m['lora']['lora_rank']}, comparable count): {pair:.3f} "
                "(median paired ratio)"
            )
        errors = {n: a["files"]["error"] for n, a in fam["adapters"].items() if "error" in a["files"]}
        for n, e in errors.items():
            lines.append(f"  export failed for {n}: {e[:160]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work dir (kept; models, data and caches are reused); default a temp dir")
    p.add_argument("--family", nargs="+", choices=[*FAMILIES, "all"], default=["all"])
    p.add_argument(
        "--adapters",
        nargs="+",
        choices=list(ADAPTERS),
        default=list(ADAPTERS),
        help=f"adapters to compare ({BASELINE} is always measured; lokr-k5-example only on Kandinsky 5)",
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps per adapter per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each adapter before each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=1, help="steps of one adapter before switching to the next")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=8, help="images in the image dataset (128x128)")
    p.add_argument("--clips", type=int, default=4, help="clips in the video dataset")
    p.add_argument("--clip-frames", type=int, default=17, help="frames per clip (4k+1)")
    p.add_argument("--clip-size", type=int, default=96, help="short side of the 4:3 clips (px)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    families = list(FAMILIES) if "all" in args.family else list(dict.fromkeys(args.family))
    logging.getLogger("trainer_core").setLevel(logging.ERROR)  # tiny-model warnings (see bench_overhead)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # "using full matrix mode" for every module

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    res: dict = {
        "benchmark": "adapters",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "load_average_at_start": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "families": {},
    }
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-adapters-")))
        work.mkdir(parents=True, exist_ok=True)
        for family in families:
            print(f"adapters, {family}:", flush=True)
            res["families"][family] = bench_family(work, family, args)
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
