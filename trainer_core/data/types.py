"""The data types every part of ``trainer_core.data`` shares: what a training sample is.

They live apart from the modules that make them (discovery, images, video, references) so that
those modules can all name a :class:`Sample` without importing each other.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CropPlan:
    """How one source image becomes a training sample.

    The image is resized to ``resize`` (keeping its aspect ratio, covering the bucket) and then
    ``crop_box`` is cut out of the resized image, giving exactly ``bucket`` pixels.
    """

    bucket: tuple[int, int]  # (width, height) the sample is trained at; multiples of alignment
    resize: tuple[int, int]  # (width, height) the source is resized to before cropping
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in resized coordinates


@dataclass(frozen=True)
class FramePlan:
    """Which source frames make the clip; with the file, this alone fixes the decoded tensor.

    ``indices`` are positions in decode (presentation) order counted from the first frame; they
    never decrease and repeat when ``target_fps`` is above the source rate.
    """

    source_fps: float  # the stream's average frame rate
    target_fps: float | None  # ``frame_rate``; None keeps the source rate
    indices: tuple[int, ...]

    @property
    def count(self) -> int:
        """Frames in the clip (F)."""
        return len(self.indices)


@dataclass(frozen=True)
class Sample:
    """One training image or video clip: where it is, what it says, and how it is cut to its bucket."""

    dataset_id: str
    path: Path
    captions: tuple[str, ...]  # alternatives; the trainer picks one per step
    source_size: tuple[int, int]  # (width, height) after EXIF orientation / the video's display rotation
    plan: CropPlan  # plan.bucket is always (width, height), for images and videos alike
    identity: str  # io_utils.file_identity(path): cache key of the file's content
    repeats: int  # extra passes per epoch; the sample is seen 1 + repeats times
    frames: FramePlan | None = None  # the clip's source frames; None for an image
    # image editing: the paired reference image, planned to this sample's bucket (data/references.py)
    reference: Sample | None = None

    @property
    def is_video(self) -> bool:
        return self.frames is not None

    @property
    def bucket_key(self) -> tuple[int, ...]:
        """What a batch must share: (width, height) for an image, (width, height, frames) for a clip."""
        return self.plan.bucket if self.frames is None else (*self.plan.bucket, self.frames.count)

    def cache_fields(self) -> dict[str, Any]:
        """Everything besides the file content that fixes the pixels :func:`.images.load_pixels` returns,
        for cache keys: bucket, resize and crop box, and for a clip its source frame indices. An image's
        fields are exactly what latent cache keys held before videos existed, so those entries stay valid."""
        plan = self.plan
        fields: dict[str, Any] = {"bucket": plan.bucket, "resize": plan.resize, "crop": plan.crop_box}
        if self.frames is not None:
            fields["frames"] = list(self.frames.indices)
        return fields


@dataclass
class DatasetIndex:
    """Every sample of the run, in a deterministic order, plus non-fatal notes for the user."""

    samples: list[Sample]
    warnings: list[str] = field(default_factory=list)

    def buckets(self) -> dict[tuple[int, ...], list[int]]:
        """:attr:`Sample.bucket_key` -> indices into ``samples``; keys sorted, indices ascending.

        Keys are (width, height) for images and (width, height, frames) for videos; use
        :func:`.buckets.bucket_label` to show one ("64x48", "64x48@17").
        """
        out: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            out[s.bucket_key].append(i)
        return {b: out[b] for b in sorted(out)}

    def __len__(self) -> int:
        return len(self.samples)
