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


def files_to_tensor(paths: Sequence[str | Path]) -> torch.Tensor:
    return to_tensor([open_rgb(p) for p in paths])


def blank(size: int = 64) -> torch.Tensor:
    """A black placeholder, for an IMAGE output that has nothing to show (validation disabled)."""
    return torch.zeros((1, size, size, 3), dtype=torch.float32)
