"""Dataset discovery: find every training image and video, its captions and its bucket before any model loads.

Loading a 10 GB model only to fail on the 300th image is the worst user experience a trainer
can give, so :func:`discover` checks *every* enabled image and video dataset up front (folders,
captions, full decodes for corrupt files, minimum sizes, clip lengths) and raises one
:class:`DatasetError` listing every problem with the file it concerns. What it returns is a frozen
description of the run's data: the same files, captions, buckets, crops and clip frames on every
start with the same seed.

Videos are bucketed like images (same :func:`.buckets.plan_crop` on the frame size, one crop for
every frame of the clip) plus their clip length: a batch is one tensor, so it can only hold clips
of one frame count. The bucket key is ``(width, height)`` for images and ``(width, height,
frames)`` for videos (:attr:`Sample.bucket_key`); ``sample.plan.bucket`` stays ``(width, height)``.
How clip lengths are chosen, and what ``bucket_strategy`` changes, is in :mod:`.video`: with
``aspect_ratio`` every distinct clip length is its own bucket (with ``num_frames`` set, long
videos all share ``num_frames``); with ``resolution_frames`` lengths are first rounded down to a
multiple of ``frame_interval``, so videos of varied length collect in fewer, fuller ``WxH@F``
buckets.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from ..io_utils import file_identity
from ..spec import DatasetSpec, TrainSpec
from .buckets import aspect_ratio_exclusion, bucket_label, geometry_problems, minimum_size_problem, plan_crop
from .captions import CaptionProblem, captions_for
from .images import IMAGE_EXTENSIONS, ImageProblem, animation_frames, probe_image
from .listing import list_files
from .references import pair_references
from .types import DatasetIndex, Sample
from .video import (
    VIDEO_EXTENSIONS,
    FrameRule,
    ShortVideo,
    VideoProblem,
    output_limit,
    plan_frames,
    probe_video,
    video_options,
    video_spec_problems,
    video_spec_warnings,
)

logger = logging.getLogger(__name__)

UPSCALE_WARNING_FACTOR = 2.0
"""Images enlarged more than this to reach their bucket are reported (they train blurry)."""

_MAX_WORKERS = 8  # decoding releases the GIL; more threads than this mostly contend for the disk


# Why a file is left out on purpose (as SimpleTuner excludes it), in the words of the per-dataset report.
TOO_SHORT = "too short"
TOO_SMALL = "below minimum_image_size"
OUT_OF_ASPECT = "outside minimum/maximum_aspect_ratio"


@dataclass
class _Checked:
    """What checking one file produced: a sample, or the problems that prevent one, or why it was left out."""

    sample: Sample | None
    problems: list[str]
    dropped: tuple[str, str] | None = None  # (TOO_SHORT / TOO_SMALL / OUT_OF_ASPECT, detail): listed in one warning
    animated: str | None = None  # an animated image of which only the first frame trains: "a.gif (12 frames)"


def _too_small(path: Path, size: tuple[int, int], ds: DatasetSpec, kind: str) -> _Checked | None:
    """The file left out for ``minimum_image_size``, as SimpleTuner leaves it out; None when big enough."""
    reason = minimum_size_problem(path, size, ds, kind=kind)
    return None if reason is None else _Checked(None, [], dropped=(TOO_SMALL, reason.split(": ", 1)[1]))


def _check_image(path: Path, root: Path, ds: DatasetSpec, alignment: int, seed: int) -> _Checked:
    problems: list[str] = []
    captions: tuple[str, ...] = ()
    try:
        captions = captions_for(path, ds)
    except CaptionProblem as e:
        problems.append(str(e))
    try:
        size = probe_image(path)
    except ImageProblem as e:
        return _Checked(None, [*problems, str(e)])
    too_small = _too_small(path, size, ds, "image")
    if too_small:  # left out, so its other faults (a missing caption) no longer matter
        return too_small
    key = path.relative_to(root).as_posix()
    plan = plan_crop(size, ds, alignment, seed, key)
    out_of_aspect = aspect_ratio_exclusion(path, plan.bucket, ds)
    if out_of_aspect:
        return _Checked(None, [], dropped=(OUT_OF_ASPECT, out_of_aspect))
    if problems:
        return _Checked(None, problems)
    sample = Sample(
        dataset_id=ds.id,
        path=path,
        captions=captions,
        source_size=size,
        plan=plan,
        identity=file_identity(path),
        repeats=ds.repeats,
    )
    frames = animation_frames(path) if path.suffix.lower() in (".gif", ".webp") else 1
    return _Checked(sample, [], animated=f"{path} ({frames} frames)" if frames > 1 else None)


def _check_video(path: Path, root: Path, ds: DatasetSpec, alignment: int, seed: int, rule: FrameRule) -> _Checked:
    problems: list[str] = []
    captions: tuple[str, ...] = ()
    try:
        captions = captions_for(path, ds)
    except CaptionProblem as e:
        problems.append(str(e))
    v = video_options(ds)
    try:
        probe = probe_video(path, output_limit(v), v.frame_rate)
    except VideoProblem as e:
        return _Checked(None, [*problems, str(e)])
    too_small = _too_small(path, probe.size, ds, "video")
    if too_small:
        return too_small
    try:
        frames = plan_frames(probe, v, rule, path)
    except ShortVideo as e:
        if e.below_min or v.min_frames:  # the user asked for short videos to be left out; other faults no longer matter
            return _Checked(None, [], dropped=(TOO_SHORT, str(e).removeprefix("video too short: ")))
        return _Checked(None, [*problems, str(e)])
    plan = plan_crop(probe.size, ds, alignment, seed, path.relative_to(root).as_posix())
    out_of_aspect = aspect_ratio_exclusion(path, plan.bucket, ds)
    if out_of_aspect:
        return _Checked(None, [], dropped=(OUT_OF_ASPECT, out_of_aspect))
    if problems:
        return _Checked(None, problems)
    sample = Sample(
        dataset_id=ds.id,
        path=path,
        captions=captions,
        source_size=probe.size,
        plan=plan,
        identity=file_identity(path),
        repeats=ds.repeats,
        frames=frames,
    )
    return _Checked(sample, [])


def _dataset_problems(ds: DatasetSpec, alignment: int) -> list[str]:
    """Problems of the dataset as a whole, found without looking at its files."""
    problems = geometry_problems(ds, alignment)
    if ds.dataset_type == "video":
        problems += video_spec_problems(ds)
    if (
        ds.prepend_instance_prompt
        and ds.caption_strategy != "instanceprompt"
        and not (ds.instance_prompt or "").strip()
    ):
        problems.append(f"dataset {ds.id!r} sets prepend_instance_prompt but has no instance_prompt to prepend")
    return problems


def _scan_dataset(
    ds: DatasetSpec, alignment: int, seed: int, pool: ThreadPoolExecutor, rule: FrameRule
) -> tuple[list[Sample], list[str], list[str]]:
    """(samples, problems, warnings) of one dataset."""
    problems = _dataset_problems(ds, alignment)
    root = Path(ds.instance_data_dir or "").expanduser().absolute()
    if not root.exists():
        return [], [*problems, f"instance_data_dir of dataset {ds.id!r} does not exist: {root}"], []
    if not root.is_dir():
        return [], [*problems, f"instance_data_dir of dataset {ds.id!r} is not a folder: {root}"], []
    if problems:  # the geometry is unusable: planning crops would only repeat the same error per image
        return [], problems, []
    video = ds.dataset_type == "video"
    kind = "video" if video else "image"
    extensions = VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS
    paths = list_files(root, extensions)
    if not paths:
        exts = " ".join(sorted(extensions))
        return [], [f"instance_data_dir of dataset {ds.id!r} holds no {kind}s ({exts}): {root}"], []

    if video:
        checked = list(pool.map(lambda p: _check_video(p, root, ds, alignment, seed, rule), paths))
    else:
        checked = list(pool.map(lambda p: _check_image(p, root, ds, alignment, seed), paths))
    samples = [c.sample for c in checked if c.sample is not None]
    problems = [p for c in checked for p in c.problems]

    warnings: list[str] = video_spec_warnings(ds, rule) if video else []
    dropped: dict[str, list[str]] = defaultdict(list)
    for c in checked:
        if c.dropped:
            dropped[c.dropped[0]].append(c.dropped[1])
    if dropped and not samples:  # reported even beside other problems, so one pass of fixes is enough
        problems.append(
            f"dataset {ds.id!r}: no {kind} is left to train on; "
            + "; ".join(f"{len(items)} {why} were left out: " + "; ".join(items) for why, items in dropped.items())
        )
    elif dropped:
        warnings += [
            f"dataset {ds.id!r}: {len(items)} {kind}(s) {why}, left out: " + "; ".join(items)
            for why, items in dropped.items()
        ]
    animated = [c.animated for c in checked if c.animated and c.sample is not None]
    if animated:
        warnings.append(
            f"dataset {ds.id!r}: {len(animated)} animated image(s), only the first frame of each is trained "
            "(put them in a video dataset as .mp4 to train their motion): " + "; ".join(animated)
        )
    if video:
        warnings += _frame_rate_warnings(ds, samples)
    blurry = [s for s in samples if s.plan.resize[0] / s.source_size[0] > UPSCALE_WARNING_FACTOR]
    if blurry:
        worst = min(blurry, key=lambda s: s.source_size[0] * s.source_size[1])
        warnings.append(
            f"dataset {ds.id!r}: {len(blurry)} {kind}(s) are enlarged more than {UPSCALE_WARNING_FACTOR:g}x to fit "
            f"their bucket and will look soft (smallest: {worst.path}, {worst.source_size[0]}x{worst.source_size[1]}); "
            "set minimum_image_size to refuse them or lower the resolution"
        )
    return samples, problems, warnings


def _frame_rate_warnings(ds: DatasetSpec, samples: list[Sample]) -> list[str]:
    """Resampling above the source rate repeats frames, which teaches the model stutter."""
    target = video_options(ds).frame_rate
    slower = [s for s in samples if s.frames and target and s.frames.source_fps < target - 1e-3]
    if not slower:
        return []
    names = ", ".join(f"{s.path.name} ({s.frames.source_fps:g} fps)" for s in slower[:5] if s.frames)
    more = f" and {len(slower) - 5} more" if len(slower) > 5 else ""
    return [
        f"dataset {ds.id!r}: video.frame_rate {target:g} is above the frame rate of {len(slower)} video(s), whose "
        f"frames are repeated to reach it: {names}{more}"
    ]


def _duplicate_warnings(samples: list[Sample]) -> list[str]:
    """Byte-identical files are trained twice as often as the user probably meant."""
    by_identity: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_identity[s.identity].append(s)
    return [
        "identical files (each is trained): " + ", ".join(str(s.path) for s in group)
        for group in by_identity.values()
        if len(group) > 1
    ]


def _hint(problems: list[str]) -> str:
    text = "\n".join(problems)
    hints = []
    if "instance_data_dir" in text:
        hints.append("point instance_data_dir at an existing folder of images")
    if "caption" in text:
        hints.append(
            "put a .txt file with the image's name next to each image (one caption per line), "
            "or use caption_strategy 'filename' or 'instanceprompt'"
        )
    if "corrupt" in text or "unreadable" in text or "too large" in text or "truncated" in text:
        hints.append("re-export or delete the broken files")
    if "reference image" in text or "conditioning dataset" in text:
        hints.append(
            "give every training image exactly one reference image with the same file name (any image extension) "
            "in the conditioning dataset's folder, and remove references without a training image"
        )
    if TOO_SMALL in text or OUT_OF_ASPECT in text:
        hints.append(
            "add files that pass minimum_image_size / minimum_aspect_ratio / maximum_aspect_ratio, or relax them "
            "(files outside them are left out, as in SimpleTuner)"
        )
    if "too short" in text or "min_frames" in text or "num_frames" in text:
        hints.append(
            "remove the short videos, lower video.min_frames / video.num_frames / video.frame_interval, or set "
            "video.min_frames so that videos too short are left out instead of failing"
        )
    hints.append("then start again; every problem is listed, so one pass of fixes is enough")
    return "; ".join(hints)


def _identity_rule(n: int) -> int:
    return n


def discover(
    spec: TrainSpec,
    alignment: int,
    seed: int | None = None,
    frame_rule: Callable[[int], int] | None = None,
) -> DatasetIndex:
    """Scan every enabled image and video dataset of ``spec`` and plan its buckets.

    ``alignment`` is the family's bucket step in pixels (64 for Lumina 2). ``seed`` fixes
    random crops and random crop aspects per file; it defaults to ``spec.training.seed``.
    ``frame_rule(n)`` is the model family's largest accepted clip length ``<= n`` (Kandinsky 5:
    :func:`.video.largest_4k_plus_1`), 0 or ``ValueError`` for none; the default accepts any
    length. Disabled datasets and ``text_embeds`` entries are skipped. Raises
    :class:`DatasetError` listing every problem of every dataset.

    Files SimpleTuner excludes are left out and listed in one warning per dataset and reason, not
    refused: images and videos below ``minimum_image_size``, files whose bucket is outside
    ``minimum_aspect_ratio`` / ``maximum_aspect_ratio``, and videos below ``video.min_frames``. A
    video too short for any accepted clip length is a problem, unless the dataset sets
    ``video.min_frames``: then it is left out too. A dataset left with nothing to train on is a problem
    that lists what was left out.
    """
    seed = spec.training.seed if seed is None else seed
    rule = frame_rule or _identity_rule
    for ds in spec.datasets:
        if ds.disabled or ds.dataset_type not in ("image", "video"):
            logger.debug("skipping dataset %r (%s)", ds.id, "disabled" if ds.disabled else ds.dataset_type)
    datasets = spec.training_datasets
    if not datasets:
        raise DatasetError(
            [
                "no enabled image dataset (or video dataset): the spec has no dataset with dataset_type 'image' "
                "or 'video' that is not disabled"
            ],
            "add a dataset whose instance_data_dir is a folder of training images (or videos)",
        )

    samples: list[Sample] = []
    problems: list[str] = []
    warnings: list[str] = []
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="discover") as pool:
        for ds in datasets:
            ds_samples, ds_problems, ds_warnings = _scan_dataset(ds, alignment, seed, pool, rule)
            if ds.conditioning_data and ds_samples:
                ds_samples, pair_problems = pair_references(ds, ds_samples, spec, pool)
                ds_problems = ds_problems + pair_problems
            samples.extend(ds_samples)
            problems.extend(ds_problems)
            warnings.extend(ds_warnings)
    if problems:
        raise DatasetError(problems, _hint(problems))
    warnings.extend(_duplicate_warnings(samples))

    index = DatasetIndex(samples=samples, warnings=warnings)
    for w in warnings:
        logger.warning("%s", w)
    videos = sum(1 for s in samples if s.is_video)
    logger.info(
        "found %d image(s) and %d video(s) in %d dataset(s), %d bucket(s): %s",
        len(samples) - videos,
        videos,
        len(datasets),
        len(index.buckets()),
        ", ".join(f"{bucket_label(b)}: {len(ix)}" for b, ix in index.buckets().items()),
    )
    return index
