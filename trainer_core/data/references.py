"""Reference images for image editing (Kandinsky 5 i2i), declared as SimpleTuner declares them.

An image dataset names a ``dataset_type: conditioning`` dataset in ``conditioning_data``; with
``conditioning_type: reference_strict`` every training image has exactly one reference image with
the same path relative to its dataset folder, extension aside (``edits/cat.png`` pairs with
``refs/cat.jpg``). Every training image without a reference and every reference without a training
image is reported up front, by file, with the rest of the dataset problems.

A reference is planned to its target's bucket. A reference with its target's aspect ratio (the usual
edit pair) gets exactly its target's resize and crop box, so a cropped target (random crops, crop
aspects) still lines up pixel for pixel with its reference; any other reference is resized to cover
the bucket and centre-cropped, as the authors fit the source image to the output size. It becomes a
:class:`.discovery.Sample` of its own (``sample.reference``), so the latent cache encodes and keys it
like any image: editing the reference, or anything that moves its target to another bucket or crop,
re-encodes exactly that pair.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..io_utils import file_identity
from ..spec import DatasetSpec, TrainSpec
from .buckets import fit_plan
from .images import IMAGE_EXTENSIONS, ImageProblem, probe_image
from .listing import list_files
from .types import Sample


def _stem_key(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


ASPECT_TOLERANCE = 0.01  # relative: sizes that differ by rounding still count as the same aspect ratio


def reference_sample(
    path: Path, source_size: tuple[int, int], bucket: tuple[int, int], dataset_id: str, identity: str, target=None
):
    """A reference image as a Sample of ``bucket`` pixels: the target's crop when the aspect ratios
    match, else fitted (cover + centre crop)."""
    plan = fit_plan(source_size, bucket)
    if target is not None:
        (tw, th), (rw, rh) = target.source_size, source_size
        if abs((rw / rh) / (tw / th) - 1) <= ASPECT_TOLERANCE:
            plan = target.plan  # same picture geometry: the same resize and crop box keep the pair aligned
    return Sample(
        dataset_id=dataset_id,
        path=path,
        captions=(),
        source_size=source_size,
        plan=plan,
        identity=identity,
        repeats=0,
    )


def probe_reference(path: Path, bucket: tuple[int, int], dataset_id: str):
    """A reference Sample for one image file (validation inputs); raises ImageProblem if it is unreadable."""
    return reference_sample(path, probe_image(path), bucket, dataset_id, file_identity(path))


def pair_references(
    ds: DatasetSpec, samples: list, spec: TrainSpec, pool: ThreadPoolExecutor
) -> tuple[list, list[str]]:
    """``samples`` of dataset ``ds`` with their ``reference`` set, and the problems found (by file)."""
    cond = next(d for d in spec.datasets if d.id == ds.conditioning_data)
    problems: list[str] = []
    if cond.disabled:
        return samples, [f"dataset {ds.id!r}: its conditioning dataset {cond.id!r} is disabled"]
    root = Path(ds.instance_data_dir or "").expanduser().absolute()
    cond_root = Path(cond.instance_data_dir or "").expanduser().absolute()
    if not cond_root.is_dir():
        return samples, [f"instance_data_dir of conditioning dataset {cond.id!r} is not a folder: {cond_root}"]
    by_key: dict[str, list[Path]] = {}
    for p in list_files(cond_root, IMAGE_EXTENSIONS):
        by_key.setdefault(_stem_key(p, cond_root), []).append(p)
    if not by_key:
        return samples, [f"conditioning dataset {cond.id!r} holds no images: {cond_root}"]
    for key, paths in by_key.items():
        if len(paths) > 1:
            problems.append(
                f"conditioning dataset {cond.id!r}: several references for {key!r}: " + ", ".join(str(p) for p in paths)
            )

    def probe(path: Path) -> tuple[tuple[int, int] | None, str | None]:
        try:
            return probe_image(path), None
        except ImageProblem as e:
            return None, str(e)

    wanted = {_stem_key(s.path, root): s for s in samples}
    matched = {k: by_key[k][0] for k in wanted if k in by_key and len(by_key[k]) == 1}
    sizes = dict(zip(matched, pool.map(probe, matched.values())))
    out = []
    for key, sample in wanted.items():
        if key not in by_key:
            problems.append(
                f"{sample.path}: no reference image {key}.* in conditioning dataset {cond.id!r} ({cond_root})"
            )
            continue
        if key not in matched:
            continue
        size, problem = sizes[key]
        if problem:
            problems.append(f"{problem} (reference of {sample.path})")
            continue
        assert size is not None
        ref = reference_sample(matched[key], size, sample.plan.bucket, ds.id, file_identity(matched[key]), sample)
        out.append(dataclasses.replace(sample, reference=ref))
    present = {_stem_key(p, root) for p in list_files(root, IMAGE_EXTENSIONS)}  # also files refused for other reasons
    for key, paths in by_key.items():
        if key not in present:
            problems.append(f"{paths[0]}: reference image has no training image {key}.* in dataset {ds.id!r} ({root})")
    return out, problems
