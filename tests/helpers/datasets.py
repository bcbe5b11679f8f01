"""Tiny image datasets written at test time (no binary fixtures in the repo)."""

from __future__ import annotations

from pathlib import Path

from trainer_core.demo import COLOURS, draw_shape


def write_dataset(folder: Path, captions: dict[str, str], size: tuple[int, int] = (64, 64)) -> Path:
    """One PNG per caption (``name -> caption``) with a same-name .txt caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.values())
    for i, (name, caption) in enumerate(sorted(captions.items())):
        draw_shape("circle", colours[i % len(colours)], size, seed=i).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption + "\n")
    return folder


def lumina_spec(model_path: Path, data: Path, out: Path, **overrides) -> dict:
    """A small, fast Lumina 2 spec (fp32 on CPU, no validation) as a plain dict."""
    spec = {
        "output_dir": str(out),
        "model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(model_path)},
        "lora": {"lora_rank": 4, "lora_alpha": 8},
        "optimizer": {"optimizer": "adamw", "learning_rate": 5e-3},
        "training": {
            "max_train_steps": 6,
            "mixed_precision": "no",
            "base_model_default_dtype": "fp32",
            "gradient_checkpointing": False,
            "seed": 3,
        },
        "checkpointing": {"checkpoint_step_interval": 3},
        "validation": {"validation_disable": True},
        "datasets": [
            {"id": "d", "instance_data_dir": str(data), "resolution": 64, "resolution_type": "pixel_area"},
            {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(out / "text-cache")},
        ],
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            spec.setdefault(section, {}).update(values)
        else:
            spec[section] = values
    return spec


def write_moving_square_clip(
    path: Path, frames: int, seed: int, size: tuple[int, int] = (48, 32), fps: int = 24, lossless: bool = True
) -> Path:
    """A square moving right over a coloured background, encoded with PyAV (near-losslessly by default)."""
    import av
    import numpy as np

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rng = np.random.default_rng(seed)
    background, colour = rng.integers(0, 200, 3), rng.integers(150, 256, 3)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if lossless:
            stream.options = {"crf": "0"} if codec == "libx264" else {"qscale": "1"}
        for i in range(frames):
            arr = np.empty((h, w, 3), np.uint8)
            arr[:] = background
            x = (2 * i) % (w - 12)
            arr[h // 2 - 6 : h // 2 + 6, x : x + 12] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video_dataset(
    folder: Path, captions: dict[str, str], frames: int = 17, size: tuple[int, int] = (48, 32)
) -> Path:
    """One small MP4 per caption (a square moving right) with a same-name .txt caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, (name, caption) in enumerate(sorted(captions.items())):
        write_moving_square_clip(folder / f"{name}.mp4", frames, seed=n, size=size, lossless=False)
        (folder / f"{name}.txt").write_text(caption + "\n")
    return folder
