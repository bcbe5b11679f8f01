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


def draw_loss_plot(history: list[list[float]], width: int = 640, height: int = 360) -> Image.Image:
    """history: [[step, loss], ...]. Flat or empty curves draw without dividing by zero."""
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

    def xy(step: float, loss: float) -> tuple[float, float]:
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
    return img


def save_loss_plot(history: list[list[float]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    draw_loss_plot(history).save(tmp)
    tmp.replace(path)
    return path
