"""Training curves (loss terms and gate entropy) drawn with PIL — no plotting dependency."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: dict[str, list[float]],
           title: str, font: ImageFont.ImageFont) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((x0 + 4, y0 + 3), title, fill="black", font=font)
    vals = [v for s in series.values() for v in s if math.isfinite(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1e-6
    draw.text((x0 + 4, y0 + 15), f"{hi:.4g}", fill=(90, 90, 90), font=font)
    draw.text((x0 + 4, y1 - 12), f"{lo:.4g}", fill=(90, 90, 90), font=font)
    px0, py0, px1, py1 = x0 + 48, y0 + 16, x1 - 8, y1 - 8
    for i, (name, s) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        n = max(len(s) - 1, 1)
        pts = [(px0 + (px1 - px0) * j / n, py1 - (py1 - py0) * (v - lo) / (hi - lo))
               for j, v in enumerate(s) if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        draw.text((px1 - 110, y0 + 3 + 11 * i), name, fill=color, font=font)


def training_curves(history: list[dict], width: int = 640, height: int = 420) -> Image.Image:
    """Two panels: loss terms per step; gate entropy (per-sample and of the mean gates)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    skip = {"step", "lr", "gate_entropy", "mean_gates", "mean_gate_entropy", "steps", "terms", "eta_s",
            "elapsed_s"}
    keys = [k for k in (history[0] if history else {}) if k not in skip and isinstance(history[0][k], (int, float))]
    losses = {k: [float(h.get(k, float("nan"))) for h in history] for k in keys}
    ent = {"gate entropy": [float(h.get("gate_entropy", float("nan"))) for h in history],
           "entropy of mean gates": [float(h.get("mean_gate_entropy", float("nan"))) for h in history]}
    half = height // 2
    _panel(draw, (4, 4, width - 4, half - 2), losses, "loss terms per step", font)
    _panel(draw, (4, half + 2, width - 4, height - 4), ent, "gate entropy (nats)", font)
    return img
