"""Reading training images: a full check at discovery, pixels for the VAE at training time.

Both paths see the image the same way: EXIF orientation applied (phone photos are stored
sideways with a "rotate me" tag), so the size measured at discovery is the size that the crop
plan of :mod:`.buckets` is applied to when the pixels are loaded.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError
from .types import Sample

if TYPE_CHECKING:
    import torch

# GIFs are images here, as in SimpleTuner (every format PIL opens): a GIF trains its first frame, and
# discovery lists the animated ones, so their motion is not silently lost (a video dataset keeps it).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})

_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # transposed or rotated by 90/270 degrees: width and height swap
_EXIF_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error)
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageProblem(ValueError):
    """One image cannot be used; the message names the file and says why."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without transposing the pixels."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except _EXIF_ERRORS:  # a broken EXIF block means no rotation, not an unusable image
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in _ROTATED_ORIENTATIONS else (w, h)


def _exif_transposed(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation; as in :func:`_oriented_size`, broken EXIF means none."""
    try:
        return ImageOps.exif_transpose(img)
    except _EXIF_ERRORS:  # a broken EXIF block means no rotation, not an unusable image
        return img.copy()


def probe_image(path: Path) -> tuple[int, int]:
    """Fully decode ``path`` once and return its (width, height) as trained (EXIF applied).

    Decoding everything is the only reliable way to find truncated files, which otherwise
    surface hours into a run. Raises :class:`ImageProblem` for unreadable or corrupt files.
    Safe to call from several threads (discovery does): no global state such as warning
    filters is touched.
    """
    try:
        with Image.open(path) as img:
            size = _oriented_size(img)
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageProblem(f"image too large to open safely: {path} ({e})") from None
    except UnidentifiedImageError:
        raise ImageProblem(f"unreadable image: {path} is not an image PIL can open") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageProblem(f"corrupt or truncated image: {path} ({e})") from None
    if size[0] < 1 or size[1] < 1:
        raise ImageProblem(f"corrupt image: {path} has size {size[0]}x{size[1]}")
    return size


def animation_frames(path: Path) -> int:
    """How many frames an image file holds (1 for a still image; an animated GIF or WebP has more).

    PIL opens the first frame of an animation, which is what trains; callers report the others.
    """
    try:
        with Image.open(path) as img:
            return int(getattr(img, "n_frames", 1)) if getattr(img, "is_animated", False) else 1
    except (OSError, SyntaxError, ValueError):  # probe_image reports a broken file
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of any PIL mode. Transparent pixels become white.

    Fully transparent pixels often hold arbitrary colour values; compositing on white gives
    what a viewer shows instead of whatever the exporter left there.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale PNGs: convert('RGB') would clip to 255 and turn them white.
        arr = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_pixels(sample: Sample) -> torch.Tensor:
    """The sample's pixels as the VAE wants them: (3, H, W) float32 in [-1, 1], (W, H) = bucket.

    Applies EXIF orientation, converts to RGB, resizes and crops by ``sample.plan``. A file that
    changed size since discovery raises :class:`DatasetError` (its crop plan would be wrong).
    A video sample (``sample.frames`` set) gives its clip as (F, 3, H, W) instead, each frame
    treated like an image: see :func:`.video.load_video_pixels`.
    """
    import torch

    if sample.frames is not None:
        from .video import load_video_pixels

        return load_video_pixels(sample)

    arr = np.array(load_image(sample), dtype=np.uint8)  # a writable copy, so torch does not warn
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    return chw.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def load_image(sample: Sample) -> Image.Image:
    """The image sample as an RGB PIL image of exactly ``sample.plan.bucket`` pixels (see :func:`load_pixels`)."""
    path = sample.path
    try:
        with Image.open(path) as raw:
            raw.load()
            img = _exif_transposed(raw)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        raise DatasetError([f"cannot read image {path}: {e}"], "the file changed or broke after discovery") from None
    if img.size != tuple(sample.source_size):
        (w, h), (sw, sh) = img.size, sample.source_size
        raise DatasetError(
            [f"image {path} is {w}x{h} but was {sw}x{sh} when the dataset was scanned"],
            "the file changed during the run; start the run again so the dataset is re-scanned",
        )
    img = to_rgb(img)
    plan = sample.plan
    if img.size != tuple(plan.resize):
        img = img.resize(plan.resize, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if plan.crop_box != (0, 0, *plan.resize):
        img = img.crop(plan.crop_box)
    return img
