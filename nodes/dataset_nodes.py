"""Build Dataset: one folder of images with captions, as one entry of the TrainSpec's datasets.

Nodes chain (a dataset input feeds the next node) to combine several folders, like entries of
SimpleTuner's ``multidatabackend.json``. The folder is checked here, with the trainer's own
discovery, so a missing caption or a broken image is reported on this node, with every offending
file named, before any model loads. ``fingerprint_inputs`` hashes the folder's contents, so adding
or editing files makes ComfyUI run this node (and the training after it) again.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io, ui

from ..trainer_core.errors import DatasetError
from ..trainer_core.spec import TrainSpec
from . import comfy_bridge as bridge
from .run_spec import checked_dataset, dataset_content_fingerprint, slug, unique_dataset_ids
from .sockets import CATEGORY_DATA, TunerDataset

CAPTION_STRATEGIES = ["textfile", "filename", "instanceprompt"]
RESOLUTION_TYPES = ["pixel_area", "pixel", "area"]
CROP_STYLES = ["center", "random", "corner"]
CROP_ASPECTS = ["square", "closest", "preserve", "random"]
CHECK_ALIGNMENT = 64  # bucket step used only for this up-front check; the trainer uses the family's


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


def check_dataset(entry: dict) -> int:
    """Run the trainer's discovery on this one dataset; returns the number of images."""
    from ..trainer_core.data.discovery import discover

    index = discover(TrainSpec.model_validate({"datasets": [entry]}), alignment=CHECK_ALIGNMENT)
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
                    tooltip="Folder of images (png, jpg, webp...). Absolute, or relative to ComfyUI's input folder. "
                    "Subfolders are included.",
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
                    "means about 1024x1024 pixels at any aspect ratio.",
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
                    tooltip="Crop images to their bucket instead of resizing the whole image into it.",
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
                TunerDataset.Input(
                    "dataset",
                    optional=True,
                    tooltip="Datasets built so far: this folder is added to them.",
                ),
            ],
            outputs=[TunerDataset.Output("dataset", tooltip="The datasets so far, this one included.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", **kwargs: object) -> str:
        try:
            return dataset_content_fingerprint(resolve_folder(folder))
        except DatasetError:
            return "missing"

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
        dataset: dict | None = None,
    ) -> io.NodeOutput:
        path = resolve_folder(folder)
        prompt = instance_prompt.strip()
        entry = checked_dataset(
            {
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
        count = check_dataset(entry)
        datasets = unique_dataset_ids([*((dataset or {}).get("datasets") or []), entry])
        text = f"{count} image(s) in {path} ({caption_strategy} captions); {len(datasets)} dataset(s) in total"
        return io.NodeOutput({"datasets": datasets}, ui=ui.PreviewText(text))


NODES = [TunerBuildDataset]
