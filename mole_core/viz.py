"""Gate heatmaps (experts × blocks) as PNG images and JSON payloads for the web widget."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .naming import block_label

_CELL_W, _CELL_H = 28, 22


def heatmap_payload(mean_gates: dict[str, list[float]], expert_names: list[str], *,
                    title: str = "mean gate per expert and block", by_bucket: dict | None = None) -> dict:
    """JSON-able ``{"experts", "blocks", "labels", "values" (experts × blocks), "buckets"}``."""
    blocks = list(mean_gates)
    values = [[round(float(mean_gates[b][i]), 5) for b in blocks] for i in range(len(expert_names))]
    payload = {"title": title, "experts": list(expert_names), "blocks": blocks,
               "labels": [block_label(b) for b in blocks], "values": values}
    if by_bucket:
        payload["buckets"] = {k: [[round(float(v[b][i]), 5) if b in v else None for b in blocks]
                                  for i in range(len(expert_names))] for k, v in by_bucket.items()}
    return payload


def payload_csv(payload: dict) -> str:
    """The payload's numbers as CSV: one row per block, one column per expert."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["block", "label", *payload["experts"]])
    for j, (b, lab) in enumerate(zip(payload["blocks"], payload["labels"])):
        w.writerow([b, lab, *[payload["values"][i][j] for i in range(len(payload["experts"]))]])
    return buf.getvalue()


def payload_json(payload: dict) -> str:
    return json.dumps(payload, indent=1)


def _color(v: float) -> tuple[int, int, int]:
    """White → deep blue colour ramp for gate values in [0, 1]."""
    v = min(max(v, 0.0), 1.0)
    return (int(255 - 215 * v), int(255 - 175 * v), int(255 - 75 * v))


def render_heatmap(payload: dict, *, scale: int = 1) -> Image.Image:
    """Draw the payload as an RGB image: experts as rows, blocks as columns, values in cells."""
    font = ImageFont.load_default()
    experts, labels = payload["experts"], payload["labels"]
    values = np.asarray([[np.nan if v is None else v for v in row] for row in payload["values"]], dtype=float)
    left = 8 + 7 * max((len(e) for e in experts), default=4)
    label_h = 8 + 6 * max((len(lab) for lab in labels), default=4)
    top = 24
    w = left + _CELL_W * len(labels) + 8
    h = top + _CELL_H * len(experts) + label_h
    img = Image.new("RGB", (max(w, 240), h), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), payload.get("title", ""), fill="black", font=font)
    for i, name in enumerate(experts):
        y = top + i * _CELL_H
        d.text((6, y + 5), name, fill="black", font=font)
        for j in range(len(labels)):
            v = values[i, j] if values.size else float("nan")
            x = left + j * _CELL_W
            if not np.isfinite(v):  # scope not seen (e.g. in this timestep bucket): empty cell
                d.rectangle([x, y, x + _CELL_W - 1, y + _CELL_H - 1], fill="white", outline=(230, 230, 230))
                d.text((x + 11, y + 5), "·", fill=(150, 150, 150), font=font)
                continue
            d.rectangle([x, y, x + _CELL_W - 1, y + _CELL_H - 1], fill=_color(v), outline=(230, 230, 230))
            d.text((x + 3, y + 5), f"{v:.2f}"[1:] if 0 <= v < 1 else f"{v:.1f}",
                   fill="white" if v > 0.55 else "black", font=font)
    for j, lab in enumerate(labels):  # vertical labels under the columns
        tmp = Image.new("RGB", (label_h, _CELL_W), "white")
        ImageDraw.Draw(tmp).text((4, 8), lab, fill="black", font=font)
        img.paste(tmp.rotate(90, expand=True), (left + j * _CELL_W, top + _CELL_H * len(experts) + 2))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_heatmap(payload: dict, path: str) -> None:
    render_heatmap(payload).save(path)
