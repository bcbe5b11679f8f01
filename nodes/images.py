"""PIL images to ComfyUI IMAGE tensors and back.

ComfyUI's IMAGE is a float tensor (batch, height, width, 3) in [0, 1]. A batch must share one
size, but validation renders can come at several resolutions, so smaller images are centred on a
black canvas of the largest size rather than stretched (what was rendered stays visible as is).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def open_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Images -> one IMAGE batch; mixed sizes are padded (centred) to the largest."""
    if not images:
        return blank()
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    frames = []
    for im in images:
        if im.size != (width, height):
            canvas = Image.new("RGB", (width, height))
            canvas.paste(im, ((width - im.width) // 2, (height - im.height) // 2))
            im = canvas
        frames.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0))
    return torch.stack(frames)


STRIP_SUFFIX = "-frames.png"  # trainer_core.media.save_sample: a clip's frame strip next to its .mp4


def sample_frames(paths: Sequence[str | Path]) -> torch.Tensor:
    """Validation samples as one IMAGE batch: an image as itself, a video clip as all of its frames.

    The trainer saves a clip as ``name.mp4`` plus a frame strip ``name-frames.png``; the strip is
    what the node previews, but the output carries the clip's real frames, so they can go straight
    to CreateVideo / SaveVideo. Several clips (prompts, sizes) follow each other in the batch.
    """
    images: list[Image.Image] = []
    for path in map(Path, paths):
        clip = path.with_name(path.name.removesuffix(STRIP_SUFFIX) + ".mp4")
        if path.name.endswith(STRIP_SUFFIX) and clip.is_file():
            images += decode_frames(clip)
        else:
            images.append(open_rgb(path))
    return to_tensor(images)


def decode_frames(clip: Path) -> list[Image.Image]:
    import av

    with av.open(str(clip)) as container:
        return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]


def blank(size: int = 64) -> torch.Tensor:
    """A black placeholder, for an IMAGE output that has nothing to show (validation disabled)."""
    return torch.zeros((1, size, size, 3), dtype=torch.float32)
