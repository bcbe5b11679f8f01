"""Build Dataset (+ Video Options): one folder of images or videos with captions, as one TrainSpec dataset.

Nodes chain (a dataset input feeds the next node) to combine several folders, like entries of
SimpleTuner's ``multidatabackend.json``. The folder is checked here, with the trainer's own
discovery, so a missing caption or a broken image or video is reported on this node, with every
offending file named, before any model loads. ``fingerprint_inputs`` hashes the folder's contents,
so adding or editing files makes ComfyUI run this node (and the training after it) again.

Video Options makes the dataset a ``dataset_type: video`` one: its output is the dataset's
``video`` block (SimpleTuner's keys). Frame counts the video models refuse (Kandinsky 5: 4k+1
frames) fail on Video Options with the model family's own message, nearest valid counts included;
Train LoRA checks them again against the chosen flavour (image-to-video needs at least 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from comfy_api.latest import io, ui
from pydantic import ValidationError

from ..trainer_core.errors import ConfigError, DatasetError
from ..trainer_core.spec import TrainSpec, VideoSpec, build_spec, format_validation_error
from . import comfy_bridge as bridge
from .run_spec import checked_dataset, dataset_content_fingerprint, slug, unique_dataset_ids
from .sockets import CATEGORY_DATA, TunerDataset, TunerVideo

CAPTION_STRATEGIES = ["textfile", "filename", "instanceprompt"]
RESOLUTION_TYPES = ["pixel_area", "pixel", "area"]
CROP_STYLES = ["center", "random", "corner"]
CROP_ASPECTS = ["square", "closest", "preserve", "random"]
CHECK_ALIGNMENT = 64  # bucket step used only for this up-front check; the trainer uses the family's
BUCKET_STRATEGIES = [str(v) for v in get_args(VideoSpec.model_fields["bucket_strategy"].annotation)]
PROBE_ID = "video-options"  # the stand-in dataset id under which Video Options asks the families


def resolve_folder(folder: str) -> Path:
    """An absolute folder as is; a relative one inside ComfyUI's input folder if it is there."""
    text = folder.strip()
    if not text:
        raise DatasetError(["no folder given"], "type the path of a folder of images (and .txt captions)")
    path = Path(text).expanduser()
    if not path.is_absolute():
        inside_input = bridge.input_dir() / path
        path = inside_input if inside_input.exists() else path.absolute()
    if not path.is_dir():
        raise DatasetError(
            [f"{path}: folder does not exist"],
            "use an absolute path, or a folder inside ComfyUI's input folder; check for a trailing space",
        )
    return path


def check_dataset(entry: dict | list[dict]) -> int:
    """Run the trainer's discovery on this one dataset (with its reference dataset, if any); returns the
    number of images (or videos, or reference pairs)."""
    from ..trainer_core.data.discovery import discover

    entries = entry if isinstance(entry, list) else [entry]
    index = discover(TrainSpec.model_validate({"datasets": entries}), alignment=CHECK_ALIGNMENT)
    return len(index.samples)


class TunerBuildDataset(io.ComfyNode):
    """Build Dataset: a folder of training images and how to caption, size and crop them."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerBuildDataset",
            display_name="Build Dataset",
            category=CATEGORY_DATA,
            description="A folder of training images with their captions. Chain several to train on all of them.",
            inputs=[
                io.String.Input(
                    "folder",
                    default="",
                    tooltip="Folder of images (png, jpg, webp...), or of videos (mp4, mov, webm, mkv) when Video "
                    "Options is connected. Absolute, or relative to ComfyUI's input folder. Subfolders are included.",
                ),
                io.Combo.Input(
                    "caption_strategy",
                    options=CAPTION_STRATEGIES,
                    default="textfile",
                    tooltip="textfile: a .txt next to each image with the same name; filename: the file name is "
                    "the caption; instanceprompt: every image gets the instance prompt.",
                ),
                io.String.Input(
                    "instance_prompt",
                    default="",
                    tooltip="With 'instanceprompt': the caption of every image. With the other strategies: if set, "
                    "put before each caption (a trigger word).",
                ),
                io.Float.Input(
                    "resolution",
                    default=1024.0,
                    min=0.01,
                    max=8192.0,
                    step=64.0,
                    tooltip="Training size: pixels (pixel, pixel_area) or megapixels (area). 1024 with pixel_area "
                    "means about 1024x1024 pixels at any aspect ratio. For videos use 512 or less (Kandinsky 5 "
                    "video's own training size): every frame is this large.",
                ),
                io.Combo.Input(
                    "resolution_type",
                    options=RESOLUTION_TYPES,
                    default="pixel_area",
                    tooltip="pixel_area: the area of a resolution x resolution square; pixel: the shorter side; "
                    "area: megapixels.",
                ),
                io.Boolean.Input(
                    "crop",
                    default=False,
                    tooltip="Crop images (or video frames) to their bucket instead of resizing the whole picture "
                    "into it.",
                ),
                io.Combo.Input(
                    "crop_style",
                    options=CROP_STYLES,
                    default="center",
                    tooltip="Where to crop when crop is on.",
                ),
                io.Combo.Input(
                    "crop_aspect",
                    options=CROP_ASPECTS,
                    default="square",
                    tooltip="The shape to crop to: square, the closest bucket, the image's own aspect, or random.",
                ),
                io.Int.Input(
                    "repeats",
                    default=0,
                    min=0,
                    max=1000,
                    tooltip="Extra passes over this folder per epoch (0 = each image once). Balances a small "
                    "folder against a large one.",
                ),
                io.String.Input(
                    "dataset_id",
                    default="",
                    tooltip="A name for this dataset in logs and caches. Empty uses the folder name.",
                ),
                io.String.Input(
                    "reference_folder",
                    default="",
                    optional=True,
                    tooltip="Image editing (Kandinsky 5 i2i flavours): a folder of reference (source) images, one per "
                    "training image with the same file name (refs/cat.jpg pairs with cat.png here); the training "
                    "images are the edited results and their captions the edit instructions. Empty for "
                    "text-to-image or video.",
                ),
                TunerDataset.Input(
                    "dataset",
                    optional=True,
                    tooltip="Datasets built so far: this folder is added to them.",
                ),
                TunerVideo.Input(
                    "video",
                    optional=True,
                    tooltip="Video Options: makes this a video dataset (clip length, frame rate, frame buckets). "
                    "Leave unconnected for images. Video datasets train Kandinsky 5 video flavours.",
                ),
            ],
            outputs=[TunerDataset.Output("dataset", tooltip="The datasets so far, this one included.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", reference_folder: str = "", **kwargs: object) -> str:
        parts = []
        for text in (folder, reference_folder):
            if not (text or "").strip():
                continue
            try:
                parts.append(dataset_content_fingerprint(resolve_folder(text)))
            except DatasetError:
                parts.append("missing")
        return "|".join(parts) or "missing"

    @classmethod
    def execute(
        cls,
        folder: str,
        caption_strategy: str,
        instance_prompt: str,
        resolution: float,
        resolution_type: str,
        crop: bool,
        crop_style: str,
        crop_aspect: str,
        repeats: int,
        dataset_id: str,
        reference_folder: str = "",
        dataset: dict | None = None,
        video: dict | None = None,
    ) -> io.NodeOutput:
        path = resolve_folder(folder)
        prompt = instance_prompt.strip()
        kind = {"dataset_type": "video", "video": dict(video["video"])} if video else {}
        entry = checked_dataset(
            {
                **kind,
                "id": slug(dataset_id or path.name, default="dataset"),
                "instance_data_dir": str(path),
                "caption_strategy": caption_strategy,
                "instance_prompt": prompt or None,
                "prepend_instance_prompt": bool(prompt) and caption_strategy != "instanceprompt",
                "resolution": float(resolution),
                "resolution_type": resolution_type,
                "crop": bool(crop),
                "crop_style": crop_style,
                "crop_aspect": crop_aspect,
                "repeats": int(repeats),
            }
        )
        entries = [entry]
        if (reference_folder or "").strip():
            if video:
                raise ConfigError(
                    "reference_folder pairs reference images with training images (image editing); it does not "
                    "apply to a video dataset",
                    "disconnect Video Options, or clear reference_folder (image-to-video takes each clip's first "
                    "frame itself)",
                )
            refs = resolve_folder(reference_folder)
            ref_entry = checked_dataset(
                {
                    "id": f"{entry['id']}-refs",
                    "dataset_type": "conditioning",
                    "instance_data_dir": str(refs),
                    "conditioning_type": "reference_strict",
                }
            )
            entry.update(conditioning_data=ref_entry["id"], conditioning_type="reference_strict")
            entries = [ref_entry, entry]  # the reference dataset first: see unique_dataset_ids
        count = check_dataset(entries)
        datasets = unique_dataset_ids([*((dataset or {}).get("datasets") or []), *entries])
        what = "video(s)" if video else "image(s)" if len(entries) == 1 else "image pair(s)"
        text = f"{count} {what} in {path} ({caption_strategy} captions); {len(datasets)} dataset(s) in total"
        return io.NodeOutput({"datasets": datasets}, ui=ui.PreviewText(text))


def check_video_block(block: dict) -> list[str]:
    """Check a dataset's ``video`` block as the trainer will; raises ConfigError, returns the data layer's warnings.

    Three layers, each with its own message: the spec (types and ranges), the data layer
    (contradictions such as min_frames above max_frames) and the model families that train on
    video (frame-count rules). A frame count is refused only when no video family accepts it with
    its default flavour; the error is the family's own (Kandinsky 5: "not 4k+1; nearest valid: 57 or
    61"). Train LoRA repeats the family check with the chosen flavour.
    """
    from ..trainer_core.data.video import largest_4k_plus_1, video_spec_problems, video_spec_warnings

    try:
        VideoSpec.model_validate(block)
    except ValidationError as e:
        raise ConfigError(f"invalid video options:\n{format_validation_error(e)}") from None
    entry = checked_dataset({"id": PROBE_ID, "dataset_type": "video", "instance_data_dir": ".", "video": block})
    ds = TrainSpec.model_validate({"datasets": [entry]}).datasets[0]
    problems = [p.replace(f"dataset {PROBE_ID!r}: ", "") for p in video_spec_problems(ds)]
    if problems:
        raise ConfigError("; ".join(problems), "change the frame counts named above")
    family_frame_check(entry)
    return [w.replace(f"dataset {PROBE_ID!r}: ", "") for w in video_spec_warnings(ds, largest_4k_plus_1)]


def family_frame_check(entry: dict) -> None:
    """Refuse a video dataset that no video model family accepts (with its default flavour)."""
    from ..trainer_core.families import family_names, get_family_class
    from ..trainer_core.train.resolve import resolve_spec

    refusals: list[tuple[str, ConfigError]] = []
    for name in family_names():
        if not get_family_class(name).supports_video:
            continue
        spec = build_spec(
            {"model": {"model_family": name}, "training": {"max_train_steps": 1}, "datasets": [entry]},
            source="video options",
        )
        try:
            resolve_spec(spec)
            return
        except ConfigError as e:
            refusals.append((name, e))
    if refusals:
        name, first = refusals[0]
        raise ConfigError(f"{name}: " + first.message.replace(f"dataset {PROBE_ID!r}: ", ""), first.hint)


class TunerVideoOptions(io.ComfyNode):
    """Video Options: how clips are cut from the videos of one Build Dataset folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerVideoOptions",
            display_name="Video Options",
            category=CATEGORY_DATA,
            description="Turns Build Dataset into a video dataset: how many frames each training clip has, at "
            "which frame rate, and how clips are grouped. Clips are cut from the start of each video.",
            inputs=[
                io.Int.Input(
                    "num_frames",
                    default=61,
                    min=0,
                    max=1024,
                    tooltip="Frames per training clip (a shorter video trains on its own length). Kandinsky 5 needs "
                    "4k+1: 17, 33, 49, 61, 81, 121 (5 s at 24 fps). 0: each whole video, up to max_frames. More "
                    "frames need much more memory.",
                ),
                io.Int.Input(
                    "min_frames",
                    default=0,
                    min=0,
                    max=4096,
                    tooltip="Videos shorter than this (after frame_rate resampling) are left out and listed in a "
                    "warning, instead of failing the dataset. 0: none are left out.",
                ),
                io.Int.Input(
                    "max_frames",
                    default=0,
                    min=0,
                    max=4096,
                    tooltip="Longer videos are cut to this many frames first. 0: no cut.",
                ),
                io.Float.Input(
                    "frame_rate",
                    default=0.0,
                    min=0.0,
                    max=240.0,
                    step=1.0,
                    round=0.001,  # 23.976 and 29.97 stay what they are
                    tooltip="Resample clips to this many frames per second (nearest frames are picked, never "
                    "blended). 0 keeps each video's own rate. Kandinsky 5 renders at 24.",
                ),
                io.Combo.Input(
                    "bucket_strategy",
                    options=BUCKET_STRATEGIES,
                    default="aspect_ratio",
                    tooltip="aspect_ratio: clips are grouped by shape, all with num_frames frames. "
                    "resolution_frames: lengths are also rounded down to a multiple of frame_interval, so videos "
                    "of varied length collect in fewer, fuller size-and-length buckets.",
                ),
                io.Int.Input(
                    "frame_interval",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip="resolution_frames: clip lengths are rounded down to a multiple of this. 0: unset "
                    "(1). Ignored with aspect_ratio.",
                ),
            ],
            outputs=[TunerVideo.Output("video", tooltip="Video options for Build Dataset's video input.")],
        )

    @classmethod
    def execute(
        cls,
        num_frames: int,
        min_frames: int,
        max_frames: int,
        frame_rate: float,
        bucket_strategy: str,
        frame_interval: int,
    ) -> io.NodeOutput:
        block = {
            "num_frames": int(num_frames) or None,
            "min_frames": int(min_frames) or None,
            "max_frames": int(max_frames) or None,
            "frame_rate": float(frame_rate) or None,
            "bucket_strategy": bucket_strategy,
            "frame_interval": int(frame_interval) or None,
        }
        warnings = check_video_block(block)
        length = f"clips of {num_frames} frames" if num_frames else "whole videos"
        rate = f"at {frame_rate:g} fps" if frame_rate else "at each video's own frame rate"
        text = "\n".join([f"{length} {rate}, {bucket_strategy} buckets"] + [f"warning: {w}" for w in warnings])
        return io.NodeOutput({"video": block}, ui=ui.PreviewText(text))


NODES = [TunerBuildDataset, TunerVideoOptions]
