"""Memory features: peak memory and seconds per step for each memory mode.

CPU part (always): the tiny Lumina 2 and tiny Kandinsky 5 image models of
``trainer_core.testing.tiny``, and "medium" variants whose transformer is about 100 M parameters
(same pipelines, wider transformer) so that weight memory is visible next to the ~0.5 GB that
torch and diffusers occupy by themselves. Every (model, mode) runs ``Trainer`` in a fresh
subprocess, so ``ru_maxrss`` is that mode's own peak; caches are filled once beforehand, so no
text encoder or VAE is loaded in the timed processes. Reported: peak RSS, RSS right after imports
(the floor), the ``memory`` event's transformer bytes, the median s/step, and what the RSS is made
of: anonymous memory, file-backed pages (the mapped checkpoint) and malloc's live bytes, polled per
phase (start-up, load, quantise, LoRA + placement, training; ``RssSampler``). ``--transient`` adds
the quantisation transient alone, on medium transformers built in memory (``quantise_child``).

GPU part (only where ``torch.cuda.is_available()``, or ``--gpu-dry-run``): randomly initialised,
full-size Kandinsky 5 Lite transformers built from the published dimensions (no download), LoRA
rank 16 on the attention preset, bf16 autocast, gradient checkpointing on, batch 1, 256 random text
tokens of the real widths, AdamWBF16 (the trainer's default optimizer). Two workloads:

- ``image``: 1024x1024, Image Lite T2I (6.0 B; 2560 wide, 2 text + 50 visual blocks, no
  visual_cond), latent 1x1x128x128x16 channels-last, 4096 visual tokens;
- ``video``: 512x768 (h x w) x 61 frames, Video Lite T2V (2.0 B; 1792 wide, 2 + 32 blocks,
  visual_cond), latent 1x16x64x96x16, RoPE scale (1, 2, 2), 24576 visual tokens.

Four modes, each in a fresh subprocess: ``bf16`` (no memory features), ``int8-quanto``,
``int8+offload`` (int8-quanto + block-level group offload) and ``int8+offload+tread`` (plus TREAD,
selection_ratio 0.5 over visual blocks 2..-2). Reported: ``torch.cuda.max_memory_allocated`` /
``max_memory_reserved`` over the steps, median s/step (CUDA-synchronised), and for ``bf16`` the
model FLOP utilisation (FlopCounterMode FLOPs / step time / the GPU's dense bf16 peak). An OOM is
recorded as such. ``--gpu-dry-run`` runs the whole matrix on the CPU at toy size.

Usage::

    python bench/bench_memory.py                       # CPU part (+ GPU part if a GPU is present)
    python bench/bench_memory.py --sizes tiny --out memory.json
    python bench/bench_memory.py --skip-cpu --gpu-steps 5 --out gpu.json   # GPU part only
    python bench/bench_memory.py --skip-cpu --gpu-dry-run                  # its code path, CPU, toy size
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CPU_MODES: dict[str, dict] = {
    "no_change": {},
    "int8-quanto": {"base_model_precision": "int8-quanto"},
    "fp8-quanto": {"base_model_precision": "fp8-quanto"},
    "int4-quanto": {"base_model_precision": "int4-quanto"},
    "int8-torchao": {"base_model_precision": "int8-torchao"},  # optional package: left out when missing
    "offload-block": {"enable_group_offload": True, "group_offload_type": "block_level"},
    "offload-leaf": {"enable_group_offload": True, "group_offload_type": "leaf_level"},
    "int8+offload-block": {
        "base_model_precision": "int8-quanto",
        "enable_group_offload": True,
        "group_offload_type": "block_level",
    },
}
# The Kandinsky 5 transformers come from trainer_core.testing.tiny (one place for their configs):
# GPU mode: KANDINSKY5_IMAGE_LITE_TRANSFORMER / KANDINSKY5_VIDEO_LITE_TRANSFORMER, the published sizes;
# the GPU dry run and the medium CPU model: kandinsky5_transformer_config at the widths given here.
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


RSS_KINDS = ("RssAnon", "RssFile", "RssShmem")


def rss_split() -> dict[str, int]:
    """This process's resident memory by kind, in bytes (``/proc/self/status``; empty off Linux).

    ``RssAnon`` is heap and other private memory: it stays until the process frees it (there is no
    swap here). ``RssFile`` is pages of mapped files: the libraries, and the safetensors checkpoint
    that ``from_pretrained`` maps. Clean file pages can be dropped and read again, so they count in
    RSS without being memory the kernel cannot get back (though weights in use are read every step).
    """
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in RSS_KINDS:
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")


def _glibc_mallinfo2() -> Callable[[], Any] | None:
    """glibc's ``mallinfo2`` as a ctypes function, or None (not glibc, or glibc < 2.33)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (*MALLINFO2_FIELDS, "keepcost")]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn


def heap_split(mallinfo2: Callable[[], Any] | None) -> tuple[int, int] | None:
    """(bytes malloc has handed out and not had back, bytes free inside its heaps), or None.

    Torch's CPU tensors come from malloc, so the first is the live part of ``RssAnon``. Free heap
    bytes count in ``RssAnon`` only where their pages were touched and not trimmed since.
    """
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd, info.fordblks


class RssSampler:
    """Peak anonymous, file-backed and live-heap memory per phase, polled in a thread.

    ``ru_maxrss`` and ``VmHWM`` are exact but give one number, file pages included. The split
    needs sampling: a spike shorter than the interval (or than a wait for the GIL) can be missed,
    so the sampled peaks are lower bounds. Each phase records its own peaks and the split at its end.
    """

    PEAKS = ("peak_anon", "peak_file", "peak_heap_in_use", "peak_total", "anon_at_peak_total", "file_at_peak_total")

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        self.interval = interval
        self.phases: list[dict] = []
        self._mallinfo2 = _glibc_mallinfo2() if sys.platform.startswith("linux") else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._current = dict.fromkeys(self.PEAKS, 0)

    def _sample(self) -> None:
        now = rss_split()
        if not now:
            return
        anon, file = now.get("RssAnon", 0), now.get("RssFile", 0) + now.get("RssShmem", 0)
        heap = heap_split(self._mallinfo2)
        with self._lock:
            cur = self._current
            cur["peak_anon"] = max(cur["peak_anon"], anon)
            cur["peak_file"] = max(cur["peak_file"], file)
            cur["peak_heap_in_use"] = max(cur["peak_heap_in_use"], heap[0] if heap else 0)
            if anon + file > cur["peak_total"]:
                cur.update(peak_total=anon + file, anon_at_peak_total=anon, file_at_peak_total=file)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def phase(self, name: str) -> None:
        """Close the phase that ends now (``name``): its peaks, and anon / file / heap at its end."""
        self._sample()
        end, heap = rss_split(), heap_split(self._mallinfo2)
        with self._lock:
            done, self._current = self._current, dict.fromkeys(self.PEAKS, 0)
        self.phases.append(
            {
                "phase": name,
                **done,
                "end_anon": end.get("RssAnon"),
                "end_file": end.get("RssFile"),
                "end_heap_in_use": heap[0] if heap else None,
                "end_heap_free": heap[1] if heap else None,
            }
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """The whole run: peak anon / file / live heap, and the split at the highest sampled total."""
        top = max(self.phases, key=lambda p: p["peak_total"])
        return {
            "peak_anon": max(p["peak_anon"] for p in self.phases),
            "peak_anon_phase": max(self.phases, key=lambda p: p["peak_anon"])["phase"],
            "peak_file": max(p["peak_file"] for p in self.phases),
            "peak_heap_in_use": max(p["peak_heap_in_use"] for p in self.phases) if self._mallinfo2 else None,
            "sampled_peak_total": top["peak_total"],
            "anon_at_peak_total": top["anon_at_peak_total"],
            "file_at_peak_total": top["file_at_peak_total"],
            "sample_interval_s": self.interval,
            "phases": self.phases,
        }


def default_cpu_modes() -> list[str]:
    """Every CPU mode whose quantisation package is installed (found without importing torch here)."""
    from importlib.util import find_spec

    return [m for m in CPU_MODES if "torchao" not in m or find_spec("torchao") is not None]


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
    """One CPU mode in this (fresh) process: build the model, time ``steps`` training steps.

    An ``RssSampler`` splits the memory into phases: ``startup`` (prepare, warm caches), ``load``
    (``from_pretrained``), ``quantise``, ``lora+place`` (the rest of ``build_model``) and ``train``.
    """
    import torch

    from trainer_core.events import ListSink
    from trainer_core.memory import transformer as memory_transformer
    from trainer_core.spec import TrainSpec
    from trainer_core.train.engine import Trainer

    torch.set_num_threads(threads)
    floor = peak_rss()
    sampler = RssSampler().start()
    quantize_transformer = memory_transformer.quantize_transformer

    def phased_quantize(*args, **kwargs):
        sampler.phase("load")
        result = quantize_transformer(*args, **kwargs)
        sampler.phase("quantise")
        return result

    memory_transformer.quantize_transformer = phased_quantize  # build_model looks it up on the module
    sink = ListSink()
    trainer = Trainer(TrainSpec.model_validate(json.loads(spec_json)), sink, device="cpu")
    trainer.prepare()
    trainer.fill_caches()
    if trainer.text_report.encoded or trainer.latent_report.encoded:
        raise RuntimeError("caches were not warm: the timed process loaded an encoder")
    sampler.phase("startup")
    trainer.build_model()
    sampler.phase("lora+place")
    times, cpu_times = [], []
    for step in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(step, 1)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    sampler.phase("train")
    sampler.stop()
    event = [e for e in sink.of("memory") if e.get("stage") == "training"][0]
    return {
        "s_per_step": statistics.median(times),
        "cpu_s_per_step": statistics.median(cpu_times),
        "peak_rss": peak_rss(),
        "vm_hwm": vm_hwm(),
        "rss_after_imports": floor,
        **sampler.summary(),
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
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "diffusers": ver("diffusers"),
        "peft": ver("peft"),
        "optimum-quanto": ver("optimum-quanto"),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory": props.total_memory if props else None,
        "gpu_multiprocessors": props.multi_processor_count if props else None,
    }


def quantise_child(family: str, precision: str, dtype: str, threads: int) -> dict:
    """The quantisation transient alone: a medium transformer built in memory, then ``quantize_model``.

    Built, not loaded: its weights are anonymous memory, as after a ``from_pretrained`` that converts
    dtypes, so the float weights freed during quantisation show (a mapped checkpoint's pages are
    file-backed and would hide them). Reported: anon before, the sampled peak during, anon after.
    """
    import torch

    from trainer_core.families import get_family_class
    from trainer_core.memory.quantize import quantize_model, release_freed_memory

    torch.set_num_threads(threads)
    transformer = medium_transformer(family).to(getattr(torch, dtype))
    release_freed_memory()
    sampler = RssSampler(interval=0.0005).start()
    sampler.phase("built")
    t0 = time.perf_counter()
    result = quantize_model(transformer, precision, get_family_class(family).quantization_exclude)
    seconds = time.perf_counter() - t0
    sampler.phase("quantise")
    sampler.stop()
    built, quantised = sampler.phases
    return {
        "anon_before": built["end_anon"],
        "peak_anon": quantised["peak_anon"],
        "anon_after": quantised["end_anon"],
        "transient": quantised["peak_anon"] - built["end_anon"],
        "quantized_modules": len(result.quantized),
        "seconds": seconds,
    }


def prefill_child(spec_json: str) -> dict:
    """Fill the text and latent caches once, so timed children never load an encoder."""
    from trainer_core.spec import TrainSpec
    from trainer_core.train.engine import Trainer

    trainer = Trainer(TrainSpec.model_validate(json.loads(spec_json)), device="cpu")
    trainer.prepare()
    trainer.fill_caches()
    return {"ok": True}


# --------------------------------------------------------------------------- GPU mode
@dataclass(frozen=True)
class GpuWorkload:
    """One GPU workload: a K5 Lite transformer and the latent it trains on (batch 1, 16 channels, channels-last)."""

    family: str
    flavour: str  # picks model_input (visual_cond) and the RoPE scale_factor, as in training
    pixels: str
    latent: tuple[int, int, int]  # latent frames, rows, columns of the full-size workload
    toy_latent: tuple[int, int, int]  # --gpu-dry-run


GPU_WORKLOADS: dict[str, GpuWorkload] = {
    # Image Lite T2I (6 B, no visual_cond), RoPE scale (1, 1, 1): 1024 px / 8 = 128 latent rows and columns.
    "image": GpuWorkload("kandinsky5-image", "t2i-lite-sft", "1024x1024", (1, 128, 128), (1, 16, 16)),
    # Video Lite T2V (2 B, visual_cond: [noisy | zeros | mask 0]), RoPE scale (1, 2, 2): 61 frames give
    # (61 - 1) / 4 + 1 = 16 latent frames; 512x768 (h x w) px give 64x96 latents.
    "video": GpuWorkload("kandinsky5-video", "t2v-lite-sft-5s", "512x768x61", ((61 - 1) // 4 + 1, 64, 96), (5, 8, 12)),
}
GPU_TEXT_TOKENS, TOY_TEXT_TOKENS = 256, 16
TREAD_MIDDLE = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}
_INT8_OFFLOAD = {
    "base_model_precision": "int8-quanto",
    "enable_group_offload": True,
    "group_offload_type": "block_level",
    "group_offload_blocks_per_group": 1,
    # Asked for; the trainer's rule (memory.check.use_stream) turns streams off under gradient
    # checkpointing, and this bench places the model with that rule unless --force-offload-stream.
    "group_offload_use_stream": True,
}
GPU_MODES: dict[str, dict] = {
    "bf16": {"memory": {}, "tread": None},
    "int8-quanto": {"memory": {"base_model_precision": "int8-quanto"}, "tread": None},
    "int8+offload": {"memory": _INT8_OFFLOAD, "tread": None},
    "int8+offload+tread": {"memory": _INT8_OFFLOAD, "tread": TREAD_MIDDLE},
}
# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity), first match in the device name.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)
DRY_RUN_PEAK_TFLOPS = 1.0  # fake: a dry run's MFU only shows the arithmetic works


def peak_tflops_for(device_name: str | None, override: float | None, dry_run: bool) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it comes from) for the MFU."""
    if override:
        return override, "--peak-tflops"
    if dry_run:
        return DRY_RUN_PEAK_TFLOPS, "fake (dry run)"
    for key, tflops in PEAK_BF16_TFLOPS:
        if device_name and key.lower() in device_name.lower():
            return tflops, f"datasheet, {key}"
    return None, f"unknown GPU {device_name!r}: pass --peak-tflops"


def gpu_transformer_config(workload: str, dry_run: bool) -> dict:
    from trainer_core.testing.tiny import (
        KANDINSKY5_IMAGE_LITE_TRANSFORMER,
        KANDINSKY5_VIDEO_LITE_TRANSFORMER,
        kandinsky5_transformer_config,
    )

    full = KANDINSKY5_IMAGE_LITE_TRANSFORMER if workload == "image" else KANDINSKY5_VIDEO_LITE_TRANSFORMER
    if not dry_run:
        return full
    # 6 visual blocks: the TREAD route 2..-2 then spans blocks 2-4, as it spans 2-47 / 2-29 at full size
    return kandinsky5_transformer_config(**K5_TOY_TEXT, num_visual_blocks=6, visual_cond=full["visual_cond"])


def k5_forward_flops(config: dict, latent: tuple[int, int, int], text_tokens: int) -> int:
    """Analytic FLOPs of one ``Kandinsky5Transformer3DModel`` forward (2 per multiply-add), a cross-check.

    Counted: every linear layer that sees all tokens (text and visual embeddings, q/k/v/out of self- and
    cross-attention, the feed-forward, the output projection) and the attention products QK^T and AV.
    Left out: per-sample layers (modulation, time and pooled embeddings: one token each), norms,
    activations, RoPE, and the LoRA (rank 16 on the attention: about 0.2 % more).
    """
    d, ff = config["model_dim"], config["ff_dim"]
    pt, ph, pw = config["patch_size"]
    frames, rows, cols = latent
    n, t = (frames // pt) * (rows // ph) * (cols // pw), text_tokens
    patch = pt * ph * pw
    c_in = (2 * config["in_visual_dim"] + 1 if config["visual_cond"] else config["in_visual_dim"]) * patch

    def lin(tokens: int, fan_in: int, fan_out: int) -> int:
        return 2 * tokens * fan_in * fan_out

    embed = lin(t, config["in_text_dim"], d) + lin(n, c_in, d) + lin(n, d, config["out_visual_dim"] * patch)
    text_block = lin(t, d, 4 * d) + lin(t, d, 2 * ff) + 4 * t * t * d
    visual_block = (
        lin(n, d, 4 * d)  # self-attention q, k, v, out
        + lin(n, d, 2 * d)  # cross-attention q, out
        + lin(t, d, 2 * d)  # cross-attention k, v (text)
        + lin(n, d, 2 * ff)  # feed-forward
        + 4 * n * n * d  # self-attention QK^T and AV
        + 4 * n * t * d  # cross-attention
    )
    return embed + config["num_text_blocks"] * text_block + config["num_visual_blocks"] * visual_block


def count_step_flops(transformer, run_forward, run_backward) -> dict:
    """FLOPs of one forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Gradient checkpointing re-runs each block's forward during backward. That recomputation is
    hardware work but not model work, so it is tallied apart: for this one pass the transformer's
    checkpoint function gets a ``context_fn`` whose recompute context pauses the main count.
    Returns forward, backward (without recomputation) and recompute FLOPs.
    """
    import contextlib
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import FlopCounterMode

    class StepFlops(FlopCounterMode):
        recomputing = False
        recompute_flops = 0

        def _count_flops(self, func_packet, out, args, kwargs):  # FlopCounterMode's per-op hook
            if not self.recomputing:
                return super()._count_flops(func_packet, out, args, kwargs)
            if func_packet in self.flop_registry:
                self.recompute_flops += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            return out

    counter = StepFlops(display=False)
    separated = hasattr(FlopCounterMode, "_count_flops") and hasattr(counter, "flop_registry")

    @contextlib.contextmanager
    def recompute():
        counter.recomputing = True
        try:
            yield
        finally:
            counter.recomputing = False

    ckpt = functools.partial(
        checkpoint, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), recompute())
    )
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=ckpt)
    try:
        with counter:
            out = run_forward()
            forward = counter.get_total_flops()
            run_backward(out)
    finally:
        transformer.enable_gradient_checkpointing()  # back to diffusers' default function
    total = counter.get_total_flops()
    ops = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    del out
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "method": "torch.utils.flop_counter.FlopCounterMode, one forward + backward"
        + ("" if separated else " (recomputation NOT separated: private API changed)"),
        "forward": forward,
        "backward": total - forward,
        "recompute": counter.recompute_flops,
        "model": total,  # forward + backward, what the step must do
        "hardware": total + counter.recompute_flops,  # plus gradient checkpointing's recomputation
        "by_op": ops,
    }


def gpu_child(cfg: dict) -> dict:
    """One (workload, mode) in this fresh process: build, time ``steps`` training steps, read the peaks.

    The model set-up is the trainer's own (``Trainer.build_model``): quantise
    (``memory.quantize_transformer``), add the LoRA (``add_lora``), place (``memory.place_transformer``:
    group offload or ``.to``), gradient checkpointing, ``build_optimizer``; each step is
    ``Trainer.train_step``'s: ``prepare_noisy``, autocast, ``family.predict`` (TREAD context
    included), ``flow_loss``, backward, ``clip_gradients``, optimizer step. Only the data is
    synthetic: a random latent and random text embeddings of the real widths.
    """
    import contextlib
    import gc

    import torch

    from trainer_core.families import get_family_class
    from trainer_core.lora.adapters import add_lora, lora_config
    from trainer_core.memory import transformer as memory
    from trainer_core.memory.check import check_memory_spec
    from trainer_core.memory.offload import GroupOffloader
    from trainer_core.memory.report import module_bytes, parameter_counts
    from trainer_core.spec import TrainSpec
    from trainer_core.testing.tiny import build_kandinsky5_transformer_like_pretrained
    from trainer_core.train.flow import flow_loss
    from trainer_core.train.optim import build_optimizer, clip_gradients

    dry_run, wl_name, mode_name = cfg["dry_run"], cfg["workload"], cfg["mode"]
    wl, mode = GPU_WORKLOADS[wl_name], GPU_MODES[mode_name]
    device = torch.device("cpu" if dry_run else "cuda")
    cuda = device.type == "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16
    dims = gpu_transformer_config(wl_name, dry_run)
    latent = wl.toy_latent if dry_run else wl.latent
    text_len = TOY_TEXT_TOKENS if dry_run else GPU_TEXT_TOKENS
    mem = dict(mode["memory"])
    if mem:
        mem["quantize_via"] = "cpu" if dry_run else "accelerator"  # same int8 weights; the GPU does it in seconds
    if dry_run and mem.get("group_offload_use_stream"):
        mem["group_offload_use_stream"] = False  # streams need CUDA
    spec = TrainSpec.model_validate(
        {
            "model": {"model_family": wl.family, "model_flavour": wl.flavour},
            "lora": {"lora_rank": 16, "lora_alpha": 16, "lora_target_preset": "attention"},
            "training": {
                "mixed_precision": "no" if dry_run else "bf16",
                "base_model_default_dtype": "fp32" if dry_run else "bf16",
                "gradient_checkpointing": True,
                "seed": 7,
            },
            "memory": mem,
            "routing": {"tread_config": mode["tread"]},
        }
    )
    family = get_family_class(wl.family)(spec)
    warnings = check_memory_spec(spec, device)
    tokens = (latent[0] // dims["patch_size"][0]) * (latent[1] // dims["patch_size"][1])
    tokens *= latent[2] // dims["patch_size"][2]
    row: dict = {
        "workload": wl_name,
        "mode": mode_name,
        "status": "ok",
        "pixels": "toy" if dry_run else wl.pixels,
        "flavour": wl.flavour,
        "latent": [1, *latent, 16],
        "visual_tokens": tokens,
        "text_tokens": text_len,
        "visual_cond": dims["visual_cond"],
        "scale_factor": list(family.scale_factor),
        "model_dim": dims["model_dim"],
        "blocks": [dims["num_text_blocks"], dims["num_visual_blocks"]],
        "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": True,
        "lora": "rank 16, alpha 16, preset 'attention'",
        "tread": mode["tread"],
        "warnings": warnings,
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
    }
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, *latent, 16, generator=g)
    text = {
        "prompt_embeds": torch.randn(1, text_len, dims["in_text_dim"], generator=g).to(device),
        "prompt_lengths": torch.tensor([text_len]),
        "pooled_prompt_embeds": torch.randn(1, dims["in_text_dim2"], generator=g).to(device),
    }

    def autocast() -> torch.autocast:  # the trainer's: bf16 autocast on the GPU, none on the CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    try:
        t0 = time.perf_counter()
        # Built straight on the GPU (random init there takes seconds; on the host, minutes at 6 B). The
        # trainer loads on the host when it offloads; either way only the step's peaks are read below.
        tr = build_kandinsky5_transformer_like_pretrained(dims, dtype=dtype, device=device)
        quant = memory.quantize_transformer(tr, spec, family, device)
        torch.manual_seed(spec.training.seed)
        params = add_lora(tr, lora_config(spec.lora, family.lora_target_modules()))
        if cfg["force_stream"] and spec.memory.enable_group_offload and cuda:
            offloader = GroupOffloader(tr, device, offload_type="block_level", blocks_per_group=1, use_stream=True)
        else:
            offloader = memory.place_transformer(tr, spec, device)
        tr.enable_gradient_checkpointing()
        tr.train()
        lr = float(spec.optimizer.learning_rate or family.defaults.learning_rate)
        opt = build_optimizer(params, spec.optimizer, lr, seed=spec.training.seed)
        row["build_s"] = time.perf_counter() - t0
        row.update(
            offload=memory.offload_mode(offloader),
            quantized_modules=len(quant.quantized),
            transformer_bytes=module_bytes(tr),
            transformer_bytes_on_device=module_bytes(tr, device),
            **parameter_counts(tr),
        )
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["allocated_before_steps"] = torch.cuda.memory_allocated()

        def forward():
            sigma = torch.rand(1, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            noisy, weights = family.prepare_noisy(x0, noise, sigma)
            target = family.target(x0, noise).to(device)
            with autocast():
                pred = family.predict(tr, noisy.to(device), sigma.to(device), text)
            return flow_loss(pred.float(), target.float(), "l2", weights=weights).mean()

        routers: list = []
        if mode["tread"]:
            plain_context = family.tread_context

            @contextlib.contextmanager
            def recording_context(transformer):  # the family's own TREAD context; keeps its router
                with plain_context(transformer) as router:
                    routers.append(router)
                    yield router

            family.tread_context = recording_context

        times, losses = [], []
        for step in range(cfg["warmup"] + cfg["steps"]):
            torch.manual_seed(1000 + step)  # TREAD draws its tokens from the global generator, seeded per step
            sync()
            start = time.perf_counter()
            loss = forward()
            loss.backward()
            clip_gradients(params, spec.optimizer)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # the trainer reads it every step too
            sync()
            if step >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
        row.update(s_per_step=statistics.median(times), step_times=times, loss_last=losses[-1])
        if mode["tread"]:
            if not routers or routers[-1] is None or not routers[-1].kept:
                raise RuntimeError("TREAD mode: the family's tread_context routed no tokens")
            row["tread_kept_tokens"] = [int(ids.shape[1]) for ids in routers[-1].kept]
        row["loss_finite"] = all(v == v and abs(v) != float("inf") for v in losses)
        if cuda:
            row["peak_allocated"] = torch.cuda.max_memory_allocated()
            row["peak_reserved"] = torch.cuda.max_memory_reserved()
        if cfg["mfu"]:
            torch.manual_seed(999)
            flops = count_step_flops(tr, forward, lambda loss: loss.backward())
            opt.zero_grad(set_to_none=True)
            flops["analytic_forward"] = k5_forward_flops(dims, latent, text_len)
            flops["forward_counted_over_analytic"] = flops["forward"] / flops["analytic_forward"]
            peak, source = peak_tflops_for(row["device"] if cuda else None, cfg["peak_tflops"], dry_run)
            row.update(flops=flops, peak_tflops=peak, peak_source=source)
            if peak:
                row["mfu"] = flops["model"] / row["s_per_step"] / (peak * 1e12)
                row["hfu"] = flops["hardware"] / row["s_per_step"] / (peak * 1e12)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        row.update(status="OOM", error=str(e).strip().splitlines()[0][:300])
        if cuda:
            row["peak_allocated"] = torch.cuda.max_memory_allocated()
            row["peak_reserved"] = torch.cuda.max_memory_reserved()
    row["peak_rss"] = peak_rss()
    return row


def child_pythonpath() -> str:
    """The repo first, then whatever PYTHONPATH already holds (e.g. wheels carried to a GPU machine)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def run_child(args: list[str], timeout: int = 1800) -> dict:
    # PASSIVE: idle OpenMP threads sleep instead of spinning, so CPU time is not inflated on a busy machine
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": child_pythonpath()}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:3]} failed:\n{proc.stderr[-4000:]}")
    return last_json_line(proc.stdout)


# --------------------------------------------------------------------------- main
def transient_part(modes: list[str], threads: int) -> list[dict]:
    """``quantise_child`` for each medium family, quantised mode and dtype: the quantisation transient."""
    precisions = [CPU_MODES[m]["base_model_precision"] for m in modes if set(CPU_MODES[m]) == {"base_model_precision"}]
    rows = []
    print(_transient_line("family", "dtype", "precision", ("before", "peak", "after", "transient")))
    for family in ("lumina2", "kandinsky5-image"):
        for dtype in ("float32", "bfloat16"):
            for precision in precisions:
                row = {"family": family, "dtype": dtype, "precision": precision}
                row.update(run_child(["--child-quantise", family, precision, dtype, str(threads)]))
                rows.append(row)
                values = [_mib(row[k]) for k in ("anon_before", "peak_anon", "anon_after", "transient")]
                print(_transient_line(family, dtype, precision, values), flush=True)
    return rows


def _transient_line(family: str, dtype: str, precision: str, values: Sequence[str]) -> str:
    return f"  {family:17s} {dtype:8s} {precision:13s} " + " ".join(f"{v:>9s}" for v in values)


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
            print_cpu_row(row)
    return rows


def _mib(v: int | None) -> str:
    return f"{v / 2**20:7.1f}" if v is not None else "    n/a"


def print_cpu_row(row: dict) -> None:
    """The mode's line, then the anon / file split: the run's peaks and each phase's."""
    print(
        f"  {row['family']:17s} {row['size']:6s} {row['mode']:19s} {row['s_per_step']:.4f} s/step "
        f"(cpu {row['cpu_s_per_step']:.4f})  peak RSS {_mib(row['peak_rss'])} MiB "
        f"(after imports {_mib(row['rss_after_imports'])})  transformer {row['transformer_bytes'] / 2**20:7.2f} MiB",
        flush=True,
    )
    if not row.get("phases"):
        return
    print(
        f"  {'':44s} peak anon {_mib(row['peak_anon'])} ({row['peak_anon_phase']}), "
        f"peak file {_mib(row['peak_file'])}, peak live heap {_mib(row['peak_heap_in_use'])}; "
        f"at the sampled peak {_mib(row['sampled_peak_total'])}: anon {_mib(row['anon_at_peak_total'])} "
        f"+ file {_mib(row['file_at_peak_total'])}",
        flush=True,
    )
    phases = "  ".join(
        f"{p['phase']} {_mib(p['peak_anon']).strip()}/{_mib(p['peak_file']).strip()}"
        f"/{_mib(p['peak_heap_in_use']).strip()}"
        f" -> {_mib(p['end_anon']).strip()}/{_mib(p['end_file']).strip()}/{_mib(p['end_heap_in_use']).strip()}"
        for p in row["phases"]
    )
    print(f"  {'':44s} anon/file/live heap MiB, phase peak -> end: {phases}", flush=True)


def run_gpu_child(cfg: dict, timeout: int, extra_env: dict | None = None) -> dict:
    """One GPU child; a crash, a kill or a timeout becomes a row (status OOM / failed), never an exception."""
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **(extra_env or {}), "PYTHONPATH": child_pythonpath()}
    base = {"workload": cfg["workload"], "mode": cfg["mode"]}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child-gpu", json.dumps(cfg)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**base, "status": "failed", "error": f"timed out after {timeout} s (--gpu-timeout)"}
    if proc.returncode == 0:
        return last_json_line(proc.stdout)
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr.lower()
    if proc.returncode < 0:
        tail = [f"killed by signal {-proc.returncode} (host memory?)"]
    row = {**base, "status": "OOM" if oom else "failed", "error": tail[0][:300]}
    print(proc.stderr[-3000:], file=sys.stderr)
    return row


def _gib(v: int | None) -> str:
    return f"{v / 2**30:8.2f}" if v is not None else "     n/a"


def print_gpu_row(row: dict) -> None:
    mode = row["mode"]
    if row.get("status") != "ok":
        print(f"  {mode:20s} {row.get('status')}: {row.get('error', '')}", flush=True)
        return
    mfu = f"{row['mfu'] * 100:5.1f}%" if row.get("mfu") is not None else "     "
    hfu = f"{row['hfu'] * 100:5.1f}%" if row.get("hfu") is not None else "     "
    print(
        f"  {mode:20s} {_gib(row.get('peak_allocated'))} {_gib(row.get('peak_reserved'))} "
        f"{_gib(row.get('allocated_before_steps'))} {row['s_per_step']:8.3f} {mfu:>6s} {hfu:>6s}  "
        f"{row['offload']}",
        flush=True,
    )
    notes = []
    if row.get("tread_kept_tokens"):
        notes.append(f"TREAD kept {row['tread_kept_tokens']} of {row['visual_tokens']} visual tokens per route")
    stream_off = any("group_offload_use_stream is turned off" in w for w in row.get("warnings", []))
    if stream_off and "+stream" not in row["offload"]:
        notes.append("offload streams off: the trainer turns them off under gradient checkpointing")
    if not row.get("loss_finite", True):
        notes.append("loss not finite (random weights): timings still valid")
    for note in notes:
        print(f"  {'':20s} {note}", flush=True)
    if row.get("flops"):
        f = row["flops"]
        print(
            f"  {'':20s} FLOPs/step: forward {f['forward'] / 1e12:.4g} T, backward {f['backward'] / 1e12:.4g} T, "
            f"recompute {f['recompute'] / 1e12:.4g} T; counted forward / analytic "
            f"{f['forward_counted_over_analytic']:.3f}; peak {row['peak_tflops']} TFLOP/s ({row['peak_source']})",
            flush=True,
        )


def print_gpu_header(workload: str, dry_run: bool) -> None:
    wl = GPU_WORKLOADS[workload]
    dims = gpu_transformer_config(workload, dry_run)
    latent = wl.toy_latent if dry_run else wl.latent
    print(
        f" {workload} {'toy' if dry_run else wl.pixels}: {wl.family} ({wl.flavour}), model_dim {dims['model_dim']}, "
        f"{dims['num_text_blocks']}+{dims['num_visual_blocks']} blocks, visual_cond {dims['visual_cond']}, "
        f"latent 1x{'x'.join(map(str, latent))}x16",
        flush=True,
    )
    print(
        f"  {'mode':20s} {'peak GiB':>8s} {'reserved':>8s} {'resident':>8s} {'s/step':>8s} {'MFU':>6s} "
        f"{'HFU':>6s}  offload",
        flush=True,
    )


def gpu_part(
    workloads: list[str],
    modes: list[str],
    dry_run: bool,
    warmup: int,
    steps: int,
    *,
    peak_tflops: float | None = None,
    force_stream: bool = False,
    timeout: int = 600,
    on_row=None,
) -> list[dict]:
    """Every (workload, mode) in its own process, one after the other (a dry run: four at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    cfgs = [
        {
            "workload": workload,
            "mode": mode,
            "dry_run": dry_run,
            "warmup": warmup,
            "steps": steps,
            "mfu": mode == "bf16",
            "peak_tflops": peak_tflops,
            "force_stream": force_stream,
        }
        for workload in workloads
        for mode in modes
    ]
    # A dry run checks structure, not speed: its children run side by side, one thread each.
    with ThreadPoolExecutor(max_workers=4 if dry_run else 1) as pool:
        env = {"OMP_NUM_THREADS": "1"} if dry_run else {}
        futures = [pool.submit(run_gpu_child, cfg, timeout, env) for cfg in cfgs]
        rows: list[dict] = []
        for cfg, future in zip(cfgs, futures):
            if not rows or rows[-1]["workload"] != cfg["workload"]:
                print_gpu_header(cfg["workload"], dry_run)
            rows.append(future.result())
            print_gpu_row(rows[-1])
            if on_row is not None:
                on_row(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    ap.add_argument("--modes", nargs="+", default=default_cpu_modes(), choices=list(CPU_MODES))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-steps", type=int, default=5, help="timed GPU steps per mode (median reported)")
    ap.add_argument("--gpu-warmup", type=int, default=2, help="untimed GPU steps first")
    ap.add_argument("--workload", nargs="+", default=list(GPU_WORKLOADS), choices=list(GPU_WORKLOADS))
    ap.add_argument("--gpu-modes", nargs="+", default=list(GPU_MODES), choices=list(GPU_MODES))
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for the MFU")
    ap.add_argument(
        "--force-offload-stream",
        action="store_true",
        help="group offload with CUDA streams even under gradient checkpointing (the trainer turns them off)",
    )
    ap.add_argument("--gpu-timeout", type=int, default=600, help="seconds per GPU child before it counts as failed")
    ap.add_argument("--work", type=Path, default=None, help="keep models and caches here (reused)")
    ap.add_argument("--out", type=Path, default=None, help="also write every number as JSON")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument(
        "--transient",
        action="store_true",
        help="also the quantisation transient alone: each quantised --modes precision on in-memory medium models",
    )
    ap.add_argument("--gpu-dry-run", action="store_true", help="run the GPU code path on the CPU at toy size")
    # internal: the per-mode subprocesses
    ap.add_argument("--child-cpu", nargs=4, metavar=("SPEC", "WARMUP", "STEPS", "THREADS"))
    ap.add_argument("--child-prefill", metavar="SPEC")
    ap.add_argument("--child-quantise", nargs=4, metavar=("FAMILY", "PRECISION", "DTYPE", "THREADS"))
    ap.add_argument("--child-build", nargs=2, metavar=("WORK", "SIZES"))
    ap.add_argument("--child-machine", action="store_true")
    ap.add_argument("--child-gpu", metavar="JSON")
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
    if args.child_quantise:
        family, precision, dtype, threads = args.child_quantise
        print(json.dumps(quantise_child(family, precision, dtype, int(threads))))
        return
    if args.child_prefill:
        print(json.dumps(prefill_child(args.child_prefill)))
        return
    if args.child_gpu:
        print(json.dumps(gpu_child(json.loads(args.child_gpu))))
        return

    machine = run_child(["--child-machine"])
    results: dict = {"machine": machine, "cpu": [], "gpu": [], "gpu_settings": None}

    def save(*_: object) -> None:  # after every GPU row too: a run cut short keeps what it measured
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))

    if not args.skip_cpu:
        work = args.work or Path(tempfile.mkdtemp(prefix="bench-memory-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"CPU ({args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up, work dir {work})")
        results["cpu"] = cpu_part(work, args.sizes, args.modes, args.warmup, args.steps, args.threads)
        save()
        if args.transient:
            print("Quantisation transient (medium transformers built in memory, anon MiB, sampled every 0.5 ms)")
            results["quantise_transient"] = transient_part(args.modes, args.threads)
            save()
    if machine["cuda"] or args.gpu_dry_run:
        dry = args.gpu_dry_run
        where = "dry run on the CPU (toy transformers, fp32, no streams, fake MFU peak)" if dry else machine["cuda"]
        results["gpu_settings"] = {
            "device": where,
            "workloads": args.workload,
            "modes": args.gpu_modes,
            "warmup_steps": args.gpu_warmup,
            "timed_steps": args.gpu_steps,
            "batch": 1,
            "text_tokens": TOY_TEXT_TOKENS if dry else GPU_TEXT_TOKENS,
            "lora": "rank 16, alpha 16, preset 'attention'",
            "precision": "fp32" if dry else "bf16 weights, bf16 autocast, fp32 LoRA and kept-fp32 modules",
            "gradient_checkpointing": True,
            "optimizer": "adamw_bf16 (trainer default), lr 1e-4, clip 1.0",
            "tread": TREAD_MIDDLE,
            "force_offload_stream": args.force_offload_stream,
        }
        print(
            f"GPU: {where}; torch {machine['torch']} (CUDA {machine['torch_cuda']}); LoRA r16 (attention), "
            f"batch 1, {results['gpu_settings']['text_tokens']} text tokens, gradient checkpointing on, "
            f"{args.gpu_warmup} warm-up + {args.gpu_steps} timed steps per mode, each mode a fresh process",
            flush=True,
        )
        print(
            "  peak = max_memory_allocated, reserved = max_memory_reserved (GiB, over the steps); resident = "
            "allocated before the first step; MFU/HFU = model / hardware FLOPs per step over s/step and peak",
            flush=True,
        )

        def on_row(rows: list[dict]) -> None:
            results["gpu"] = rows
            save()

        results["gpu"] = gpu_part(
            args.workload,
            args.gpu_modes,
            dry,
            args.gpu_warmup,
            args.gpu_steps,
            peak_tflops=args.peak_tflops,
            force_stream=args.force_offload_stream,
            timeout=args.gpu_timeout,
            on_row=on_row,
        )
    else:
        print("GPU part skipped: no CUDA device")
    save()


if __name__ == "__main__":
    main()
