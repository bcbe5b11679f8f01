"""Memory features: peak memory and seconds per step for each memory mode.

CPU part (always): the tiny Lumina 2 and tiny Kandinsky 5 image models of
``trainer_core.testing.tiny``, and "medium" variants whose transformer is about 100 M parameters
(same pipelines, wider transformer) so that weight memory is visible next to the ~0.5 GB that
torch and diffusers occupy by themselves. Every (model, mode) runs ``Trainer`` in a fresh
subprocess, so ``ru_maxrss`` is that mode's own peak; caches are filled once beforehand, so no
text encoder or VAE is loaded in the timed processes. Reported: peak RSS, RSS right after imports
(the floor), the ``memory`` event's transformer bytes, and the median s/step.

GPU part (only where ``torch.cuda.is_available()``): a full-size, randomly initialised
Kandinsky 5 Lite transformer (published dims: 1792 wide, 2 text + 32 visual blocks), LoRA rank 16
on the attention, bf16, gradient checkpointing, batch 1 at 1024x1024 (4096 image tokens, 128 text
tokens); peak VRAM and s/step for no features / int8-quanto / int8-quanto + block-level group
offload, each in a fresh subprocess. ``--gpu-dry-run`` runs that code path on the CPU at toy size.

Usage::

    python bench/bench_memory.py                       # CPU part (+ GPU part if a GPU is present)
    python bench/bench_memory.py --sizes tiny --out memory.json
    python bench/bench_memory.py --skip-cpu            # GPU part only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CPU_MODES: dict[str, dict] = {
    "no_change": {},
    "int8-quanto": {"base_model_precision": "int8-quanto"},
    "fp8-quanto": {"base_model_precision": "fp8-quanto"},
    "int4-quanto": {"base_model_precision": "int4-quanto"},
    "offload-block": {"enable_group_offload": True, "group_offload_type": "block_level"},
    "offload-leaf": {"enable_group_offload": True, "group_offload_type": "leaf_level"},
    "int8+offload-block": {
        "base_model_precision": "int8-quanto",
        "enable_group_offload": True,
        "group_offload_type": "block_level",
    },
}
GPU_MODES = ("none", "int8-quanto", "int8-quanto+offload")
# The Kandinsky 5 transformers come from trainer_core.testing.tiny (one place for their configs):
# GPU mode: KANDINSKY5_LITE_TRANSFORMER, the published K5 Lite (T2I) size; the GPU dry run and the
# medium CPU model: kandinsky5_transformer_config at the width and depth given below.
K5_MEDIUM = {  # about 100 M parameters; head dim 64 as the real model
    "model_dim": 768,
    "ff_dim": 3072,
    "num_text_blocks": 2,
    "num_visual_blocks": 8,
    "time_dim": 256,
    "axes_dims": (16, 24, 24),
}
K5_TOY_TEXT = {"text_dim": 64, "pooled_dim": 32}  # dry run: text widths unlike the tiny encoders, like the GPU mode


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss``; Linux reports KiB).

    Linux carries ``ru_maxrss`` over ``exec``, so a child started by a big parent would report the
    parent's size: the parent here stays small (it imports neither torch nor the models).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def vm_hwm() -> int | None:
    """Linux's per-process high-water RSS (``VmHWM``, reset at exec): a cross-check of ``peak_rss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("child printed no result:\n" + text[-3000:])


# --------------------------------------------------------------------------- models and data
def medium_transformer(family: str):
    """A ~100 M parameter transformer of the family, text widths matching the tiny text encoders."""
    from diffusers import Lumina2Transformer2DModel

    from trainer_core.testing.tiny import (
        build_kandinsky5_transformer,
        kandinsky5_transformer_config,
        randomize_zero_init,
    )

    if family == "lumina2":
        tr = Lumina2Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            hidden_size=768,
            num_layers=8,
            num_refiner_layers=2,
            num_attention_heads=12,
            num_kv_heads=4,
            multiple_of=256,
            norm_eps=1e-5,
            axes_dim_rope=(16, 24, 24),
            axes_lens=(300, 64, 64),
            cap_feat_dim=32,
        )
        randomize_zero_init(tr)
        return tr
    # text widths 32: those of the tiny Qwen2.5-VL and CLIP the medium pipeline keeps
    return build_kandinsky5_transformer(kandinsky5_transformer_config(**K5_MEDIUM))


def build_models(work: Path, sizes: list[str]) -> dict[tuple[str, str], Path]:
    """(family, size) -> pipeline folder; medium = the tiny pipeline with a wider transformer."""
    import shutil

    from trainer_core.testing.tiny import build_tiny_kandinsky5_image, build_tiny_lumina2

    out = {}
    for family, builder in (("lumina2", build_tiny_lumina2), ("kandinsky5-image", build_tiny_kandinsky5_image)):
        tiny = work / "models" / f"{family}-tiny"
        if not (tiny / "model_index.json").exists():
            built = builder(work / "models" / f"build-{family}")
            shutil.move(str(built), tiny)
        if "tiny" in sizes:
            out[(family, "tiny")] = tiny
        if "medium" in sizes:
            medium = work / "models" / f"{family}-medium"
            if not (medium / "model_index.json").exists():
                shutil.copytree(tiny, medium)
                shutil.rmtree(medium / "transformer")
                medium_transformer(family).save_pretrained(medium / "transformer", safe_serialization=True)
            out[(family, "medium")] = medium
    return out


def make_dataset(folder: Path) -> Path:
    from trainer_core.demo import COLOURS, SHAPES, draw_shape

    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.values())
    for i in range(4):
        draw_shape(SHAPES[i % len(SHAPES)], colours[i], (128, 128), seed=i).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"bench sample {i}, a drawn shape\n")  # equal lengths: equal shapes
    return folder


def spec_dict(model: Path, family: str, data: Path, work: Path, memory: dict, steps: int) -> dict:
    return {
        "output_dir": str(work / "runs" / f"{family}-{model.name}-{abs(hash(json.dumps(memory)))}"),
        "model": {"model_family": family, "pretrained_model_name_or_path": str(model)},
        "lora": {"lora_rank": 16, "lora_alpha": 16},
        "optimizer": {"optimizer": "adamw", "learning_rate": 1e-4},
        "training": {
            "max_train_steps": steps,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": False,
            "seed": 7,
        },
        "memory": memory,
        "checkpointing": {"checkpoint_step_interval": None, "resume_from_checkpoint": None},
        "validation": {"validation_disable": True},
        "datasets": [
            {
                "id": "bench",
                "instance_data_dir": str(data),
                "resolution": 128,
                "resolution_type": "pixel_area",
                "cache_dir_vae": str(work / "cache" / family / "vae"),
            },
            {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(work / "cache" / family)},
        ],
    }


# --------------------------------------------------------------------------- children
def cpu_child(spec_json: str, warmup: int, steps: int, threads: int) -> dict:
    """One CPU mode in this (fresh) process: build the model, time ``steps`` training steps."""
    import torch

    from trainer_core.events import ListSink
    from trainer_core.spec import TrainSpec
    from trainer_core.train.engine import Trainer

    torch.set_num_threads(threads)
    floor = peak_rss()
    sink = ListSink()
    trainer = Trainer(TrainSpec.model_validate(json.loads(spec_json)), sink, device="cpu")
    trainer.prepare()
    trainer.fill_caches()
    if trainer.text_report.encoded or trainer.latent_report.encoded:
        raise RuntimeError("caches were not warm: the timed process loaded an encoder")
    trainer.build_model()
    times, cpu_times = [], []
    for step in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(step, 1)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    event = [e for e in sink.of("memory") if e.get("stage") == "training"][0]
    return {
        "s_per_step": statistics.median(times),
        "cpu_s_per_step": statistics.median(cpu_times),
        "peak_rss": peak_rss(),
        "vm_hwm": vm_hwm(),
        "rss_after_imports": floor,
        "transformer_bytes": event["transformer_bytes"],
        "parameters": event["parameters"],
        "quantized_parameters": event["quantized_parameters"],
        "offload": event["offload"],
    }


def build_child(work: str, sizes: str) -> dict:
    """Build the models (torch and diffusers stay out of the parent, see ``peak_rss``)."""
    models = build_models(Path(work), sizes.split(","))
    make_dataset(Path(work) / "data")
    return {"models": [[family, size, str(path)] for (family, size), path in models.items()]}


def machine_child() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def prefill_child(spec_json: str) -> dict:
    """Fill the text and latent caches once, so timed children never load an encoder."""
    from trainer_core.spec import TrainSpec
    from trainer_core.train.engine import Trainer

    trainer = Trainer(TrainSpec.model_validate(json.loads(spec_json)), device="cpu")
    trainer.prepare()
    trainer.fill_caches()
    return {"ok": True}


def gpu_child(mode: str, dry_run: bool, warmup: int, steps: int) -> dict:
    """One GPU mode: full-size K5 Lite transformer, LoRA r16, bf16, 1024x1024, batch 1."""
    import torch
    from diffusers import Kandinsky5Transformer3DModel

    from trainer_core.families import get_family_class
    from trainer_core.lora.adapters import add_lora, lora_config
    from trainer_core.memory.offload import GroupOffloader
    from trainer_core.memory.quantize import quantize_model
    from trainer_core.memory.report import module_bytes
    from trainer_core.spec import LoraSpec, TrainSpec
    from trainer_core.testing.tiny import KANDINSKY5_LITE_TRANSFORMER, kandinsky5_transformer_config

    device = torch.device("cpu" if dry_run else "cuda")
    if dry_run:
        dims, size, text_len = kandinsky5_transformer_config(**K5_TOY_TEXT), 64, 16
    else:
        dims, size, text_len = KANDINSKY5_LITE_TRANSFORMER, 1024, 128
    dtype = torch.float32 if dry_run else torch.bfloat16
    offload = mode.endswith("+offload")
    quantized = mode.startswith("int8")
    torch.manual_seed(0)
    build_on = torch.device("cpu") if (quantized or offload) else device
    torch.set_default_dtype(dtype)  # built directly in bf16: half the host memory and time
    with build_on:
        tr = Kandinsky5Transformer3DModel(**dims)
    torch.set_default_dtype(torch.float32)
    for name, module in tr.named_modules():  # what from_pretrained keeps in fp32
        if any(k in name.split(".")[-1] for k in tr._keep_in_fp32_modules or []):
            module.float()
    family_cls = get_family_class("kandinsky5-image")
    family = family_cls(TrainSpec.model_validate({"model": {"model_family": "kandinsky5-image"}}))
    if quantized:
        quantize_model(tr, "int8-quanto", family_cls.quantization_exclude)
    torch.manual_seed(1)
    params = add_lora(tr, lora_config(LoraSpec(lora_rank=16), family.lora_target_modules()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if offload:
        GroupOffloader(tr, device, offload_type="block_level", blocks_per_group=1)
    else:
        tr.to(device)
    tr.enable_gradient_checkpointing()
    tr.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    lat = size // 8
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, lat, lat, 16, generator=g).to(device)
    text = {
        "prompt_embeds": torch.randn(1, text_len, dims["in_text_dim"], generator=g).to(device),
        "prompt_lengths": torch.tensor([text_len]),
        "pooled_prompt_embeds": torch.randn(1, dims["in_text_dim2"], generator=g).to(device),
    }
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sigma = torch.rand(1, generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        noisy = (1 - sigma) * x0 + sigma * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = family.predict(tr, noisy, sigma, text)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "s_per_step": statistics.median(times),
        "peak_vram": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "transformer_bytes_on_device": module_bytes(tr, device),
        "parameters": sum(p.numel() for p in tr.parameters()),
        "peak_rss": peak_rss(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }


def run_child(args: list[str], timeout: int = 1800) -> dict:
    # PASSIVE: idle OpenMP threads sleep instead of spinning, so CPU time is not inflated on a busy machine
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:3]} failed:\n{proc.stderr[-4000:]}")
    return last_json_line(proc.stdout)


# --------------------------------------------------------------------------- main
def cpu_part(work: Path, sizes: list[str], modes: list[str], warmup: int, steps: int, threads: int) -> list[dict]:
    built = run_child(["--child-build", str(work), ",".join(sizes)])
    data = work / "data"
    rows = []
    for family, size, path in built["models"]:
        model = Path(path)
        run_child(["--child-prefill", json.dumps(spec_dict(model, family, data, work, {}, 1))])
        for mode in modes:
            spec = spec_dict(model, family, data, work, CPU_MODES[mode], warmup + steps)
            result = run_child(["--child-cpu", json.dumps(spec), str(warmup), str(steps), str(threads)])
            row = {"family": family, "size": size, "mode": mode, **result}
            rows.append(row)
            print(
                f"  {family:17s} {size:6s} {mode:19s} {row['s_per_step']:.4f} s/step "
                f"(cpu {row['cpu_s_per_step']:.4f})  peak RSS {row['peak_rss'] / 2**20:7.1f} MiB "
                f"(after imports {row['rss_after_imports'] / 2**20:6.1f})  "
                f"transformer {row['transformer_bytes'] / 2**20:7.2f} MiB",
                flush=True,
            )
    return rows


def gpu_part(dry_run: bool, warmup: int, steps: int) -> list[dict]:
    rows = []
    for mode in GPU_MODES:
        args = ["--child-gpu", mode, str(warmup), str(steps)] + (["--gpu-dry-run"] if dry_run else [])
        row = run_child(args)
        rows.append(row)
        vram = f"{row['peak_vram'] / 2**30:.2f} GiB" if row["peak_vram"] is not None else "n/a (CPU dry run)"
        label = "K5 toy" if dry_run else "K5 Lite"
        print(f"  {label} {mode:22s} {row['s_per_step']:.3f} s/step  peak VRAM {vram}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    ap.add_argument("--modes", nargs="+", default=list(CPU_MODES), choices=list(CPU_MODES))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-steps", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None, help="keep models and caches here (reused)")
    ap.add_argument("--out", type=Path, default=None, help="also write every number as JSON")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--gpu-dry-run", action="store_true", help="run the GPU code path on the CPU at toy size")
    # internal: the per-mode subprocesses
    ap.add_argument("--child-cpu", nargs=4, metavar=("SPEC", "WARMUP", "STEPS", "THREADS"))
    ap.add_argument("--child-prefill", metavar="SPEC")
    ap.add_argument("--child-build", nargs=2, metavar=("WORK", "SIZES"))
    ap.add_argument("--child-machine", action="store_true")
    ap.add_argument("--child-gpu", nargs=3, metavar=("MODE", "WARMUP", "STEPS"))
    args = ap.parse_args()

    if args.child_cpu:
        spec, warmup, steps, threads = args.child_cpu
        print(json.dumps(cpu_child(spec, int(warmup), int(steps), int(threads))))
        return
    if args.child_build:
        print(json.dumps(build_child(*args.child_build)))
        return
    if args.child_machine:
        print(json.dumps(machine_child()))
        return
    if args.child_prefill:
        print(json.dumps(prefill_child(args.child_prefill)))
        return
    if args.child_gpu:
        mode, warmup, steps = args.child_gpu
        print(json.dumps(gpu_child(mode, args.gpu_dry_run, int(warmup), int(steps))))
        return

    machine = run_child(["--child-machine"])
    results: dict = {"machine": machine, "cpu": [], "gpu": []}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_cpu:
        print(f"CPU ({args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up, work dir {work})")
        results["cpu"] = cpu_part(work, args.sizes, args.modes, args.warmup, args.steps, args.threads)
    if machine["cuda"] or args.gpu_dry_run:
        if args.gpu_dry_run:
            print("GPU mode, dry run on the CPU: toy K5 transformer, LoRA r16, fp32, 64x64, batch 1 (structure only)")
        else:
            print("GPU: Kandinsky 5 Lite transformer, LoRA r16, bf16, 1024x1024, batch 1, gradient checkpointing")
        results["gpu"] = gpu_part(args.gpu_dry_run, 2, args.gpu_steps)
    else:
        print("GPU part skipped: no CUDA device")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
