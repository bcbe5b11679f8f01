"""Aspect buckets and crop plans: the size each image trains at and the part of it that is kept.

Pure arithmetic on (width, height): no image files are needed. Alignment is Lumina 2's 64.
"""

from __future__ import annotations

import math

import pytest

from trainer_core.data.buckets import (
    DEFAULT_CROP_ASPECT_BUCKETS,
    MEGAPIXEL,
    CropPlan,
    geometry_problems,
    minimum_size_problem,
    plan_crop,
)
from trainer_core.errors import ConfigError
from trainer_core.spec import DatasetSpec

ALIGN = 64
SEED = 42


def ds(**options) -> DatasetSpec:
    return DatasetSpec(id="d", instance_data_dir="/data", **options)


def plan(size: tuple[int, int], key: str = "img.png", seed: int = SEED, alignment: int = ALIGN, **options) -> CropPlan:
    return plan_crop(size, ds(**options), alignment, seed, key)


def assert_consistent(p: CropPlan, alignment: int = ALIGN) -> None:
    """Invariants of every plan: aligned bucket, resize covers it, crop box is the bucket inside the resize."""
    bw, bh = p.bucket
    left, top, right, bottom = p.crop_box
    assert bw % alignment == 0
    assert bh % alignment == 0
    assert bw >= alignment
    assert bh >= alignment
    assert (right - left, bottom - top) == p.bucket
    assert left >= 0
    assert top >= 0
    assert right <= p.resize[0]
    assert bottom <= p.resize[1]


# ---------------------------------------------------------------------------- resolution units


def test_pixel_area_keeps_about_the_area_of_a_square_and_the_aspect_ratio():
    """1536x1024 at pixel_area 1024: ~1024² pixels at aspect 1.5, sides multiples of 64."""
    p = plan((1536, 1024), resolution=1024, resolution_type="pixel_area")
    assert p.bucket == (1280, 832)
    assert p.bucket[0] * p.bucket[1] == pytest.approx(1024 * 1024, rel=0.03)
    assert p.bucket[0] / p.bucket[1] == pytest.approx(1.5, rel=0.03)
    assert p.resize == (1280, 853)  # aspect kept, covers the bucket
    assert p.crop_box == (0, 10, 1280, 842)  # the rounding residue is trimmed, centred
    assert_consistent(p)


def test_pixel_makes_the_shorter_edge_the_resolution():
    assert plan((1536, 1024), resolution=1024, resolution_type="pixel").bucket == (1536, 1024)
    assert plan((768, 1024), resolution=512, resolution_type="pixel").bucket == (512, 704)  # 682.7 -> 704
    assert plan((4000, 3000), resolution=512, resolution_type="pixel").bucket == (704, 512)


def test_area_is_megapixels_of_1024x1024_pixels():
    """area 1.0 is the same as pixel_area 1024; area 0.25 the same as pixel_area 512."""
    assert MEGAPIXEL == 1024 * 1024
    for size in [(1536, 1024), (1000, 1000), (600, 1800), (4032, 3024)]:
        area = plan(size, resolution=1.0, resolution_type="area").bucket
        assert area == plan(size, resolution=1024, resolution_type="pixel_area").bucket
        quarter = plan(size, resolution=0.25, resolution_type="area").bucket
        assert quarter == plan(size, resolution=512, resolution_type="pixel_area").bucket
    assert plan((1536, 1024), resolution=0.25, resolution_type="area").bucket == (640, 448)


def test_defaults_are_pixel_area_1024():
    assert plan((1536, 1024)) == plan((1536, 1024), resolution=1024, resolution_type="pixel_area")
    assert plan((1000, 1000), resolution_type="area").bucket == (1024, 1024)  # area defaults to 1.0


def test_sides_round_to_the_nearest_multiple_and_never_below_one_unit():
    assert plan((1000, 1000), resolution=1000).bucket == (1024, 1024)  # 1000/64 = 15.6 -> 16
    assert plan((1000, 1000), resolution=980).bucket == (960, 960)  # 980/64 = 15.3 -> 15
    assert plan((64, 4096), resolution=256).bucket == (64, 2048)  # 32 px wide would be 0 units
    assert plan((1000, 1000), resolution=100, alignment=16).bucket == (96, 96)


def test_every_plan_is_consistent_for_many_shapes_and_options():
    shapes = [(1, 1), (17, 4000), (4000, 17), (333, 777), (1920, 1080), (1080, 1920), (5000, 5000)]
    option_sets = [
        {},
        {"resolution_type": "pixel", "resolution": 512},
        {"resolution_type": "area", "resolution": 0.5},
        {"crop": True, "crop_aspect": "square", "crop_style": "random"},
        {"crop": True, "crop_aspect": "closest", "crop_style": "corner"},
        {"crop": True, "crop_aspect": "random", "crop_style": "random"},
    ]
    for shape in shapes:
        for options in option_sets:
            assert_consistent(plan(shape, **options))
            assert_consistent(plan(shape, alignment=16, **options), alignment=16)


# ---------------------------------------------------------------------------- crop aspect


def test_crop_aspect_square_trains_every_image_as_a_square_of_the_resolution():
    for size in [(1536, 1024), (600, 1800), (512, 512)]:
        assert plan(size, resolution=1024, crop=True, crop_aspect="square").bucket == (1024, 1024)
    assert plan((1536, 1024), resolution=1.0, resolution_type="area", crop=True).bucket == (1024, 1024)
    assert plan((900, 1600), resolution=768, resolution_type="pixel", crop=True).bucket == (768, 768)


def test_crop_aspect_closest_picks_the_nearest_configured_ratio():
    closest = {"crop": True, "crop_aspect": "closest", "resolution": 1024}
    assert DEFAULT_CROP_ASPECT_BUCKETS == (0.5, 0.75, 1.0, 1.33, 2.0)
    p = plan((1536, 1024), **closest)  # 1.5 is nearer 4:3 than 2:1
    assert p.bucket == (1152, 896)
    assert p.resize == (1344, 896)
    assert p.crop_box == (96, 0, 1248, 896)
    assert plan((1000, 2100), **closest).bucket == (704, 1472)  # 0.48 -> 1:2
    custom = plan((1536, 1024), crop_aspect_buckets=[1.0, 1.75], **closest).bucket
    assert custom[0] / custom[1] == pytest.approx(1.75, rel=0.05)


def test_crop_aspect_preserve_is_the_same_as_not_cropping():
    for size in [(1536, 1024), (600, 1800)]:
        kept = plan(size, crop=True, crop_aspect="preserve", crop_style="random")
        assert kept == plan(size, crop=False)


def test_crop_aspect_random_is_one_configured_ratio_fixed_per_file():
    options = {"crop": True, "crop_aspect": "random", "resolution": 1024, "crop_aspect_buckets": [0.5, 1.0, 2.0]}
    buckets = [plan((3000, 3000), key=f"{i}.png", **options).bucket for i in range(30)]
    assert set(buckets) == {(704, 1472), (1024, 1024), (1472, 704)}  # each ratio turns up across files
    assert [plan((3000, 3000), key=f"{i}.png", **options).bucket for i in range(30)] == buckets  # and never change


def test_crop_off_keeps_the_whole_image_up_to_rounding():
    p = plan((1536, 1024), resolution=1024, crop=False, crop_style="corner")
    assert p.resize[0] - p.bucket[0] <= 64
    assert p.resize[1] - p.bucket[1] <= 64
    assert p.crop_box == (0, 10, 1280, 842)  # crop_style only applies when cropping


# ---------------------------------------------------------------------------- crop style


def test_crop_style_center_and_centre_cut_the_middle():
    square = {"crop": True, "crop_aspect": "square", "resolution": 1024}
    p = plan((1536, 1024), crop_style="center", **square)
    assert p.resize == (1536, 1024)
    assert p.crop_box == (256, 0, 1280, 1024)
    assert plan((1536, 1024), crop_style="centre", **square) == p
    assert plan((1024, 2048), crop_style="center", **square).crop_box == (0, 512, 1024, 1536)


def test_crop_style_corner_cuts_the_top_left():
    p = plan((1536, 1024), crop=True, crop_aspect="square", crop_style="corner", resolution=1024)
    assert p.crop_box == (0, 0, 1024, 1024)


def test_crop_style_random_is_fixed_per_file_and_seed_but_varies_between_files():
    square = {"crop": True, "crop_aspect": "square", "crop_style": "random", "resolution": 512}
    first = plan((2048, 1024), key="cats/01.png", **square)
    assert plan((2048, 1024), key="cats/01.png", **square) == first  # same file: same crop, caches stay valid
    lefts = {plan((2048, 1024), key=f"cats/{i:02}.png", **square).crop_box[0] for i in range(20)}
    assert len(lefts) > 10  # different files: different crops
    reseeded = {plan((2048, 1024), key="cats/01.png", seed=s, **square).crop_box for s in range(10)}
    assert len(reseeded) > 5  # the seed moves them too
    assert all(0 <= left <= 2048 - 512 for left in lefts)


# ---------------------------------------------------------------------------- size limits


def test_big_images_are_downsampled_before_cropping_so_the_crop_keeps_detail():
    """maximum 2048 / downsample 1536: a 4000² photo is shrunk to 1536² and a 1024² crop cut from it."""
    limits = {"resolution": 1024, "maximum_image_size": 2048, "target_downsample_size": 1536}
    p = plan((4000, 4000), crop=True, crop_aspect="square", **limits)
    assert p.bucket == (1024, 1024)
    assert p.resize == (1536, 1536)
    assert p.crop_box == (256, 256, 1280, 1280)
    assert plan((2000, 2000), crop=True, crop_aspect="square", **limits).resize == (1024, 1024)  # not above maximum
    assert plan((4000, 4000), crop=False, **limits).resize == (1024, 1024)  # without cropping the whole image is kept


def test_minimum_size_problem_names_the_file_and_the_unit():
    assert minimum_size_problem("a.png", (512, 512), ds(minimum_image_size=512)) is None
    message = minimum_size_problem("a.png", (600, 400), ds(minimum_image_size=512))
    assert message == (
        "image below minimum size: a.png is 600x400, minimum 512 px square-equivalent, "
        "i.e. 512x512 px of area (resolution_type 'pixel_area')"
    )
    area = ds(resolution_type="area", resolution=1.0, minimum_image_size=0.5)
    assert "0.5 megapixels" in minimum_size_problem("b.png", (512, 512), area)
    assert minimum_size_problem("c.png", (100, 100), ds()) is None  # no minimum set


def test_options_that_break_every_bucket_are_reported_once_per_dataset():
    assert geometry_problems(ds(), ALIGN) == []
    assert "1024 megapixels" in geometry_problems(ds(resolution_type="area", resolution=1024), ALIGN)[0]
    assert "positive" in geometry_problems(ds(crop_aspect_buckets=[1.0, -2.0]), ALIGN)[0]
    with pytest.raises(ConfigError, match="alignment"):
        plan((100, 100), alignment=0)


def test_bucket_areas_stay_close_to_the_target_for_common_photo_shapes():
    for w, h in [(4032, 3024), (3024, 4032), (1920, 1080), (1080, 1920), (2048, 2048)]:
        bw, bh = plan((w, h), resolution=1024).bucket
        assert bw * bh == pytest.approx(1024 * 1024, rel=0.08)
        assert math.log(bw / bh) == pytest.approx(math.log(w / h), abs=0.06)
