"""Dataset discovery: find every training image, its captions and its bucket before any model loads.

Loading a 10 GB model only to fail on the 300th image is the worst user experience a trainer
can give, so :func:`discover` checks *every* enabled image dataset up front (folders, captions,
full decodes for corrupt files, minimum sizes) and raises one :class:`DatasetError` listing
every problem with the file it concerns. What it returns is a frozen description of the run's
data: the same files, captions, buckets and crops on every start with the same seed.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from ..io_utils import file_identity
from ..spec import DatasetSpec, TrainSpec
from .buckets import CropPlan, geometry_problems, minimum_size_problem, plan_crop
from .captions import CaptionProblem, captions_for
from .images import IMAGE_EXTENSIONS, ImageProblem, is_image_file, probe_image

logger = logging.getLogger(__name__)

UPSCALE_WARNING_FACTOR = 2.0
"""Images enlarged more than this to reach their bucket are reported (they train blurry)."""

_MAX_WORKERS = 8  # decoding releases the GIL; more threads than this mostly contend for the disk


@dataclass(frozen=True)
class Sample:
    """One training image: where it is, what it says, and how it is cut to its bucket."""

    dataset_id: str
    path: Path
    captions: tuple[str, ...]  # alternatives; the trainer picks one per step
    source_size: tuple[int, int]  # (width, height) after EXIF orientation
    plan: CropPlan
    identity: str  # io_utils.file_identity(path): cache key of the file's content
    repeats: int  # extra passes per epoch; the sample is seen 1 + repeats times


@dataclass
class DatasetIndex:
    """Every sample of the run, in a deterministic order, plus non-fatal notes for the user."""

    samples: list[Sample]
    warnings: list[str] = field(default_factory=list)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """bucket (width, height) -> indices into ``samples``; buckets sorted, indices ascending."""
        out: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            out[s.plan.bucket].append(i)
        return {b: out[b] for b in sorted(out)}

    def __len__(self) -> int:
        return len(self.samples)


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively, following folder links once), sorted by relative path.

    Hidden files and folders are skipped: macOS leaves ``._name.jpg`` resource forks next to
    copied photos, which look like images but are not.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop or the same folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_file(Path(f)))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class _Checked:
    """What checking one image produced: a sample, or the problems that prevent one."""

    sample: Sample | None
    problems: list[str]


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
    too_small = minimum_size_problem(path, size, ds)
    if too_small:
        problems.append(too_small)
    if problems:
        return _Checked(None, problems)
    key = path.relative_to(root).as_posix()
    plan = plan_crop(size, ds, alignment, seed, key)
    sample = Sample(
        dataset_id=ds.id,
        path=path,
        captions=captions,
        source_size=size,
        plan=plan,
        identity=file_identity(path),
        repeats=ds.repeats,
    )
    return _Checked(sample, [])


def _dataset_problems(ds: DatasetSpec, alignment: int) -> list[str]:
    """Problems of the dataset as a whole, found without looking at its images."""
    problems = geometry_problems(ds, alignment)
    if (
        ds.prepend_instance_prompt
        and ds.caption_strategy != "instanceprompt"
        and not (ds.instance_prompt or "").strip()
    ):
        problems.append(f"dataset {ds.id!r} sets prepend_instance_prompt but has no instance_prompt to prepend")
    return problems


def _scan_dataset(
    ds: DatasetSpec, alignment: int, seed: int, pool: ThreadPoolExecutor
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
    paths = list_images(root)
    if not paths:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        return [], [f"instance_data_dir of dataset {ds.id!r} holds no images ({exts}): {root}"], []

    checked = list(pool.map(lambda p: _check_image(p, root, ds, alignment, seed), paths))
    samples = [c.sample for c in checked if c.sample is not None]
    problems = [p for c in checked for p in c.problems]

    warnings: list[str] = []
    blurry = [s for s in samples if s.plan.resize[0] / s.source_size[0] > UPSCALE_WARNING_FACTOR]
    if blurry:
        worst = min(blurry, key=lambda s: s.source_size[0] * s.source_size[1])
        warnings.append(
            f"dataset {ds.id!r}: {len(blurry)} image(s) are enlarged more than {UPSCALE_WARNING_FACTOR:g}x to fit "
            f"their bucket and will look soft (smallest: {worst.path}, {worst.source_size[0]}x{worst.source_size[1]}); "
            "set minimum_image_size to refuse them or lower the resolution"
        )
    return samples, problems, warnings


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
    if "corrupt" in text or "unreadable" in text or "too large" in text:
        hints.append("re-export or delete the broken image files")
    if "minimum size" in text:
        hints.append("remove the small images, or lower minimum_image_size")
    hints.append("then start again; every problem is listed, so one pass of fixes is enough")
    return "; ".join(hints)


def discover(spec: TrainSpec, alignment: int, seed: int | None = None) -> DatasetIndex:
    """Scan every enabled image dataset of ``spec`` and plan its buckets.

    ``alignment`` is the family's bucket step in pixels (64 for Lumina 2). ``seed`` fixes
    random crops and random crop aspects per file; it defaults to ``spec.training.seed``.
    Disabled datasets and ``text_embeds`` entries are skipped. Raises :class:`DatasetError`
    listing every problem of every dataset.
    """
    seed = spec.training.seed if seed is None else seed
    for ds in spec.datasets:
        if ds.disabled or ds.dataset_type != "image":
            logger.debug("skipping dataset %r (%s)", ds.id, "disabled" if ds.disabled else ds.dataset_type)
    datasets = spec.image_datasets
    if not datasets:
        raise DatasetError(
            ["no enabled image dataset: the spec has no dataset with dataset_type 'image' that is not disabled"],
            "add a dataset whose instance_data_dir is a folder of training images",
        )

    samples: list[Sample] = []
    problems: list[str] = []
    warnings: list[str] = []
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="discover") as pool:
        for ds in datasets:
            ds_samples, ds_problems, ds_warnings = _scan_dataset(ds, alignment, seed, pool)
            samples.extend(ds_samples)
            problems.extend(ds_problems)
            warnings.extend(ds_warnings)
    if problems:
        raise DatasetError(problems, _hint(problems))
    warnings.extend(_duplicate_warnings(samples))

    index = DatasetIndex(samples=samples, warnings=warnings)
    for w in warnings:
        logger.warning("%s", w)
    logger.info(
        "found %d image(s) in %d dataset(s), %d bucket(s): %s",
        len(samples),
        len(datasets),
        len(index.buckets()),
        ", ".join(f"{w}x{h}: {len(ix)}" for (w, h), ix in index.buckets().items()),
    )
    return index
