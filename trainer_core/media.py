"""Media the families render and the trainer saves: validation images as PNG, videos as H.264 MP4 plus a
frame-strip PNG. Below both `families/` and `train/`, so neither imports the other for it.

The strip lets a video sample be looked at where only images are shown (ComfyUI previews,
issue trackers); the MP4 is the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class RenderedVideo:
    """A validation video: its frames in order and the rate they play at."""

    frames: list[Image.Image]
    fps: float


def write_mp4(frames: list[Image.Image], fps: float, path: Path) -> Path:
    """Encode frames with PyAV (H.264 if available, else MPEG-4 part 2), atomically."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    width, height = frames[0].size
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(tmp), mode="w") as container:
        from fractions import Fraction

        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuv420p"
        for img in frames:
            rgb = np.asarray(img.convert("RGB"))[: stream.height, : stream.width]
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def frame_strip(frames: list[Image.Image], max_frames: int = 8) -> Image.Image:
    """Up to ``max_frames`` evenly spaced frames side by side."""
    n = len(frames)
    picks = [frames[round(i * (n - 1) / max(1, min(n, max_frames) - 1))] for i in range(min(n, max_frames))]
    w, h = picks[0].size
    strip = Image.new("RGB", (w * len(picks), h))
    for i, f in enumerate(picks):
        strip.paste(f.convert("RGB"), (i * w, 0))
    return strip


def save_sample(sample: Image.Image | RenderedVideo, stem: Path) -> list[Path]:
    """Write one validation sample next to ``stem`` and return the files written."""
    if isinstance(sample, RenderedVideo):
        mp4 = write_mp4(sample.frames, sample.fps, stem.with_suffix(".mp4"))
        strip = stem.with_name(stem.name + "-frames.png")
        frame_strip(sample.frames).save(strip)
        return [strip, mp4]
    path = stem.with_suffix(".png")
    sample.save(path)
    return [path]
