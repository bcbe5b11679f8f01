"""Aspect-ratio buckets: the size each image is trained at, and how it gets there.

Transformers such as Lumina 2 take any size whose sides are multiples of the patch/VAE stride,
so instead of squashing everything to a square, each image is trained close to its own aspect
ratio at roughly the same pixel count. Images of equal trained size share a *bucket* and can be
batched together.

Units (``resolution_type``, SimpleTuner's meanings; ``minimum_image_size``,
``maximum_image_size`` and ``target_downsample_size`` use the same unit as ``resolution``):

* ``pixel``: the shorter edge, in pixels.
* ``pixel_area`` (the default): the side of a square of the same area, in pixels; 1024 means
  about 1024 x 1024 pixels whatever the aspect ratio.
* ``area``: megapixels, where one megapixel is **1024 x 1024 = 1,048,576** pixels. This makes
  ``area 1.0`` and ``pixel_area 1024`` the same bucket set, as SimpleTuner intends when it maps
  ``area 1.0`` to 1024² (SimpleTuner special-cases a few round values such as 0.5 -> 768²; a
  single rule is kept here so that larger values always mean larger images).

Everything here is a pure function of (source size, dataset options, alignment, seed, key), so
the same file always gets the same bucket and crop and VAE latent caches stay valid across runs.
"""

from __future__ import annotations

import hashlib
import math
import random

from ..errors import ConfigError
from ..spec import DatasetSpec
from .types import CropPlan

MEGAPIXEL = 1024 * 1024
"""Pixels in one ``resolution_type: area`` unit (see the module docstring)."""

DEFAULT_RESOLUTION = {"pixel": 1024.0, "pixel_area": 1024.0, "area": 1.0}
"""Used when a dataset gives no resolution (the engine normally fills the family's default)."""

DEFAULT_CROP_ASPECT_BUCKETS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.33, 2.0)
"""Aspect ratios (width / height) for ``crop_aspect`` closest/random when none are configured:
portrait 1:2 and 3:4, square, landscape 4:3 and 2:1."""

_AREA_SANITY_LIMIT = 64.0  # megapixels; a larger ``area`` resolution is almost surely meant as pixels


# ---------------------------------------------------------------------------- units


def resolution_of(ds: DatasetSpec) -> tuple[str, float]:
    """(resolution_type, resolution) with the defaults applied."""
    unit = ds.resolution_type or "pixel_area"
    value = float(ds.resolution) if ds.resolution is not None else DEFAULT_RESOLUTION[unit]
    return unit, value


def size_in_unit(size: tuple[int, int], unit: str) -> float:
    """How big an image of ``size`` is, measured in ``unit``."""
    w, h = size
    if unit == "pixel":
        return float(min(w, h))
    if unit == "area":
        return w * h / MEGAPIXEL
    return math.sqrt(w * h)


def describe_amount(value: float, unit: str) -> str:
    """A size threshold in words, for error messages."""
    if unit == "pixel":
        return f"{value:g} px on the shorter edge (resolution_type 'pixel')"
    if unit == "area":
        return f"{value:g} megapixels of 1024x1024 px (resolution_type 'area')"
    return f"{value:g} px square-equivalent, i.e. {value:g}x{value:g} px of area (resolution_type 'pixel_area')"


def minimum_size_problem(path: object, size: tuple[int, int], ds: DatasetSpec, kind: str = "image") -> str | None:
    """The complaint about an image (or video, by frame size) smaller than ``minimum_image_size``, or None."""
    unit, _ = resolution_of(ds)
    if not ds.minimum_image_size or size_in_unit(size, unit) >= ds.minimum_image_size:
        return None
    minimum = describe_amount(ds.minimum_image_size, unit)
    return f"{kind} below minimum size: {path} is {size[0]}x{size[1]}, minimum {minimum}"


def aspect_ratio_exclusion(path: object, bucket: tuple[int, int], ds: DatasetSpec) -> str | None:
    """Why a file is left out by ``minimum_aspect_ratio`` / ``maximum_aspect_ratio``, or None.

    As in SimpleTuner, the ratio is width / height of the bucket the file trains in (after
    ``crop_aspect``), to two decimals like its bucket names: with ``crop_aspect: square`` every file is 1.0.
    """
    ratio = round(bucket[0] / bucket[1], 2)
    if ds.minimum_aspect_ratio is not None and ratio < ds.minimum_aspect_ratio:
        return f"{path}: aspect {ratio:g} < minimum_aspect_ratio {ds.minimum_aspect_ratio:g}"
    if ds.maximum_aspect_ratio is not None and ratio > ds.maximum_aspect_ratio:
        return f"{path}: aspect {ratio:g} > maximum_aspect_ratio {ds.maximum_aspect_ratio:g}"
    return None


def bucket_label(key: tuple[int, ...]) -> str:
    """A bucket key for people: ``"1024x768"`` for images, ``"768x512@49"`` (SimpleTuner's ``WxH@F``) for clips."""
    label = f"{key[0]}x{key[1]}"
    return f"{label}@{key[2]}" if len(key) > 2 else label


def _scale_to(size: tuple[int, int], amount: float, unit: str) -> float:
    """The factor that makes ``size`` measure ``amount`` in ``unit``."""
    return math.sqrt(amount / size_in_unit(size, unit)) if unit == "area" else amount / size_in_unit(size, unit)


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def geometry_problems(ds: DatasetSpec, alignment: int) -> list[str]:
    """Option combinations that would make every bucket of ``ds`` wrong; checked once per dataset."""
    problems = []
    unit, value = resolution_of(ds)
    if alignment < 1:
        problems.append(f"aspect bucket alignment must be a positive number of pixels, got {alignment}")
    if unit == "area" and value > _AREA_SANITY_LIMIT:
        problems.append(
            f"dataset {ds.id!r}: resolution {value:g} with resolution_type 'area' means {value:g} megapixels; "
            f"use resolution_type 'pixel_area' (or 'pixel') for a size in pixels"
        )
    for r in ds.crop_aspect_buckets or ():
        if r <= 0:
            problems.append(f"dataset {ds.id!r}: crop_aspect_buckets must be positive width/height ratios, got {r:g}")
    return problems


# ---------------------------------------------------------------------------- bucket sizes


def align(x: float, alignment: int) -> int:
    """Nearest multiple of ``alignment`` (halves round up), never less than one alignment unit."""
    return max(alignment, math.floor(x / alignment + 0.5) * alignment)


def bucket_for_aspect(aspect: float, unit: str, value: float, alignment: int) -> tuple[int, int]:
    """The aligned (width, height) of aspect ``aspect`` (w/h) at the dataset's resolution."""
    if unit == "pixel":
        w, h = (value * aspect, value) if aspect >= 1 else (value, value / aspect)
    else:
        area = value * value if unit == "pixel_area" else value * MEGAPIXEL
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    return align(w, alignment), align(h, alignment)


def _rng(seed: int, key: str, purpose: str) -> random.Random:
    """A generator fixed by (seed, file key, purpose); independent of PYTHONHASHSEED and of the
    order in which files are visited."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _choose_aspect(aspect: float, ds: DatasetSpec, seed: int, key: str) -> float:
    """The target aspect ratio of the bucket for ``crop_aspect`` closest/random (crop enabled).

    An empty or missing ``crop_aspect_buckets`` uses :data:`DEFAULT_CROP_ASPECT_BUCKETS`.
    """
    choices = tuple(ds.crop_aspect_buckets or DEFAULT_CROP_ASPECT_BUCKETS)
    if any(r <= 0 for r in choices):
        raise ConfigError(f"dataset {ds.id!r}: crop_aspect_buckets must be positive, got {list(choices)}")
    if ds.crop_aspect == "random":
        return _rng(seed, key, "aspect").choice(choices)
    # Compared in log space so that 2:1 and 1:2 are equally far from square.
    return min(choices, key=lambda r: abs(math.log(r) - math.log(aspect)))


def _cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest aspect-preserving resize of ``size`` that covers ``bucket``."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


def fit_plan(source_size: tuple[int, int], bucket: tuple[int, int]) -> CropPlan:
    """Resize ``source_size`` to cover ``bucket`` (aspect kept), then cut the centre: how a reference
    image is made to match its target (Kandinsky 5 i2i) and how validation inputs are fitted."""
    resize = _cover(source_size, bucket)
    left, top = (resize[0] - bucket[0]) // 2, (resize[1] - bucket[1]) // 2
    return CropPlan(bucket=bucket, resize=resize, crop_box=(left, top, left + bucket[0], top + bucket[1]))


def downsample_size(source_size: tuple[int, int], ds: DatasetSpec) -> tuple[int, int] | None:
    """The intermediate size of an image larger than ``maximum_image_size``, or None.

    Only when both ``maximum_image_size`` and ``target_downsample_size`` are set; an image is
    never upscaled by this step.
    """
    if not (ds.maximum_image_size and ds.target_downsample_size):
        return None
    unit, _ = resolution_of(ds)
    if size_in_unit(source_size, unit) <= ds.maximum_image_size:
        return None
    scale = _scale_to(source_size, ds.target_downsample_size, unit)
    return _scaled(source_size, scale) if scale < 1 else None


def plan_crop(source_size: tuple[int, int], ds: DatasetSpec, alignment: int, seed: int, key: str) -> CropPlan:
    """Bucket, resize and crop for one image of ``source_size`` (width, height, after EXIF rotation).

    * crop off, or ``crop_aspect: preserve``: the bucket keeps the image's aspect ratio (up to
      alignment rounding) and only the rounding residue is trimmed, centred.
    * ``crop_aspect: square``: a square bucket of the dataset's resolution.
    * ``crop_aspect: closest``: the configured aspect ratio nearest the image's.
    * ``crop_aspect: random``: one of the configured ratios, fixed per file by ``seed`` + ``key``.

    The image is resized (aspect kept) just enough to cover the bucket, then cropped according
    to ``crop_style`` (center, corner = top-left, random = fixed per file by ``seed`` + ``key``).
    When cropping is on and the image was bigger than ``maximum_image_size``, the crop is instead
    cut from the image downsampled to ``target_downsample_size`` (if that still covers the
    bucket), so a big photo yields a detail crop rather than a shrunken whole; this is what
    SimpleTuner's downsample-before-crop is for. With cropping off the two paths give the same
    pixels, so the downsample step only matters for crops.

    ``key`` should be stable for the file (its path relative to the dataset folder).
    """
    w, h = source_size
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    if alignment < 1:
        raise ConfigError(f"aspect bucket alignment must be a positive number of pixels, got {alignment}")
    unit, value = resolution_of(ds)
    aspect = w / h
    cropping = ds.crop and ds.crop_aspect != "preserve"

    if cropping and ds.crop_aspect == "square":
        side = value if unit == "pixel" else math.sqrt(value * value if unit == "pixel_area" else value * MEGAPIXEL)
        bucket = (align(side, alignment), align(side, alignment))
    elif cropping:
        bucket = bucket_for_aspect(_choose_aspect(aspect, ds, seed, key), unit, value, alignment)
    else:
        bucket = bucket_for_aspect(aspect, unit, value, alignment)

    resize = _cover(source_size, bucket)
    downsampled = downsample_size(source_size, ds) if cropping else None
    if downsampled is not None and downsampled[0] >= bucket[0] and downsampled[1] >= bucket[1]:
        resize = downsampled

    free_x, free_y = resize[0] - bucket[0], resize[1] - bucket[1]
    style = ds.crop_style if cropping else "center"
    if style == "corner":
        left, top = 0, 0
    elif style == "random":
        rng = _rng(seed, key, "crop")
        left, top = rng.randint(0, free_x), rng.randint(0, free_y)
    else:  # center / centre
        left, top = free_x // 2, free_y // 2
    return CropPlan(bucket=bucket, resize=resize, crop_box=(left, top, left + bucket[0], top + bucket[1]))
