"""Dataset discovery: which files become samples, with which captions, and how problems are reported.

Every image is drawn with PIL into ``tmp_path`` by the test itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.data import DatasetIndex, discover, load_pixels
from trainer_core.errors import DatasetError
from trainer_core.io_utils import file_identity
from trainer_core.spec import DatasetSpec, TrainSpec

ALIGN = 64


# ---------------------------------------------------------------------------- helpers


def draw(path: Path, size: tuple[int, int] = (96, 64), color=(200, 30, 30), mode: str = "RGB", **save) -> Path:
    """Write a solid image of ``size`` (width, height) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def noise(path: Path, size: tuple[int, int] = (128, 128)) -> Path:
    """Write a noisy RGB image (noise compresses badly, so truncating it removes pixel data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def caption(image: Path, text: str) -> None:
    image.with_suffix(".txt").write_text(text)


def spec(*datasets: DatasetSpec, seed: int = 42) -> TrainSpec:
    return TrainSpec(datasets=list(datasets), training={"seed": seed})


def dataset(folder: Path, id: str = "photos", **options) -> DatasetSpec:
    options.setdefault("resolution", 256)
    return DatasetSpec(id=id, instance_data_dir=str(folder), **options)


def only_captions(index: DatasetIndex) -> dict[str, tuple[str, ...]]:
    return {s.path.name: s.captions for s in index.samples}


# ---------------------------------------------------------------------------- captions


def test_textfile_keeps_every_non_empty_line_as_an_alternative_caption(tmp_path):
    draw(tmp_path / "fox.png")
    caption(tmp_path / "fox.png", "  a red fox in snow \n\n\na fox, winter\n   \n")
    index = discover(spec(dataset(tmp_path, caption_strategy="textfile")), ALIGN)
    assert only_captions(index) == {"fox.png": ("a red fox in snow", "a fox, winter")}


def test_prepend_instance_prompt_prefixes_each_caption(tmp_path):
    draw(tmp_path / "fox.png")
    caption(tmp_path / "fox.png", "in snow\nat night")
    ds = dataset(tmp_path, caption_strategy="textfile", prepend_instance_prompt=True, instance_prompt="sks fox")
    assert only_captions(discover(spec(ds), ALIGN)) == {"fox.png": ("sks fox in snow", "sks fox at night")}


def test_filename_strategy_reads_underscores_and_dashes_as_spaces(tmp_path):
    draw(tmp_path / "a_red-fox__in   snow.jpg")
    index = discover(spec(dataset(tmp_path, caption_strategy="filename")), ALIGN)
    assert only_captions(index) == {"a_red-fox__in   snow.jpg": ("a red fox in snow",)}


def test_filename_strategy_with_prepended_instance_prompt(tmp_path):
    draw(tmp_path / "red_fox.png")
    ds = dataset(tmp_path, caption_strategy="filename", prepend_instance_prompt=True, instance_prompt="sks")
    assert only_captions(discover(spec(ds), ALIGN)) == {"red_fox.png": ("sks red fox",)}


def test_instanceprompt_strategy_gives_every_image_the_instance_prompt(tmp_path):
    draw(tmp_path / "one.png")
    draw(tmp_path / "two.png")
    index = discover(spec(dataset(tmp_path, caption_strategy="instanceprompt", instance_prompt="sks dog")), ALIGN)
    assert only_captions(index) == {"one.png": ("sks dog",), "two.png": ("sks dog",)}


# ---------------------------------------------------------------------------- which files


def test_images_are_found_recursively_sorted_by_relative_path_and_other_files_ignored(tmp_path):
    for rel in ["b.PNG", "a/z.jpeg", "a/y.JPG", "c.webp", "d.bmp", ".hidden.png", ".cache/x.png"]:
        draw(tmp_path / rel)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "latents.pt").write_bytes(b"\0")
    index = discover(spec(dataset(tmp_path, caption_strategy="filename")), ALIGN)
    assert [s.path.relative_to(tmp_path).as_posix() for s in index.samples] == [
        "a/y.JPG",
        "a/z.jpeg",
        "b.PNG",
        "c.webp",
        "d.bmp",
    ]


def test_samples_carry_dataset_id_size_identity_and_repeats(tmp_path):
    img = draw(tmp_path / "wide.png", (300, 200))
    index = discover(spec(dataset(tmp_path, id="wide", caption_strategy="filename", repeats=3)), ALIGN)
    (sample,) = index.samples
    assert sample.dataset_id == "wide"
    assert sample.path == img
    assert sample.source_size == (300, 200)
    assert sample.identity == file_identity(img)
    assert sample.repeats == 3
    assert sample.plan.bucket[0] % ALIGN == 0
    assert sample.plan.bucket[1] % ALIGN == 0


def test_exif_rotated_photos_are_measured_upright(tmp_path):
    """A phone photo stored 200x100 with 'rotate 90°' in its EXIF is trained as 100x200."""
    exif = Image.Exif()
    exif[0x0112] = 6
    draw(tmp_path / "phone.jpg", (200, 100), exif=exif)
    (sample,) = discover(spec(dataset(tmp_path, caption_strategy="filename")), ALIGN).samples
    assert sample.source_size == (100, 200)
    assert sample.plan.bucket[0] < sample.plan.bucket[1]
    assert load_pixels(sample).shape == (3, sample.plan.bucket[1], sample.plan.bucket[0])


def test_disabled_and_text_embed_datasets_are_skipped(tmp_path):
    draw(tmp_path / "ok" / "a.png")
    index = discover(
        spec(
            dataset(tmp_path / "ok", caption_strategy="filename"),
            DatasetSpec(id="off", instance_data_dir=str(tmp_path / "missing"), disabled=True),
            DatasetSpec(id="text", dataset_type="text_embeds", default=True),
        ),
        ALIGN,
    )
    assert [s.dataset_id for s in index.samples] == ["photos"]


def test_a_spec_without_image_datasets_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no enabled image dataset"):
        discover(spec(DatasetSpec(id="text", dataset_type="text_embeds")), ALIGN)


def test_seed_defaults_to_the_training_seed(tmp_path):
    for i in range(4):
        draw(tmp_path / f"{i}.png", (400, 256))
    ds = dataset(tmp_path, caption_strategy="filename", crop=True, crop_aspect="square", crop_style="random")
    plans = lambda index: [s.plan for s in index.samples]  # noqa: E731
    assert plans(discover(spec(ds, seed=7), ALIGN)) == plans(discover(spec(ds, seed=123), ALIGN, seed=7))


def test_index_groups_samples_by_bucket(tmp_path):
    draw(tmp_path / "sq1.png", (100, 100))
    draw(tmp_path / "sq2.png", (120, 120))
    draw(tmp_path / "wide.png", (200, 100))
    index = discover(spec(dataset(tmp_path, caption_strategy="filename", resolution=128)), ALIGN)
    assert index.buckets() == {(128, 128): [0, 1], (192, 64): [2]}


def test_heavily_upscaled_images_are_a_warning_not_an_error(tmp_path):
    draw(tmp_path / "tiny.png", (32, 32))
    index = discover(spec(dataset(tmp_path, caption_strategy="filename", resolution=256)), ALIGN)
    assert len(index.samples) == 1
    assert any("tiny.png" in w and "enlarged" in w for w in index.warnings)


def test_identical_files_are_a_warning(tmp_path):
    draw(tmp_path / "a.png")
    draw(tmp_path / "copy_of_a.png")
    index = discover(spec(dataset(tmp_path, caption_strategy="filename")), ALIGN)
    assert any("identical" in w and "copy_of_a.png" in w for w in index.warnings)


# ---------------------------------------------------------------------------- problems


def test_every_problem_of_every_dataset_is_reported_in_one_error(tmp_path):
    missing = tmp_path / "does-not-exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")

    photos = tmp_path / "photos"
    caption(draw(photos / "good.png", (512, 512)), "fine")
    no_caption = draw(photos / "no_caption.png", (512, 512))
    blank = draw(photos / "blank_caption.png", (512, 512))
    caption(blank, "  \n\n")
    small = draw(photos / "small.png", (100, 80))
    caption(small, "too small")

    broken_png = noise(photos / "broken.png")
    broken_png.write_bytes(broken_png.read_bytes()[: broken_png.stat().st_size // 2])
    caption(broken_png, "truncated png")
    broken_jpg = photos / "broken.jpg"
    noise(photos / "tmp.png")
    Image.open(photos / "tmp.png").save(broken_jpg, quality=95)
    (photos / "tmp.png").unlink()
    broken_jpg.write_bytes(broken_jpg.read_bytes()[:600])
    caption(broken_jpg, "truncated jpeg")
    not_an_image = photos / "fake.webp"
    not_an_image.write_text("hello")
    caption(not_an_image, "fake")

    with pytest.raises(DatasetError) as err:
        discover(
            spec(
                dataset(missing, id="gone"),
                dataset(empty, id="empty"),
                dataset(photos, id="photos", resolution_type="pixel", minimum_image_size=256),
            ),
            ALIGN,
        )
    message = str(err.value)
    problems = err.value.problems

    assert any("does not exist" in p and str(missing) in p for p in problems)
    assert any("holds no images" in p and str(empty) in p for p in problems)
    assert any(
        "missing caption file" in p and str(no_caption) in p and str(no_caption.with_suffix(".txt")) in p
        for p in problems
    )
    assert any("empty caption file" in p and str(blank.with_suffix(".txt")) in p for p in problems)
    assert any("truncated" in p and str(broken_png) in p for p in problems)
    assert any("truncated" in p and str(broken_jpg) in p for p in problems)
    assert any("unreadable image" in p and str(not_an_image) in p for p in problems)
    assert not any(str(small) in p for p in problems)  # below minimum_image_size: left out, not refused
    assert "good.png" not in message
    assert len(problems) == 7
    assert f"The dataset has {len(problems)} problem(s)" in message
    assert "How to fix:" in message
    assert "caption" in err.value.hint


def test_a_file_instead_of_a_folder_is_reported(tmp_path):
    not_a_dir = tmp_path / "file.png"
    draw(not_a_dir)
    with pytest.raises(DatasetError, match="is not a folder"):
        discover(spec(dataset(not_a_dir)), ALIGN)


@pytest.mark.parametrize(
    ("unit", "minimum", "size", "too_small"),
    [
        ("pixel", 256, (300, 255), True),  # shorter edge
        ("pixel", 256, (256, 900), False),
        ("pixel_area", 256, (512, 127), True),  # sqrt(512*127) = 255
        ("pixel_area", 256, (512, 128), False),  # sqrt(512*128) = 256
        ("area", 0.25, (512, 511), True),  # megapixels of 1024x1024 px
        ("area", 0.25, (512, 512), False),
    ],
)
def test_minimum_image_size_uses_the_resolution_unit(tmp_path, unit, minimum, size, too_small):
    draw(tmp_path / "img.png", size)
    resolution = 0.25 if unit == "area" else 256
    ds = dataset(
        tmp_path, caption_strategy="filename", resolution_type=unit, resolution=resolution, minimum_image_size=minimum
    )
    if too_small:  # the only image is left out, so nothing is left
        with pytest.raises(DatasetError, match=r"no image is left to train on; 1 below minimum_image_size"):
            discover(spec(ds), ALIGN)
    else:
        assert len(discover(spec(ds), ALIGN).samples) == 1


def test_prepend_instance_prompt_without_an_instance_prompt_is_a_problem(tmp_path):
    draw(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="prepend_instance_prompt but has no instance_prompt"):
        discover(spec(dataset(tmp_path, caption_strategy="filename", prepend_instance_prompt=True)), ALIGN)


def test_area_resolution_given_in_pixels_is_caught(tmp_path):
    draw(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="1024 megapixels"):
        discover(spec(dataset(tmp_path, caption_strategy="filename", resolution_type="area", resolution=1024)), ALIGN)


# ---------------------------------------------------------------------------- pixels


def test_load_pixels_gives_the_bucket_shape_in_minus_one_to_one(tmp_path):
    noise(tmp_path / "noise.png", (300, 200))
    (sample,) = discover(spec(dataset(tmp_path, caption_strategy="filename")), ALIGN).samples
    pixels = load_pixels(sample)
    width, height = sample.plan.bucket
    assert pixels.shape == (3, height, width)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0
    assert pixels.max() <= 1.0
    assert pixels.min() < -0.9
    assert pixels.max() > 0.9


def test_load_pixels_converts_rgba_and_greyscale_to_rgb(tmp_path):
    draw(tmp_path / "opaque_red.png", (64, 64), (255, 0, 0, 255), mode="RGBA")
    draw(tmp_path / "transparent.png", (64, 64), (0, 0, 0, 0), mode="RGBA")
    draw(tmp_path / "grey.png", (64, 64), 0, mode="L")
    draw(tmp_path / "palette.bmp", (64, 64), 3, mode="P")
    index = discover(spec(dataset(tmp_path, caption_strategy="filename", resolution=64)), ALIGN)
    pixels = {s.path.stem: load_pixels(s) for s in index.samples}
    assert all(p.shape == (3, 64, 64) for p in pixels.values())
    assert pixels["opaque_red"][:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert pixels["transparent"][:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # composited on white
    assert pixels["grey"][:, 0, 0].tolist() == [-1.0, -1.0, -1.0]


def test_load_pixels_applies_the_crop_plan(tmp_path):
    """A 2:1 image, left half black and right half white, square-cropped at the top-left corner."""
    img = Image.new("RGB", (256, 128), (0, 0, 0))
    img.paste((255, 255, 255), (128, 0, 256, 128))
    img.save(tmp_path / "half.png")
    ds = dataset(tmp_path, caption_strategy="filename", resolution=128, crop=True, crop_aspect="square")
    corner = discover(spec(ds.model_copy(update={"crop_style": "corner"})), ALIGN).samples[0]
    assert corner.plan.crop_box == (0, 0, 128, 128)
    assert load_pixels(corner).max() == -1.0  # only the black half
    centre = discover(spec(ds.model_copy(update={"crop_style": "center"})), ALIGN).samples[0]
    pixels = load_pixels(centre)
    assert pixels[:, :, 0].max() == -1.0
    assert pixels[:, :, -1].min() == 1.0


def test_load_pixels_refuses_a_file_that_changed_size_since_discovery(tmp_path):
    path = draw(tmp_path / "a.png", (128, 128))
    (sample,) = discover(spec(dataset(tmp_path, caption_strategy="filename")), ALIGN).samples
    draw(path, (64, 64))
    with pytest.raises(DatasetError, match="when the dataset was scanned"):
        load_pixels(sample)


# ----------------------------------------------------------------------------- files SimpleTuner excludes
def test_images_below_minimum_image_size_are_left_out_and_listed_not_fatal(tmp_path):
    # SimpleTuner excludes them; one small photo used to stop the whole run.
    draw(tmp_path / "big.png", (300, 300))
    draw(tmp_path / "small.png", (100, 80))  # no caption either: left out, so that no longer matters
    draw(tmp_path / "tiny.png", (40, 40))
    caption(tmp_path / "big.png", "a big one")
    caption(tmp_path / "tiny.png", "a tiny one")
    index = discover(spec(dataset(tmp_path, resolution_type="pixel", minimum_image_size=256)), ALIGN)
    assert [s.path.name for s in index.samples] == ["big.png"]
    (report,) = [w for w in index.warnings if "left out" in w]
    assert report.startswith("dataset 'photos': 2 image(s) below minimum_image_size, left out: ")
    assert f"{tmp_path / 'small.png'} is 100x80, minimum 256 px" in report and "tiny.png is 40x40" in report


def test_a_dataset_left_empty_by_minimum_image_size_is_refused_with_the_list(tmp_path):
    draw(tmp_path / "small.png", (100, 80))
    with pytest.raises(DatasetError) as err:
        discover(spec(dataset(tmp_path, caption_strategy="filename", minimum_image_size=256)), ALIGN)
    (problem,) = err.value.problems
    assert "dataset 'photos': no image is left to train on; 1 below minimum_image_size were left out" in problem
    assert "small.png is 100x80" in problem and "minimum_image_size" in err.value.hint


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        ({"minimum_aspect_ratio": 0.9}, ["square.png", "wide.png"]),
        ({"maximum_aspect_ratio": 1.2}, ["square.png", "tall.png"]),
        ({"minimum_aspect_ratio": 0.9, "maximum_aspect_ratio": 1.1}, ["square.png"]),
    ],
)
def test_aspect_ratio_limits_leave_out_files_outside_them(tmp_path, options, kept):
    draw(tmp_path / "tall.png", (128, 256))  # buckets keep the aspect (crop off): 0.5
    draw(tmp_path / "square.png", (192, 192))
    draw(tmp_path / "wide.png", (256, 128))  # 2.0
    index = discover(spec(dataset(tmp_path, caption_strategy="filename", crop=False, **options)), ALIGN)
    assert sorted(s.path.name for s in index.samples) == kept
    (report,) = [w for w in index.warnings if "left out" in w]
    assert f"{3 - len(kept)} image(s) outside minimum/maximum_aspect_ratio, left out" in report
    if "minimum_aspect_ratio" in options:
        assert "tall.png: aspect 0.5 < minimum_aspect_ratio 0.9" in report


def test_aspect_ratio_limits_import_and_export_under_simpletuners_keys(tmp_path):
    from trainer_core.errors import ConfigError
    from trainer_core.simpletuner import export_simpletuner, import_simpletuner

    entry = {"id": "p", "instance_data_dir": str(tmp_path), "minimum_aspect_ratio": 0.5, "maximum_aspect_ratio": 3}
    imported = import_simpletuner({"max_train_steps": 1}, [entry])
    assert imported.unsupported_keys == []
    ds = imported.spec.datasets[0]
    assert (ds.minimum_aspect_ratio, ds.maximum_aspect_ratio) == (0.5, 3.0)
    _, backend = export_simpletuner(imported.spec)
    assert (backend[0]["minimum_aspect_ratio"], backend[0]["maximum_aspect_ratio"]) == (0.5, 3.0)
    with pytest.raises(ConfigError, match="minimum_aspect_ratio 2 is above maximum_aspect_ratio 1"):
        import_simpletuner({}, [{**entry, "minimum_aspect_ratio": 2, "maximum_aspect_ratio": 1}])


# ----------------------------------------------------------------------------- GIFs
def test_gifs_train_their_first_frame_with_their_caption_and_animated_ones_are_listed(tmp_path):
    # They used to be skipped without a word, captions and all. SimpleTuner trains every format PIL opens.
    from trainer_core.data.images import load_pixels

    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    caption(tmp_path / "moving.gif", "a flashing square")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "still.gif")
    caption(tmp_path / "still.gif", "a green square")
    index = discover(spec(dataset(tmp_path, resolution=64)), ALIGN)
    assert only_captions(index) == {"moving.gif": ("a flashing square",), "still.gif": ("a green square",)}
    (report,) = [w for w in index.warnings if "animated" in w]
    assert report.startswith("dataset 'photos': 1 animated image(s), only the first frame of each is trained")
    assert f"{tmp_path / 'moving.gif'} (3 frames)" in report and "still.gif" not in report
    moving = next(s for s in index.samples if s.path.name == "moving.gif")
    red = load_pixels(moving).mean(dim=(1, 2))  # the first frame, red, in [-1, 1]
    assert red[0] > 0.9 and red[1] < -0.9 and red[2] < -0.9
