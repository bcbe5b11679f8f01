"""Training videos: a probe at discovery, a frame plan per clip, and pixels for the VAE.

A video sample is one *clip* cut from the **start** of its file (SimpleTuner does the same):
always the same frames, so the latent cache stays valid and a run is reproducible. The pieces:

* :func:`probe_video` opens the file with PyAV and decodes it from the start, recording each
  frame's presentation time. Decoding (not the container's frame count) is what finds truncated
  and corrupt files and gives exact counts; it stops as soon as no clip could use more frames, so a
  ten-minute video with ``num_frames: 49`` costs about 49 decoded frames (damage past that point
  is never read, so it does not matter).
* :func:`plan_frames` turns a probe and the dataset's ``video`` block into a :class:`FramePlan`,
  the tuple of source frame indices the clip is made of:

  1. ``frame_rate``: output frame ``i`` is the source frame whose timestamp is nearest to
     ``i / frame_rate`` (frames are picked, never blended; ties go to the earlier frame). Without
     it the source rate is kept. Timestamps, not nominal rates, are used, so phone videos with a
     variable frame rate resample correctly.
  2. ``max_frames`` cuts longer videos; ``min_frames`` then drops videos with fewer frames.
  3. ``num_frames`` caps the clip. A shorter video (still ``>= min_frames``) trains on its own
     length rather than being dropped.
  4. ``bucket_strategy: resolution_frames`` rounds the length down to a multiple of
     ``frame_interval`` (1 when unset) so clips of similar length share a bucket.
  5. The model family's ``frame_rule`` trims to the longest length it accepts (Kandinsky 5:
     ``4k + 1``, see :func:`largest_4k_plus_1`). The data layer knows no model, hence the hook.

  A video that no accepted length fits is a dataset problem, like a corrupt file, unless the
  dataset sets ``min_frames``: that says short videos are expected, so it is dropped and listed
  with the videos below ``min_frames`` in one warning.

* :func:`load_video_pixels` decodes only the prefix the clip needs and returns
  ``(F, 3, H, W)`` float32 in [-1, 1]: frames first, like a batch of images, so every frame goes
  through exactly the resize and crop an image would; a video VAE wants ``(B, 3, F, H, W)`` and
  the family permutes. :func:`first_frame` is frame 0 of the same clip (the i2v condition).

Frames are turned upright by the stream's display matrix (phones store portrait video sideways
with a "rotate me" tag, like EXIF on photos), at probe and at load alike.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import DatasetError
from ..spec import DatasetSpec, VideoSpec
from .types import CropPlan, FramePlan, Sample

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".webm", ".mkv"})

FrameRule = Callable[[int], int]
"""``rule(n)``: the largest frame count ``<= n`` the model accepts, or 0 (or ``ValueError``) for none."""

_RESIZE_WORKERS = 8  # frames resized in parallel while the clip decodes; more mostly contend for memory bandwidth
_TIME_EPS = 1e-3  # seconds; timestamps closer than this are equal (Matroska/WebM store whole milliseconds)


class VideoProblem(ValueError):
    """One video cannot be used; the message names the file and says why."""


class ShortVideo(ValueError):
    """A video is too short for any clip. ``below_min`` when it is below ``min_frames``; ``frames``
    is its usable length (after resampling and the ``max_frames`` cut)."""

    def __init__(self, message: str, frames: int, below_min: bool) -> None:
        super().__init__(message)
        self.frames = frames
        self.below_min = below_min


def largest_4k_plus_1(n: int) -> int:
    """Frame rule of 4x temporal VAEs (Kandinsky 5 / HunyuanVideo): 20 -> 17, 17 -> 17, 0 -> 0."""
    return (n - 1) // 4 * 4 + 1 if n >= 1 else 0


@dataclass(frozen=True)
class VideoProbe:
    """What discovery learnt about one video file."""

    size: tuple[int, int]  # (width, height) of upright frames
    fps: float  # the stream's average frame rate
    times: tuple[float, ...]  # presentation time of each decoded frame, seconds after the first
    complete: bool  # decoded to the end; otherwise stopped once no clip could use more frames
    duration: float | None  # what the container claims, seconds

    @property
    def frames(self) -> int:
        """Frames decoded: all of them when ``complete``, else at least what any clip can use."""
        return len(self.times)


# ---------------------------------------------------------------------------- options


def video_options(ds: DatasetSpec) -> VideoSpec:
    """The dataset's ``video`` block, defaults when absent."""
    return ds.video or VideoSpec()


def video_spec_problems(ds: DatasetSpec) -> list[str]:
    """Contradictions in a video block that would make every clip wrong; checked once per dataset."""
    v = video_options(ds)
    problems = []
    if v.min_frames and v.max_frames and v.min_frames > v.max_frames:
        problems.append(
            f"dataset {ds.id!r}: video.min_frames {v.min_frames} exceeds video.max_frames {v.max_frames}, "
            "so every video would be dropped"
        )
    if v.num_frames and v.max_frames and v.num_frames > v.max_frames:
        problems.append(
            f"dataset {ds.id!r}: video.num_frames {v.num_frames} exceeds video.max_frames {v.max_frames}; "
            "clips are cut to max_frames first, so no clip could have num_frames"
        )
    return problems


def video_spec_warnings(ds: DatasetSpec, frame_rule: FrameRule) -> list[str]:
    """Options that work but probably do not do what was meant."""
    v = video_options(ds)
    warnings = []
    if v.frame_interval and v.bucket_strategy != "resolution_frames":
        warnings.append(
            f"dataset {ds.id!r}: video.frame_interval only applies with bucket_strategy 'resolution_frames' "
            f"(this dataset uses {v.bucket_strategy!r}); it is ignored"
        )
    if v.num_frames:
        valid = apply_frame_rule(frame_rule, v.num_frames)
        if valid != v.num_frames:
            warnings.append(
                f"dataset {ds.id!r}: video.num_frames {v.num_frames} is not a frame count this model accepts; "
                f"clips are trimmed to {valid} frames"
                + (" (use 4k+1: 17, 33, 49, 61, 81, 121...)" if frame_rule is largest_4k_plus_1 else "")
            )
    return warnings


def apply_frame_rule(frame_rule: FrameRule, n: int) -> int:
    """``frame_rule(n)``, with "none" (``ValueError`` or a value below 1) as 0."""
    if n < 1:
        return 0
    try:
        valid = int(frame_rule(n))
    except ValueError:
        return 0
    if valid > n:
        raise ValueError(f"frame_rule({n}) returned {valid}; a frame rule must return a count <= its argument")
    return max(valid, 0)


# ---------------------------------------------------------------------------- probing


def output_limit(v: VideoSpec) -> int | None:
    """The most output frames any decision about a clip needs to see, or None for all of them."""
    if v.num_frames:
        need = max(v.num_frames, v.min_frames or 0)
        return min(need, v.max_frames) if v.max_frames else need
    return v.max_frames


def _stream_fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return float(rate)
    return None


def _upright(arr: np.ndarray, rotation: int) -> np.ndarray:
    """``arr`` (H, W, 3) turned by the display matrix's counter-clockwise ``rotation`` in degrees."""
    k = round(rotation / 90) % 4
    return np.rot90(arr, k) if k else arr


def _rotation(frame) -> int:
    return int(getattr(frame, "rotation", 0) or 0)  # PyAV < 14 has no display-matrix support


def _upright_size(frame) -> tuple[int, int]:
    w, h = frame.width, frame.height
    return (h, w) if round(_rotation(frame) / 90) % 2 else (w, h)


def _first_video_stream(container, path: Path):
    if not container.streams.video:
        raise VideoProblem(f"unreadable video: {path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads; decoding order is unchanged
    return stream


def probe_video(path: Path, limit: int | None = None, target_fps: float | None = None) -> VideoProbe:
    """Decode ``path`` from the start and describe it; raises :class:`VideoProblem` if it is unusable.

    Decoding stops once ``limit`` output frames (at ``target_fps``, or the source rate when None)
    are settled; ``limit=None`` decodes everything. Safe to call from several threads.
    """
    import av

    nominal: list[float] = []  # i / fps: the fallback when timestamps are missing or out of order
    stamped: list[float] = []  # presentation times, seconds after the first frame
    use_pts = True
    size: tuple[int, int] | None = None
    complete = True
    try:
        with av.open(str(path), mode="r") as container:
            stream = _first_video_stream(container, path)
            fps = _stream_fps(stream)
            if fps is None:
                raise VideoProblem(f"unreadable video: {path} has no frame rate")
            declared = int(stream.frames or 0)
            duration = container.duration / av.time_base if container.duration else None
            start = 0.0
            for frame in container.decode(stream):
                if size is None:
                    size = _upright_size(frame)
                    start = frame.time or 0.0
                t = frame.time
                if use_pts and (t is None or (stamped and t - start <= stamped[-1])):
                    use_pts = False
                elif use_pts:
                    stamped.append(t - start)
                nominal.append(len(nominal) / fps)
                if limit is not None and _settled(stamped if use_pts else nominal, limit, target_fps):
                    complete = False
                    break
    except VideoProblem:
        raise
    except av.error.FFmpegError as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise VideoProblem(f"unreadable, corrupt or truncated video: {path} ({reason})") from None
    except (OSError, ValueError, EOFError) as e:
        raise VideoProblem(f"unreadable video: {path} ({e})") from None
    if not nominal or size is None:
        raise VideoProblem(f"corrupt video: {path} has no decodable frames")
    if size[0] < 1 or size[1] < 1:
        raise VideoProblem(f"corrupt video: {path} has frame size {size[0]}x{size[1]}")
    if complete and declared > len(nominal):
        raise VideoProblem(f"truncated or corrupt video: {path} lists {declared} frames but only {len(nominal)} decode")
    logger.debug(
        "probed %s: %dx%d, %.3g fps, %d frame(s)%s, container duration %s s",
        path,
        *size,
        fps,
        len(nominal),
        "" if complete else " decoded (enough for any clip)",
        duration,
    )
    return VideoProbe(
        size=size,
        fps=fps,
        times=tuple(stamped if use_pts else nominal),
        complete=complete,
        duration=duration,
    )


def _settled(times: list[float], limit: int, target_fps: float | None) -> bool:
    """Whether output frames ``0 .. limit-1`` can no longer change as more frames decode."""
    if target_fps is None:
        return len(times) >= limit
    # Frames arrive in time order, so once one is at or past the last wanted time, later ones are farther.
    return times[-1] >= (limit - 1) / target_fps - _TIME_EPS


# ---------------------------------------------------------------------------- frame plans


def resample(times: tuple[float, ...], fps: float, target_fps: float, complete: bool, limit: int | None) -> list[int]:
    """Source index of each output frame at ``target_fps``: the frame nearest to ``i / target_fps``.

    The video lasts until one source frame after its last timestamp; output frames start before
    that. A probe that stopped early (``complete`` False) yields ``limit`` frames.
    """
    end = times[-1] + 1 / fps
    count = max(1, math.ceil((end - 2 * _TIME_EPS) * target_fps)) if complete else limit
    if limit is not None:
        count = min(count, limit)
    out: list[int] = []
    j = 0
    for i in range(count or 0):
        t = i / target_fps
        while j + 1 < len(times) and abs(times[j + 1] - t) < abs(times[j] - t) - _TIME_EPS:
            j += 1
        out.append(j)
    return out


def plan_frames(probe: VideoProbe, v: VideoSpec, frame_rule: FrameRule, path: Path) -> FramePlan:
    """The clip of a probed video (see the module docstring for the order of the rules).

    Raises :class:`ShortVideo` when no clip can be made: below ``min_frames``, or too short for any
    length that ``frame_interval`` and ``frame_rule`` allow.
    """
    limit = output_limit(v)
    if v.frame_rate:
        mapping = resample(probe.times, probe.fps, v.frame_rate, probe.complete, limit)
    else:
        mapping = list(range(probe.frames if limit is None else min(probe.frames, limit)))
    available = len(mapping)
    rate = f" at {v.frame_rate:g} fps" if v.frame_rate else ""
    if v.min_frames and available < v.min_frames:
        raise ShortVideo(f"{path}: {available} frames{rate} < min_frames {v.min_frames}", available, True)
    want = min(available, v.num_frames) if v.num_frames else available
    if v.bucket_strategy == "resolution_frames":
        interval = v.frame_interval or 1
        want = want // interval * interval
    count = apply_frame_rule(frame_rule, want)
    if count < 1:
        grouped = v.bucket_strategy == "resolution_frames" and (v.frame_interval or 1) > 1
        steps = f" in steps of frame_interval {v.frame_interval}" if grouped else ""
        raise ShortVideo(
            f"video too short: {path} has {available} frames{rate}, too few for any clip length the model "
            f"accepts{steps}",
            available,
            False,
        )
    return FramePlan(source_fps=probe.fps, target_fps=v.frame_rate, indices=tuple(mapping[:count]))


# ---------------------------------------------------------------------------- pixels


def _changed(path: Path, what: str) -> DatasetError:
    return DatasetError(
        [f"video {path} {what}"], "the file changed during the run; start the run again so the dataset is re-scanned"
    )


def decode_frames(
    path: Path,
    indices: tuple[int, ...],
    size: tuple[int, int],
    fit: Callable[[np.ndarray], np.ndarray] | None = None,
    pool: Executor | None = None,
) -> dict[int, np.ndarray]:
    """Upright RGB frames (H, W, 3) uint8 of the distinct ``indices``, decoding only the prefix up to
    the last one (clips start at frame 0, so there is nothing to seek). ``size`` is the upright
    (width, height) discovery saw. ``fit``, when given, is applied to each frame, on ``pool`` if
    given so that resizing overlaps decoding (PIL releases the GIL while it resamples). At most
    ``2 * _RESIZE_WORKERS`` full-size frames wait for ``fit`` at a time, so a 4K clip does not pile
    up in memory when decoding outpaces resizing."""
    import av

    wanted = set(indices)
    last = max(indices)
    pending: dict[int, Future[np.ndarray] | np.ndarray] = {}
    in_flight: deque[Future[np.ndarray]] = deque()
    try:
        with av.open(str(path), mode="r") as container:
            stream = _first_video_stream(container, path)
            for j, frame in enumerate(container.decode(stream)):
                if j in wanted:
                    if _upright_size(frame) != tuple(size):
                        w, h = _upright_size(frame)
                        raise _changed(path, f"has {w}x{h} frames but had {size[0]}x{size[1]} when it was scanned")
                    arr = _upright(frame.to_ndarray(format="rgb24"), _rotation(frame))
                    if fit is None:
                        pending[j] = arr
                    elif pool is None:
                        pending[j] = fit(arr)
                    else:
                        future = pool.submit(fit, arr)
                        pending[j] = future
                        in_flight.append(future)
                        if len(in_flight) > 2 * _RESIZE_WORKERS:
                            in_flight.popleft().result()
                if j >= last:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as e:  # VideoProblem is a ValueError
        raise DatasetError([f"cannot read video {path}: {e}"], "the file changed or broke after discovery") from None
    out = {j: f.result() if isinstance(f, Future) else f for j, f in pending.items()}
    if len(out) < len(wanted):
        raise _changed(path, f"ends before frame {last + 1}, which its clip needs")
    return out


def _to_bucket(arr: np.ndarray, plan: CropPlan) -> np.ndarray:
    """One frame resized and cropped by the sample's plan, exactly as :func:`.images.load_pixels` does."""
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if img.size != tuple(plan.resize):
        img = img.resize(plan.resize, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if plan.crop_box != (0, 0, *plan.resize):
        img = img.crop(plan.crop_box)
    return np.asarray(img)


def _clip_tensor(sample: Sample, indices: tuple[int, ...]) -> torch.Tensor:
    import torch

    plan = sample.plan
    fit = partial(_to_bucket, plan=plan)
    resizing = tuple(sample.source_size) != tuple(plan.resize) and len(set(indices)) > 1
    workers = min(_RESIZE_WORKERS, os.cpu_count() or 1) if resizing else 1
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip-resize") as pool:
            fitted = decode_frames(sample.path, indices, sample.source_size, fit, pool)
    else:
        fitted = decode_frames(sample.path, indices, sample.source_size, fit)
    stack = np.stack([fitted[j] for j in indices])  # (F, H, W, 3); a repeated frame was resized once
    # Permuting the uint8 array before the float conversion moves 4x fewer bytes through the strided copy.
    fchw = torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()
    return fchw.to(torch.float32).div_(127.5).sub_(1.0)


def load_video_pixels(sample: Sample) -> torch.Tensor:
    """The clip as (F, 3, H, W) float32 in [-1, 1]; (W, H) = ``sample.plan.bucket``, F = frame count.

    Every frame gets the same resize and crop. A file that changed since discovery raises
    :class:`DatasetError`.
    """
    if sample.frames is None:
        raise ValueError(f"{sample.path} is an image sample, not a video")
    return _clip_tensor(sample, sample.frames.indices)


def first_frame(sample: Sample) -> torch.Tensor:
    """Frame 0 of the clip as (3, H, W), equal to ``load_video_pixels(sample)[0]``: the i2v condition."""
    if sample.frames is None:
        raise ValueError(f"{sample.path} is an image sample, not a video")
    return _clip_tensor(sample, sample.frames.indices[:1])[0]
