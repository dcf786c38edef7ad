"""The toy world: attributes, a procedural 32×32 image generator with exact captions, concepts.

An image shows one shape of one colour and texture on a plain background, captioned
``"a {colour} [{texture}] {shape} on {background}"`` (the texture word is omitted for ``plain``).
Each attribute has *base* values (the base model is trained on all their combinations) and one
*novel* value, never seen by the base model, that a concept LoRA teaches with its trigger word.

Rendering is exact and deterministic: shapes are drawn at 4× resolution with PIL, the texture is a
brightness pattern (dark parts = ``DARK`` × colour), then the image is box-downsampled to 32×32.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4
DARK = 0.5  # brightness of a texture's dark parts, relative to the colour
STRIPE_PERIOD = 8.0  # px along an axis (diagonal stripes: ~5.7 px across)
DOT_SPACING = 7.0  # px between dot centres
DOT_RADIUS = 2.1  # px
CENTRE_JITTER = 1.0  # px, uniform in ±
SIZE_RANGE = (10.0, 11.0)  # px, the shape's nominal radius
# Textures are anchored to the image grid (phase 0), not to the shape: a fixed pattern is much faster
# for the tiny diffusion model to learn than one with a random phase.

ATTRIBUTES = ("colour", "texture", "shape", "background")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "purple": (150, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "black": (25, 25, 25), "white": (235, 235, 235), "pink": (240, 160, 190),
}
TEXTURES = ("plain", "dotted", "striped")
SHAPES = ("circle", "square", "triangle", "cross", "star")

NOVEL: dict[str, str] = {"colour": "purple", "texture": "striped", "shape": "star", "background": "pink"}
ALL_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "texture": TEXTURES, "shape": SHAPES, "background": tuple(BACKGROUNDS),
}
BASE_VALUES: dict[str, tuple[str, ...]] = {a: tuple(v for v in vs if v != NOVEL[a]) for a, vs in ALL_VALUES.items()}


@dataclass(frozen=True)
class Concept:
    """A novel attribute value taught by one LoRA; ``trigger`` is the caption word that activates it."""

    name: str
    attribute: str
    value: str

    @property
    def trigger(self) -> str:
        return self.value


CONCEPTS: tuple[Concept, ...] = tuple(Concept(v, a, v) for a, v in NOVEL.items())


def concept(name: str) -> Concept:
    """The concept called ``name`` (``purple``, ``striped``, ``star``, ``pink``)."""
    for c in CONCEPTS:
        if c.name == name:
            return c
    raise KeyError(f"unknown concept {name!r}; known: {[c.name for c in CONCEPTS]}")


@dataclass(frozen=True)
class Spec:
    """Everything that defines one image: attribute values and layout (pixels, at 32×32 scale)."""

    colour: str
    texture: str
    shape: str
    background: str
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    radius: float = 10.0
    phase: float = 0.0  # texture offset in px

    @property
    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)


def caption(attrs: dict[str, str] | Spec) -> str:
    """``"a purple striped star on pink"``; a ``plain`` texture is not named."""
    a = attrs.attributes if isinstance(attrs, Spec) else attrs
    texture = "" if a["texture"] == "plain" else f" {a['texture']}"
    return f"a {a['colour']}{texture} {a['shape']} on {a['background']}"


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of :func:`caption` (raises ``ValueError`` on any other sentence)."""
    words = text.strip().split()
    if len(words) not in (5, 6) or words[0] != "a" or words[-2] != "on":
        raise ValueError(f"not a toy-world caption: {text!r}")
    texture = words[2] if len(words) == 6 else "plain"
    attrs = {"colour": words[1], "texture": texture, "shape": words[-3], "background": words[-1]}
    for a, v in attrs.items():
        if v not in ALL_VALUES[a]:
            raise ValueError(f"{text!r}: unknown {a} {v!r}")
    return attrs


# ----- rendering -----

def _star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        rr = r if k % 2 == 0 else r * inner
        ang = -math.pi / 2 + k * math.pi / points
        out.append((cx + rr * math.cos(ang), cy + rr * math.sin(ang)))
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """Fill ``shape`` (value 255) centred at (cx, cy) with nominal radius ``r`` (all in canvas px)."""
    if shape == "circle":
        rr = 0.95 * r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)
    elif shape == "square":
        h = 0.82 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        rr = 1.12 * r
        pts = [(cx + rr * math.cos(a), cy + 0.18 * r + rr * math.sin(a))
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=255)
    elif shape == "cross":
        arm, half = 1.0 * r, 0.36 * r
        draw.rectangle([cx - arm, cy - half, cx + arm, cy + half], fill=255)
        draw.rectangle([cx - half, cy - arm, cx + half, cy + arm], fill=255)
    elif shape == "star":
        draw.polygon(_star(cx, cy + 0.08 * r, 1.12 * r, inner=0.5), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _texture(texture: str, n: int, scale: int, phase: float, dark: float = DARK) -> np.ndarray:
    """Brightness factor map ``(n, n)`` in {``dark``, 1} (before downsampling)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / scale + 0.5 / scale
    if texture == "plain":
        return np.ones((n, n))
    if texture == "striped":
        on = np.mod(xx + yy + phase, STRIPE_PERIOD) < STRIPE_PERIOD / 2
        return np.where(on, 1.0, dark)
    if texture == "dotted":
        dx = np.mod(xx + phase, DOT_SPACING) - DOT_SPACING / 2
        dy = np.mod(yy + phase, DOT_SPACING) - DOT_SPACING / 2
        return np.where(dx * dx + dy * dy < DOT_RADIUS**2, dark, 1.0)
    raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}")


def render(spec: Spec, dark: float = DARK) -> np.ndarray:
    """The image of ``spec``: ``(32, 32, 3)`` uint8, anti-aliased by 4× supersampling. ``dark`` other than
    :data:`DARK` draws the texture off the world's contrast (the toy CLIP's hard negatives)."""
    n = SIZE * SUPERSAMPLE
    mask_img = Image.new("L", (n, n), 0)
    s = SUPERSAMPLE
    _draw_shape(ImageDraw.Draw(mask_img), spec.shape, spec.cx * s, spec.cy * s, spec.radius * s)
    mask = np.asarray(mask_img, dtype=np.float64)[..., None] / 255.0
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float64) * _texture(spec.texture, n, s, spec.phase, dark)[..., None]
    bg = np.asarray(BACKGROUNDS[spec.background], dtype=np.float64)
    img = mask * fg + (1.0 - mask) * bg
    img = img.reshape(SIZE, s, SIZE, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def shape_mask(spec: Spec) -> np.ndarray:
    """Ground-truth coverage ``(32, 32)`` in [0, 1] of the shape (for tests and probes)."""
    n = SIZE * SUPERSAMPLE
    mask_img = Image.new("L", (n, n), 0)
    _draw_shape(ImageDraw.Draw(mask_img), spec.shape, spec.cx * SUPERSAMPLE, spec.cy * SUPERSAMPLE,
                spec.radius * SUPERSAMPLE)
    m = np.asarray(mask_img, dtype=np.float64) / 255.0
    return m.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


# ----- sampling specs -----

def combinations(values: dict[str, tuple[str, ...]]) -> list[dict[str, str]]:
    """All attribute combinations from per-attribute value lists, in a fixed order."""
    return [dict(zip(ATTRIBUTES, combo)) for combo in itertools.product(*(values[a] for a in ATTRIBUTES))]


def random_layout(rng: np.random.Generator, attrs: dict[str, str]) -> Spec:
    """``attrs`` with a random centre and size."""
    cx, cy = SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
    return Spec(**attrs, cx=float(cx), cy=float(cy), radius=float(rng.uniform(*SIZE_RANGE)))


def sample_specs(n: int, seed: int, values: dict[str, tuple[str, ...]] | None = None) -> list[Spec]:
    """``n`` specs cycling through every combination of ``values`` (default: base values) in a shuffled
    order, each with a random layout; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    combos = combinations(values or BASE_VALUES)
    specs: list[Spec] = []
    while len(specs) < n:
        for i in rng.permutation(len(combos)):
            specs.append(random_layout(rng, combos[i]))
            if len(specs) == n:
                break
    return specs


def concept_values(concepts: Iterable[Concept | str]) -> dict[str, tuple[str, ...]]:
    """Base values for every attribute, except the concepts' attributes, fixed to their novel value."""
    values = dict(BASE_VALUES)
    for c in concepts:
        c = concept(c) if isinstance(c, str) else c
        values[c.attribute] = (c.value,)
    return values


def render_batch(specs: list[Spec]) -> np.ndarray:
    """``(N, 32, 32, 3)`` uint8."""
    return np.stack([render(s) for s in specs]) if specs else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def with_attrs(spec: Spec, **attrs: str) -> Spec:
    """``spec`` with some attribute values replaced (same layout)."""
    return replace(spec, **attrs)


def iter_images(specs: list[Spec]) -> Iterator[tuple[Image.Image, str]]:
    """PIL images with their captions."""
    for s in specs:
        yield Image.fromarray(render(s)), caption(s)


def save_grid(images: np.ndarray | list[np.ndarray], path: str | Path, cols: int = 8, scale: int = 3) -> Path:
    """Save ``(N, H, W, 3)`` uint8 images as one PNG grid, upscaled ``scale``× (nearest) for viewing."""
    imgs = np.asarray(images)
    n, h, w, _ = imgs.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = im
    out = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return Path(path)
