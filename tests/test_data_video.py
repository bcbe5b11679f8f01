"""Video datasets: discovery, clip frame plans, buckets with frame counts, and clip pixels.

Every clip is encoded with PyAV into ``tmp_path`` by the test itself. Frame ``i`` of a test clip
is a solid grey of level ``6 * i`` (or carries a static pattern), so a test can tell which source
frames a clip is made of from the decoded pixels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.data import (
    BucketBatchSampler,
    CropPlan,
    DatasetIndex,
    FramePlan,
    Sample,
    bucket_label,
    discover,
    first_frame,
    largest_4k_plus_1,
    load_pixels,
)
from trainer_core.data.video import probe_video, resample
from trainer_core.errors import DatasetError
from trainer_core.spec import DatasetSpec, TrainSpec

ALIGN = 16
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
WEBM_CODEC = next((c for c in ("libvpx-vp9", "libvpx", "libaom-av1") if c in av.codecs_available), None)
OPTIONS = {"libx264": {"crf": "0"}, "mpeg4": {"qscale": "1"}, "libvpx-vp9": {"lossless": "1"}}


# ---------------------------------------------------------------------------- helpers


def grey(i: int, size: tuple[int, int]) -> np.ndarray:
    return np.full((size[1], size[0], 3), (6 * i) % 256, np.uint8)


def gradient(i: int, size: tuple[int, int]) -> np.ndarray:
    """The same horizontal ramp in every frame: any crop shift shows."""
    ramp = np.linspace(0, 255, size[0]).astype(np.uint8)
    return np.repeat(np.repeat(ramp[None, :, None], size[1], 0), 3, 2)


def write_clip(
    path: Path,
    frames: int,
    size: tuple[int, int] = (64, 48),
    fps: int = 30,
    draw=grey,
    rotation: int | None = None,
    **container_options: str,
) -> Path:
    """Encode ``frames`` frames of ``draw(i, size)`` at ``fps`` into ``path`` (container from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=container_options) as container:
        codec = WEBM_CODEC if path.suffix == ".webm" else CODEC
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = OPTIONS.get(codec, {})
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(draw(i, size), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def reference_levels(path: Path) -> list[float]:
    """Mean grey level of every frame of ``path``, decoded plainly."""
    with av.open(str(path)) as container:
        return [float(f.to_ndarray(format="rgb24").mean()) for f in container.decode(video=0)]


def picked_frames(pixels: torch.Tensor, path: Path) -> list[int]:
    """Which source frame of ``path`` each frame of a (F, 3, H, W) clip is (nearest grey level)."""
    ref = np.array(reference_levels(path))
    levels = ((pixels + 1) * 127.5).mean(dim=(1, 2, 3)).numpy()
    return [int(np.abs(ref - v).argmin()) for v in levels]


def spec(*datasets: DatasetSpec, seed: int = 42) -> TrainSpec:
    return TrainSpec(datasets=list(datasets), training={"seed": seed})


def videos(folder: Path, id: str = "clips", video: dict | None = None, **options) -> DatasetSpec:
    options.setdefault("resolution", 64)
    options.setdefault("caption_strategy", "filename")
    return DatasetSpec(id=id, dataset_type="video", instance_data_dir=str(folder), video=video, **options)


def by_name(index: DatasetIndex) -> dict[str, Sample]:
    return {s.path.name: s for s in index.samples}


# ---------------------------------------------------------------------------- discovery


def test_videos_are_found_recursively_with_captions_and_any_case_extension(tmp_path):
    write_clip(tmp_path / "walk.mp4", 10)
    write_clip(tmp_path / "sub" / "RUN.MOV", 10)
    write_clip(tmp_path / "sub" / "jump.mkv", 10)
    if WEBM_CODEC:
        write_clip(tmp_path / "swim.webm", 10)
    else:  # no VP8/VP9/AV1 encoder in this PyAV build: an mkv stands in
        write_clip(tmp_path / "swim.mkv", 10).rename(tmp_path / "swim.webm")
    for name, text in {
        "walk": "a person walking",
        "sub/RUN": "running",
        "sub/jump": "a jump",
        "swim": "swimming",
    }.items():
        (tmp_path / f"{name}.txt").write_text(text + "\nalt caption\n")
    Image.new("RGB", (64, 48)).save(tmp_path / "still.png")  # images in a video dataset are not samples
    index = discover(spec(videos(tmp_path, caption_strategy="textfile")), ALIGN)
    assert [s.path.relative_to(tmp_path).as_posix() for s in index.samples] == [
        "sub/RUN.MOV",
        "sub/jump.mkv",
        "swim.webm",
        "walk.mp4",
    ]
    assert by_name(index)["walk.mp4"].captions == ("a person walking", "alt caption")
    for s in index.samples:
        assert s.is_video and s.frames.indices == tuple(range(10)) and s.frames.source_fps == pytest.approx(30)
        assert s.source_size == (64, 48) and s.bucket_key == (*s.plan.bucket, 10)


def test_instanceprompt_and_filename_captions_work_for_videos(tmp_path):
    write_clip(tmp_path / "a_red-fox.mp4", 5)
    index = discover(spec(videos(tmp_path)), ALIGN)
    assert index.samples[0].captions == ("a red fox",)
    ds = videos(tmp_path, caption_strategy="instanceprompt", instance_prompt="sks clip")
    assert discover(spec(ds), ALIGN).samples[0].captions == ("sks clip",)


def test_broken_videos_are_listed_in_one_error_with_every_other_problem(tmp_path):
    clips, photos = tmp_path / "clips", tmp_path / "photos"
    write_clip(clips / "good.mp4", 10)
    (clips / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    whole = write_clip(tmp_path / "whole.mp4", 40, size=(96, 64)).read_bytes()
    (clips / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (clips / "empty.mkv").write_bytes(b"")
    (clips / "notes.mov").write_text("this is not a video")
    write_clip(clips / "uncaptioned.mp4", 10)
    for name in ("good", "random", "truncated", "empty", "notes"):
        (clips / f"{name}.txt").write_text("caption")
    photos.mkdir()
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (photos / "broken.txt").write_text("caption")

    with pytest.raises(DatasetError) as err:
        discover(
            spec(videos(clips, caption_strategy="textfile"), DatasetSpec(id="photos", instance_data_dir=str(photos))),
            ALIGN,
        )
    problems = err.value.problems
    for name in ("random.mp4", "truncated.mp4", "empty.mkv", "notes.mov", "broken.png"):
        assert sum(name in p for p in problems) == 1, (name, problems)
    assert any("uncaptioned.mp4" in p and "caption" in p for p in problems)
    assert not any("good.mp4" in p for p in problems)
    assert len(problems) == 6
    assert "broken files" in str(err.value)


def test_a_truncated_faststart_mp4_is_a_problem(tmp_path):
    """With the index at the front the file opens; the missing frames must still be noticed."""
    rng = np.random.default_rng(1)
    noisy = lambda i, size: rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # noqa: E731
    whole = write_clip(tmp_path / "src" / "whole.mp4", 30, size=(96, 64), draw=noisy, movflags="faststart")
    data = whole.read_bytes()
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "cut.mp4").write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(DatasetError) as err:
        discover(spec(videos(tmp_path / "clips")), ALIGN)
    assert len(err.value.problems) == 1 and "cut.mp4" in err.value.problems[0]


def test_a_file_without_a_video_stream_is_a_problem(tmp_path):
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(DatasetError) as err:
        discover(spec(videos(tmp_path)), ALIGN)
    assert err.value.problems == [f"unreadable video: {path} has no video stream"]


def test_a_folder_without_videos_says_which_extensions_count(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "still.png")
    with pytest.raises(DatasetError) as err:
        discover(spec(videos(tmp_path)), ALIGN)
    assert "holds no videos (.mkv .mov .mp4 .webm)" in err.value.problems[0]


def test_contradictory_video_options_are_problems(tmp_path):
    write_clip(tmp_path / "a.mp4", 10)
    ds = videos(tmp_path, video={"min_frames": 20, "max_frames": 10, "num_frames": 12})
    with pytest.raises(DatasetError) as err:
        discover(spec(ds), ALIGN)
    assert any("min_frames 20 exceeds video.max_frames 10" in p for p in err.value.problems)
    assert any("num_frames 12 exceeds video.max_frames 10" in p for p in err.value.problems)


# ---------------------------------------------------------------------------- clip lengths


def test_min_frames_drops_short_videos_and_reports_them_in_one_warning(tmp_path, caplog):
    write_clip(tmp_path / "long.mp4", 20)
    write_clip(tmp_path / "short.mp4", 8)
    write_clip(tmp_path / "tiny.mp4", 3)
    with caplog.at_level(logging.WARNING):
        index = discover(spec(videos(tmp_path, video={"min_frames": 10})), ALIGN)
    assert [s.path.name for s in index.samples] == ["long.mp4"]
    [report] = [w for w in index.warnings if "too short" in w]
    assert "2 video(s)" in report
    assert f"{tmp_path / 'short.mp4'}: 8 frames < min_frames 10" in report
    assert f"{tmp_path / 'tiny.mp4'}: 3 frames < min_frames 10" in report
    assert report in caplog.text


def test_min_frames_counts_frames_after_resampling(tmp_path):
    write_clip(tmp_path / "a.mp4", 24)  # 0.8 s: 24 frames at 30 fps, 8 at 10 fps
    ds = videos(tmp_path, video={"min_frames": 10, "frame_rate": 10})
    with pytest.raises(DatasetError) as err:
        discover(spec(ds), ALIGN)
    assert "8 frames at 10 fps < min_frames 10" in err.value.problems[0]


def test_a_dataset_left_without_videos_is_an_error_that_explains(tmp_path):
    write_clip(tmp_path / "a.mp4", 5)
    write_clip(tmp_path / "b.mp4", 6)
    with pytest.raises(DatasetError) as err:
        discover(spec(videos(tmp_path, video={"min_frames": 17})), ALIGN)
    [problem] = err.value.problems
    assert "no video is left to train on; 2 too short" in problem and "a.mp4: 5 frames < min_frames 17" in problem
    assert "b.mp4: 6 frames" in problem
    assert "min_frames" in err.value.hint


def test_a_dataset_left_without_videos_is_reported_beside_broken_files(tmp_path):
    write_clip(tmp_path / "a.mp4", 5)
    (tmp_path / "b.mp4").write_bytes(b"not a video")
    with pytest.raises(DatasetError) as err:
        discover(spec(videos(tmp_path, video={"min_frames": 17})), ALIGN)
    assert len(err.value.problems) == 2
    assert any("b.mp4" in p for p in err.value.problems) and any("no video is left" in p for p in err.value.problems)


def test_num_frames_takes_clips_from_the_start_and_max_frames_cuts(tmp_path):
    write_clip(tmp_path / "a.mp4", 30)
    write_clip(tmp_path / "b.mp4", 12)
    index = discover(spec(videos(tmp_path, video={"num_frames": 16})), ALIGN)
    assert by_name(index)["a.mp4"].frames.indices == tuple(range(16))
    assert by_name(index)["b.mp4"].frames.indices == tuple(range(12))  # shorter: its own length, not dropped
    index = discover(spec(videos(tmp_path, video={"max_frames": 10})), ALIGN)
    assert [s.frames.count for s in index.samples] == [10, 10]


def test_frame_rate_resampling_picks_the_nearest_source_frames(tmp_path):
    path = write_clip(tmp_path / "a.mp4", 30, fps=30)
    index = discover(spec(videos(tmp_path, video={"frame_rate": 10})), ALIGN)
    [sample] = index.samples
    assert sample.frames == FramePlan(source_fps=30.0, target_fps=10.0, indices=tuple(range(0, 30, 3)))
    assert picked_frames(load_pixels(sample), path) == list(range(0, 30, 3))

    cut = discover(spec(videos(tmp_path, video={"frame_rate": 10, "max_frames": 4})), ALIGN).samples[0]
    assert cut.frames.indices == (0, 3, 6, 9)
    assert picked_frames(load_pixels(cut), path) == [0, 3, 6, 9]


def test_frame_rate_above_the_source_repeats_frames_and_warns(tmp_path):
    path = write_clip(tmp_path / "a.mp4", 6, fps=10)
    index = discover(spec(videos(tmp_path, video={"frame_rate": 20})), ALIGN)
    [sample] = index.samples
    assert sample.frames.indices == (0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5)
    assert picked_frames(load_pixels(sample), path) == list(sample.frames.indices)
    assert any("above the frame rate of 1 video(s)" in w and "a.mp4 (10 fps)" in w for w in index.warnings)


def test_resampling_uses_timestamps_and_breaks_ties_towards_the_earlier_frame():
    assert resample((0.0, 1 / 30, 2 / 30, 3 / 30), 30, 20, True, None) == [0, 1, 3]  # t=0.05 is halfway: frame 1
    vfr = (0.0, 0.05, 0.1, 0.3, 0.31)  # a variable-rate stream: a gap after 0.1 s
    assert resample(vfr, 30, 10, True, None) == [0, 2, 2, 3]  # 0.2 is as near 0.1 as 0.3: the earlier wins
    assert resample(tuple(i / 30 for i in range(300)), 30, 10, False, 5) == [0, 3, 6, 9, 12]


def test_frame_rule_trims_clips_to_the_longest_valid_length(tmp_path):
    write_clip(tmp_path / "a.mp4", 20)
    index = discover(spec(videos(tmp_path, video={"num_frames": 17})), ALIGN, frame_rule=largest_4k_plus_1)
    assert index.samples[0].frames.count == 17
    index = discover(spec(videos(tmp_path)), ALIGN, frame_rule=largest_4k_plus_1)
    assert index.samples[0].frames.indices == tuple(range(17))
    index = discover(spec(videos(tmp_path)), ALIGN)  # the default rule accepts any length
    assert index.samples[0].frames.count == 20


def test_num_frames_the_rule_rejects_is_trimmed_with_a_warning(tmp_path):
    write_clip(tmp_path / "a.mp4", 30)
    index = discover(spec(videos(tmp_path, video={"num_frames": 20})), ALIGN, frame_rule=largest_4k_plus_1)
    assert index.samples[0].frames.count == 17
    assert any("num_frames 20 is not a frame count this model accepts" in w for w in index.warnings)


def test_a_video_too_short_for_the_rule_is_a_problem_or_dropped_with_min_frames(tmp_path):
    write_clip(tmp_path / "long.mp4", 20)
    write_clip(tmp_path / "short.mp4", 8)
    rule = lambda n: largest_4k_plus_1(n) if n >= 17 else 0  # noqa: E731 - e.g. a model needing 17+ frames
    with pytest.raises(DatasetError) as err:
        discover(spec(videos(tmp_path)), ALIGN, frame_rule=rule)
    [problem] = err.value.problems
    assert "video too short" in problem and "short.mp4 has 8 frames" in problem
    index = discover(spec(videos(tmp_path, video={"min_frames": 1})), ALIGN, frame_rule=rule)
    assert [s.path.name for s in index.samples] == ["long.mp4"]
    assert any("short.mp4 has 8 frames" in w for w in index.warnings)


def test_probe_stops_decoding_once_no_clip_could_use_more_frames(tmp_path):
    path = write_clip(tmp_path / "long.mp4", 120)
    early = probe_video(path, limit=9)
    assert not early.complete and 9 <= early.frames < 120
    full = probe_video(path)
    assert full.complete and full.frames == 120 and full.size == (64, 48)
    assert full.duration == pytest.approx(4.0, abs=0.1)


# ---------------------------------------------------------------------------- buckets


def test_bucket_keys_carry_the_frame_count_and_labels_read_wxh_at_f(tmp_path):
    for name, n in {"a.mp4": 18, "b.mp4": 20, "c.mp4": 23}.items():
        write_clip(tmp_path / name, n)
    index = discover(spec(videos(tmp_path, resolution=64, resolution_type="pixel")), ALIGN)
    assert sorted(index.buckets()) == [(80, 64, 18), (80, 64, 20), (80, 64, 23)]
    assert [s.plan.bucket for s in index.samples] == [(80, 64)] * 3  # plan.bucket keeps meaning (w, h)
    assert bucket_label((80, 64, 18)) == "80x64@18" and bucket_label((80, 64)) == "80x64"


def test_resolution_frames_groups_frame_counts_by_frame_interval(tmp_path):
    for name, n in {"a.mp4": 18, "b.mp4": 20, "c.mp4": 23, "d.mp4": 26}.items():
        write_clip(tmp_path / name, n)
    grouped = videos(
        tmp_path,
        resolution=64,
        resolution_type="pixel",
        video={"bucket_strategy": "resolution_frames", "frame_interval": 8},
    )
    index = discover(spec(grouped), ALIGN)
    assert {bucket_label(b): len(ix) for b, ix in index.buckets().items()} == {"80x64@16": 3, "80x64@24": 1}
    index = discover(spec(grouped), ALIGN, frame_rule=largest_4k_plus_1)  # 16 -> 13, 24 -> 21
    assert {bucket_label(b): len(ix) for b, ix in index.buckets().items()} == {"80x64@13": 3, "80x64@21": 1}
    ungrouped = videos(tmp_path, video={"frame_interval": 8})  # aspect_ratio: the interval does not apply
    index = discover(spec(ungrouped), ALIGN)
    assert len(index.buckets()) == 4
    assert any("frame_interval only applies" in w for w in index.warnings)


def test_a_clip_shorter_than_frame_interval_is_too_short(tmp_path):
    write_clip(tmp_path / "a.mp4", 20)
    write_clip(tmp_path / "b.mp4", 5)
    ds = videos(tmp_path, video={"bucket_strategy": "resolution_frames", "frame_interval": 8})
    with pytest.raises(DatasetError) as err:
        discover(spec(ds), ALIGN)
    assert "b.mp4 has 5 frames" in err.value.problems[0] and "frame_interval 8" in err.value.problems[0]


def _clip_sample(i: int, bucket: tuple[int, int], frames: int | None) -> Sample:
    plan = CropPlan(bucket=bucket, resize=bucket, crop_box=(0, 0, *bucket))
    frame_plan = FramePlan(30.0, None, tuple(range(frames))) if frames else None
    return Sample("d", Path(f"s{i}"), ("c",), bucket, plan, f"id{i}", 0, frame_plan)


def test_the_sampler_never_mixes_frame_counts_or_images_and_clips_in_a_batch():
    counts = [None] * 6 + [9] * 7 + [17] * 5 + [21] * 2
    index = DatasetIndex([_clip_sample(i, (64, 48), n) for i, n in enumerate(counts)])
    assert sorted(index.buckets()) == [(64, 48), (64, 48, 9), (64, 48, 17), (64, 48, 21)]
    for prune in (True, False):
        sampler = BucketBatchSampler(index, batch_size=2, seed=3, prune=prune)
        for epoch in range(3):
            for batch in sampler.batches_for_epoch(epoch):
                assert len({index.samples[i].bucket_key for i in batch}) == 1
    sampler = BucketBatchSampler(index, batch_size=3, seed=3)
    assert any("bucket 64x48@21 dropped" in note for note in sampler.pruned)


def test_cache_fields_identify_the_decoded_tensor():
    image, clip = _clip_sample(0, (64, 48), None), _clip_sample(1, (64, 48), 5)
    assert image.cache_fields() == {"bucket": (64, 48), "resize": (64, 48), "crop": (0, 0, 64, 48)}
    assert image.bucket_key == (64, 48) and not image.is_video
    assert clip.cache_fields() == {**image.cache_fields(), "frames": [0, 1, 2, 3, 4]}


# ---------------------------------------------------------------------------- pixels


def test_load_pixels_gives_frames_channels_height_width_in_range_and_deterministic(tmp_path):
    path = write_clip(tmp_path / "a.mp4", 12, size=(96, 64))
    [sample] = discover(spec(videos(tmp_path, resolution=32, video={"num_frames": 9})), ALIGN).samples
    w, h = sample.plan.bucket
    pixels = load_pixels(sample)
    assert pixels.shape == (9, 3, h, w) and pixels.dtype == torch.float32 and pixels.is_contiguous()
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert picked_frames(pixels, path) == list(range(9))
    assert torch.equal(pixels, load_pixels(sample))
    assert torch.equal(first_frame(sample), pixels[0])


@pytest.mark.parametrize("crop_style", ["center", "random"])
def test_every_frame_gets_the_same_resize_and_crop_as_an_image_would(tmp_path, crop_style):
    write_clip(tmp_path / "clip.mp4", 6, size=(96, 48), draw=gradient)
    ds = videos(tmp_path, resolution=32, resolution_type="pixel_area", crop=True, crop_style=crop_style)
    [sample] = discover(spec(ds), ALIGN).samples
    assert sample.plan.bucket == (32, 32) and sample.plan.resize == (64, 32)
    expected = Image.fromarray(gradient(0, (96, 48))).resize((64, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)
    expected = torch.from_numpy(np.array(expected.crop(sample.plan.crop_box))).permute(2, 0, 1) / 127.5 - 1
    pixels = load_pixels(sample)
    for frame in pixels:
        assert (frame - expected).abs().max() < 0.05  # the codec's rounding, not a shifted crop


def test_display_rotation_is_applied_like_exif(tmp_path):
    def marked(i: int, size: tuple[int, int]) -> np.ndarray:
        arr = np.zeros((size[1], size[0], 3), np.uint8)
        arr[:16, :16] = 255  # top-left corner as stored
        return arr

    write_clip(tmp_path / "portrait.mp4", 3, size=(64, 48), draw=marked, rotation=90)
    ds = videos(tmp_path, resolution=48, resolution_type="pixel")
    [sample] = discover(spec(ds), ALIGN).samples
    assert sample.source_size == (48, 64)  # shown upright: taller than wide
    pixels = load_pixels(sample)
    assert pixels.shape[-2:] == (64, 48)
    assert pixels[0, :, -4:, :4].mean() > 0.5 and pixels[0, :, :4, :4].mean() < -0.5  # turned counter-clockwise


def test_a_video_replaced_after_discovery_is_reported_not_misread(tmp_path):
    path = write_clip(tmp_path / "a.mp4", 12)
    [sample] = discover(spec(videos(tmp_path)), ALIGN).samples
    write_clip(path, 5)
    with pytest.raises(DatasetError, match="ends before frame 12"):
        load_pixels(sample)
    write_clip(path, 12, size=(96, 64))
    with pytest.raises(DatasetError, match="96x64 frames but had 64x48"):
        load_pixels(sample)


# ---------------------------------------------------------------------------- images unchanged


def test_image_and_video_datasets_train_together_in_separate_buckets(tmp_path):
    write_clip(tmp_path / "clips" / "a.mp4", 9)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "photos" / "red_fox.png")
    photos = DatasetSpec(id="photos", instance_data_dir=str(tmp_path / "photos"), caption_strategy="filename")
    index = discover(spec(videos(tmp_path / "clips"), photos.model_copy(update={"resolution": 64})), ALIGN)
    image, clip = by_name(index)["red_fox.png"], by_name(index)["a.mp4"]
    assert image.frames is None and image.bucket_key == image.plan.bucket
    assert load_pixels(image).shape == (3, *reversed(image.plan.bucket))
    assert clip.bucket_key == (*image.plan.bucket, 9)
    assert len(index.buckets()) == 2
