"""The offline demo: a tiny Lumina 2 model, a generated dataset, a LoRA trained in about a minute.

Everything is made on the spot: the model is randomly initialised (real architecture, toy
widths) and saved in diffusers layout, then loaded back through the same code that loads real
weights; the dataset is a handful of drawn pictures with captions, in two aspect ratios so the
bucketing shows.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from .spec import TrainSpec

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def draw_shape(shape: str, colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> Image.Image:
    rnd = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, (245, 240, 230))
    d = ImageDraw.Draw(img)
    r = min(w, h) // 3
    cx, cy = w // 2 + rnd.randint(-w // 10, w // 10), h // 2 + rnd.randint(-h // 10, h // 10)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def make_demo_dataset(folder: Path, count: int = 6) -> Path:
    """Write ``count`` captioned images (.png + same-name .txt) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(count):
        shape, colour = SHAPES[i % len(SHAPES)], names[i % len(names)]
        size = (128, 128) if i % 2 == 0 else (256, 128)
        draw_shape(shape, COLOURS[colour], size, seed=i).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"a {colour} {shape} on a cream background, tunerdemo style\n")
    return folder


def demo_spec(output: Path, steps: int = 40) -> TrainSpec:
    """Build the tiny model and dataset under ``output`` (reused if present) and return the spec."""
    from .testing.tiny import build_tiny_lumina2

    output = Path(output)
    model = output / "model" / "tiny-lumina2"
    if not (model / "model_index.json").exists():
        model = build_tiny_lumina2(output / "model")
    data = output / "dataset"
    if not data.exists():
        make_demo_dataset(data)
    return TrainSpec.model_validate(
        {
            "output_dir": str(output / "run"),
            "model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(model)},
            "lora": {"lora_rank": 8, "lora_alpha": 8},
            "optimizer": {
                "optimizer": "adamw",
                "learning_rate": 3e-3,
                "lr_scheduler": "constant_with_warmup",
                "lr_warmup_steps": 4,
            },
            "training": {
                "max_train_steps": steps,
                "train_batch_size": 1,
                "mixed_precision": "no",
                "base_model_default_dtype": "fp32",
                "gradient_checkpointing": False,
                "seed": 7,
            },
            "checkpointing": {"checkpoint_step_interval": max(1, steps // 2), "checkpoints_total_limit": 2},
            "validation": {
                "validation_prompt": "a red circle on a cream background, tunerdemo style",
                "validation_resolution": "128x128",
                "validation_num_inference_steps": 8,
                "validation_step_interval": max(1, steps // 2),
                "validation_disable_unconditional": True,
            },
            "datasets": [
                {
                    "id": "shapes",
                    "instance_data_dir": str(data),
                    "caption_strategy": "textfile",
                    "resolution": 128,
                    "resolution_type": "pixel_area",
                },
                {
                    "id": "text-embeds",
                    "dataset_type": "text_embeds",
                    "default": True,
                    "cache_dir": str(output / "cache" / "text"),
                },
            ],
        }
    )
