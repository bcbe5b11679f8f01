"""CREPA step-time overhead on the tiny Kandinsky 5 video model, with and without the teacher-feature cache;
with ``--family lumina2``, the backbone teacher's overhead on the tiny Lumina 2 model.

Three engines (``Trainer(spec)``; ``prepare()``, ``fill_caches()``, ``build_model()``) over the same
clips, differing only in the ``crepa`` section:

- ``off``: no CREPA (the baseline);
- ``cached``: CREPA with ``crepa_teacher_cache`` (the default): teacher features were computed in
  the pre-pass, so a step reads them and runs the projector and the loss;
- ``live``: CREPA with ``crepa_teacher_cache: false``, SimpleTuner's way: every step decodes the
  clip with the VAE and encodes its frames with DINOv2.

The models are the tiny test pipeline (``build_tiny_kandinsky5_video``: width 48, 2 visual blocks;
CREPA on block 1) and a random ``transformers.Dinov2Model`` (``--dino-dim`` wide, 2 layers, patch
14) at ``--image-size``. Clips: ``--clips`` PyAV clips of ``--frames`` frames at ``--width`` x
``--height``. fp32 on the CPU, batch 1, rank 16, AdamW, no validation or checkpoints.

After ``--warmup`` untimed steps of each, ``--rounds`` rounds run ``--block`` steps of every
configuration in an order that rotates each round; the ratio reported is the median over rounds of
(configuration's block time / ``off``'s block time in the same round). The pre-pass time (decode +
DINOv2 for every clip, once) is reported separately.

``--family lumina2``: two engines, ``off`` and ``backbone`` (CREPA's encoder-free teacher: student
layer 0, teacher layer 1 of the tiny Lumina 2, width 48, 2 main layers; image tokens only), over
``--clips`` PNG images of ``--image-px`` square, batch 1; same rounds and ratio.

Usage::

    python bench/bench_crepa.py                 # about a minute on 2 CPU cores
    python bench/bench_crepa.py --rounds 9 --out crepa.json
    python bench/bench_crepa.py --family lumina2 --rounds 9
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_overhead.py

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from trainer_core.events import ListSink  # noqa: E402
from trainer_core.spec import TrainSpec  # noqa: E402
from trainer_core.train.engine import Trainer  # noqa: E402

CONFIGS = ("off", "cached", "live")
LUMINA_CONFIGS = ("off", "backbone")


def build_models(work: Path, dino_dim: int) -> tuple[Path, Path]:
    from transformers import Dinov2Config, Dinov2Model

    from trainer_core.testing.tiny import build_tiny_kandinsky5_video

    k5 = work / "tiny-kandinsky5-t2v"
    if not k5.is_dir():
        build_tiny_kandinsky5_video(work)
    dino = work / f"dinov2-{dino_dim}"
    if not dino.is_dir():
        torch.manual_seed(0)
        cfg = Dinov2Config(
            hidden_size=dino_dim,
            num_hidden_layers=2,
            num_attention_heads=max(1, dino_dim // 32),
            intermediate_size=4 * dino_dim,
            patch_size=14,
            image_size=224,
        )
        Dinov2Model(cfg).save_pretrained(dino, safe_serialization=True)
    return k5, dino


def spec_for(name: str, args: argparse.Namespace, work: Path, k5: Path, dino: Path, clips: Path) -> TrainSpec:
    crepa = {"crepa_enabled": name != "off", "crepa_block_index": 1, "crepa_encoder": str(dino),
             "crepa_encoder_image_size": args.image_size, "crepa_teacher_cache": name == "cached"}  # fmt: skip
    out = work / f"out-{name}"
    return TrainSpec.model_validate(
        {
            "output_dir": str(out),
            "model": {"model_family": "kandinsky5-video", "pretrained_model_name_or_path": str(k5)},
            "lora": {"lora_rank": 16, "lora_alpha": 16},
            "optimizer": {"optimizer": "adamw", "learning_rate": 1e-4, "max_grad_norm": 0},
            "training": {"max_train_steps": 100000, "mixed_precision": "no", "base_model_default_dtype": "fp32",
                         "gradient_checkpointing": False, "seed": 0, "caption_dropout_probability": 0},  # fmt: skip
            "checkpointing": {"checkpoint_step_interval": None},
            "validation": {"validation_disable": True},
            "crepa": crepa,
            "datasets": [
                {"id": "clips", "dataset_type": "video", "instance_data_dir": str(clips), "resolution": args.height,
                 "resolution_type": "pixel", "cache_dir_vae": str(out / "vae"), "video": {"num_frames": args.frames}},
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(out / "text")},
            ],  # fmt: skip
        }
    )


def lumina_spec_for(name: str, work: Path, model: Path, images: Path, px: int) -> TrainSpec:
    crepa = {"crepa_enabled": name != "off", "crepa_feature_source": "backbone", "crepa_block_index": 0,
             "crepa_teacher_block_index": 1}  # fmt: skip
    out = work / f"out-lumina2-{name}"
    return TrainSpec.model_validate(
        {
            "output_dir": str(out),
            "model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(model)},
            "lora": {"lora_rank": 16, "lora_alpha": 16},
            "optimizer": {"optimizer": "adamw", "learning_rate": 1e-4, "max_grad_norm": 0},
            "training": {"max_train_steps": 100000, "mixed_precision": "no", "base_model_default_dtype": "fp32",
                         "gradient_checkpointing": False, "seed": 0, "caption_dropout_probability": 0},  # fmt: skip
            "checkpointing": {"checkpoint_step_interval": None},
            "validation": {"validation_disable": True},
            "crepa": crepa,
            "datasets": [
                {"id": "d", "instance_data_dir": str(images), "resolution": px, "resolution_type": "pixel",
                 "cache_dir_vae": str(out / "vae")},
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(out / "text")},
            ],  # fmt: skip
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--dino-dim", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--family", choices=("kandinsky5-video", "lumina2"), default="kandinsky5-video")
    ap.add_argument("--image-px", type=int, default=128, help="--family lumina2: the images' side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    from helpers.datasets import write_video_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-crepa-"))
    if args.family == "lumina2":
        from helpers.datasets import write_dataset

        from trainer_core.testing.tiny import build_tiny_lumina2

        configs = LUMINA_CONFIGS
        model = work / "tiny-lumina2"
        if not model.is_dir():
            model = build_tiny_lumina2(work)
        images = work / "images"
        if not images.is_dir():
            names = {f"i{i}": f"image {i} of a circle" for i in range(args.clips)}
            write_dataset(images, names, size=(args.image_px, args.image_px))

        def make_spec(name: str) -> TrainSpec:
            return lumina_spec_for(name, work, model, images, args.image_px)
    else:
        configs = CONFIGS
        k5, dino = build_models(work, args.dino_dim)
        clips = work / "clips"
        if not clips.is_dir():
            names = {f"c{i}": f"clip {i} of a moving square" for i in range(args.clips)}
            write_video_dataset(clips, names, frames=args.frames, size=(args.width, args.height))

        def make_spec(name: str) -> TrainSpec:
            return spec_for(name, args, work, k5, dino, clips)

    trainers: dict[str, Trainer] = {}
    prepass: dict[str, float] = {}
    for name in configs:
        t = Trainer(make_spec(name), ListSink())
        t.prepare()
        start = time.perf_counter()
        t.fill_caches()
        prepass[name] = time.perf_counter() - start
        t.build_model()
        trainers[name] = t
    step = {name: 0 for name in configs}

    def run(name: str, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            trainers[name].train_step(step[name], 1)
            step[name] += 1
        return (time.perf_counter() - t0) / n

    for name in configs:
        run(name, args.warmup)
    times: dict[str, list[float]] = {n: [] for n in configs}
    ratios: dict[str, list[float]] = {n: [] for n in configs}
    for r in range(args.rounds):
        k = r % len(configs)
        order = configs[k:] + configs[:k]
        this = {name: run(name, args.block) for name in order}
        for name in configs:
            times[name].append(this[name])
            ratios[name].append(this[name] / this["off"])
    x0 = trainers["off"].batches.build(trainers["off"].sampler.next_batch(), torch.Generator().manual_seed(0)).x0
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}",
        "torch": torch.__version__,
        "family": args.family,
        "x0": list(x0.shape),
        "teacher": "backbone: layer 1 (student layer 0)"
        if args.family == "lumina2"
        else f"Dinov2Model width {args.dino_dim}, 2 layers, {args.image_size}px",
        "median_s_per_step": {n: statistics.median(times[n]) for n in configs},
        "median_ratio_to_off": {n: statistics.median(ratios[n]) for n in configs},
        "fill_caches_s": prepass,
        "teacher_computed_while_training": {n: trainers[n].teacher.computed for n in configs if trainers[n].teacher},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
