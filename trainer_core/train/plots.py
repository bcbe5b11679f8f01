"""Loss plot drawn with PIL alone (no matplotlib dependency), plus a smoothed curve."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


CREPA_COLOUR = (230, 130, 30)


def draw_loss_plot(
    history: list[list[float]], width: int = 640, height: int = 360, crepa: list[list[float]] | None = None
) -> Image.Image:
    """history: [[step, loss], ...]. Flat or empty curves draw without dividing by zero.

    ``crepa``: [[step, CREPA term], ...] of a CREPA run, drawn in orange on its own scale (labelled on
    the right): the term is negative (-alignment x weight) and far from the loss. None or empty: the
    plot is the plain one.
    """
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 15, 20, 35
    draw.rectangle([left, top, width - right, height - bottom], outline=(180, 180, 180))
    points = [(s, v) for s, v in history if math.isfinite(v)]
    if not points:
        draw.text((left + 10, top + 10), "no loss recorded yet", fill=(0, 0, 0))
        return img
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min(steps), max(steps)
    span = max(s1 - s0, 1)

    def xy(step: float, loss: float, lo: float = lo, hi: float = hi) -> tuple[float, float]:
        x = left + (step - s0) / span * (width - left - right)
        y = height - bottom - (loss - lo) / (hi - lo) * (height - top - bottom)
        return x, y

    raw = [xy(s, v) for s, v in points]
    if len(raw) > 1:
        draw.line(raw, fill=(160, 190, 230), width=1)
        smoothed = smooth(losses, max(1, len(losses) // 10))
        draw.line([xy(s, v) for s, v in zip(steps, smoothed)], fill=(20, 80, 200), width=2)
    else:
        x, y = raw[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(20, 80, 200))
    draw.text((5, top), f"{hi:.4g}", fill=(0, 0, 0))
    draw.text((5, height - bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
    draw.text((left, height - bottom + 8), f"step {int(s0)}", fill=(0, 0, 0))
    draw.text((width - right - 80, height - bottom + 8), f"step {int(s1)}", fill=(0, 0, 0))
    draw.text((left + 8, top + 4), "training loss", fill=(0, 0, 0))
    extra = [(st, v) for st, v in crepa or [] if math.isfinite(v)]
    if extra:
        c_lo, c_hi = min(v for _, v in extra), max(v for _, v in extra)
        if c_hi - c_lo < 1e-12:
            c_lo, c_hi = c_lo - 0.5, c_hi + 0.5
        line = [xy(st, v, c_lo, c_hi) for st, v in extra]  # the loss's x, the term's own y scale
        if len(line) > 1:
            draw.line(line, fill=CREPA_COLOUR, width=2)
        else:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=CREPA_COLOUR)
        draw.text((width - right - 60, top + 4), f"{c_hi:.4g}", fill=CREPA_COLOUR)
        draw.text((width - right - 60, height - bottom - 14), f"{c_lo:.4g}", fill=CREPA_COLOUR)
        draw.text((left + 100, top + 4), "CREPA term (right scale)", fill=CREPA_COLOUR)
    return img


def save_loss_plot(history: list[list[float]], path: Path, crepa: list[list[float]] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    draw_loss_plot(history, crepa=crepa).save(tmp)
    tmp.replace(path)
    return path
