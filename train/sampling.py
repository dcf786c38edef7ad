"""Sample with a MoLE on a diffusers pipeline and write PNGs carrying settings and gate statistics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import mole_core as mole
from mole_core import METHODS, Mixture, MoleError
from mole_core.checks import check_number, check_numbers
from mole_core.methods import step_labels
from mole_core.stats import bucket_labels, timestep_bucket

from .method_hooks import MethodHooks

MODES = ("gated", "uniform", "static", *METHODS)  # `method`: how the experts are mixed


@dataclass
class SampleSpec:
    """What to generate and how the experts are mixed. Errors name the fields in backticks, or as ``names``
    maps them (the CLI passes its flags)."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.5
    size: int | tuple[int, int] = 512  # square side, or (width, height)
    num: int = 1
    gates: str | None = None
    weights: list[float] | None = None
    uniform: bool = False
    mask: list[bool] | None = None
    strength: float = 1.0
    timestep_buckets: int = 4
    method: str | None = None  # switch | composite (training-free methods); None: from gates/weights/uniform
    switch_every: int = 1
    extra: dict = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # e.g. the CLI's flags

    def __post_init__(self) -> None:
        n = self._name
        if self.method is not None and self.method not in MODES:
            raise MoleError(f"{n('method')} must be one of {', '.join(MODES)}, got {self.method!r}")
        chosen = sum([self.gates is not None, self.weights is not None, self.uniform])
        if self.method in METHODS:
            if chosen:
                raise MoleError(f"{n('method')} {self.method} takes no {n('gates')}, {n('weights')} or {n('uniform')}")
        elif chosen != 1:
            raise MoleError(f"give exactly one of {n('gates')} FILE, {n('weights')} w1,w2,... or {n('uniform')} "
                            f"(or {n('method')} switch|composite)")
        if self.switch_every < 1:
            raise MoleError(f"{n('switch_every')} must be ≥ 1, got {self.switch_every}")
        check_number(self.steps, n("steps"), lo=1, hi=10000)
        check_number(self.num, n("num"), lo=1, hi=10000)
        for side in (self.width, self.height):
            check_number(side, n("size"), lo=8, hi=8192)
            if side % 8:
                raise MoleError(f"{n('size')} must be multiples of 8 (WxH or one side), got {self.width}x{self.height}")
        check_number(self.cfg, n("cfg"), lo=0, hi=100)
        self.strength = check_number(self.strength, n("strength"))
        if self.weights is not None:
            self.weights = check_numbers(self.weights, n("weights"))

    def _name(self, field_name: str) -> str:
        """How errors name a field: the front end's own name (``names``), else the field in backticks."""
        return self.names.get(field_name, f"`{field_name}`")

    @property
    def width(self) -> int:
        return self.size[0] if isinstance(self.size, tuple) else self.size

    @property
    def height(self) -> int:
        return self.size[1] if isinstance(self.size, tuple) else self.size

    @property
    def mode(self) -> str:
        """gated | static | uniform | switch | composite."""
        if self.method in METHODS:
            return self.method
        return "gated" if self.gates else "static" if self.weights is not None else "uniform"


def attach_mixture(pipe, experts: list[mole.Expert], *, gates: str | Path | mole.GateFile | None = None,  # noqa: ANN001
                   mode: str = "uniform", weights: list[float] | None = None, mask: list[bool] | None = None,
                   strength: float = 1.0) -> list[Mixture]:
    """With ``gates``: learned gates on the components the gate file covers and NLA on the others (the
    text encoders, for gates trained with the default NLA text encoders). Without: one ``mode`` mixture
    (``uniform`` or ``static`` with ``weights``) everywhere. Detach every returned mixture when done."""
    if gates is None:
        return [mole.attach(pipe, experts, mode=mode, weights=weights, mask=mask, strength=strength)]
    gf = gates if isinstance(gates, mole.GateFile) else mole.read_gate_file(gates)
    gated_comps = gf.components()
    mixes = [mole.attach(pipe, experts, gates=gf, mask=mask, strength=strength, components=gated_comps)]
    rest = [c for c in mole.index_model(pipe).components() if c not in gated_comps]
    if any(c in rest for e in experts for c in e.components()):
        mixes.append(mole.attach(pipe, experts, mode="uniform", mask=mask, strength=strength, components=rest))
    return mixes


class MergedMixture:
    """A fixed mixture merged into the model's weights, as a LoRA loader applies it: sampling runs at the bare
    model's speed (no hooks). :meth:`detach` puts the original weights back bit for bit."""

    def __init__(self, baked: mole.BakedWeights):
        self._baked = baked

    def detach(self) -> None:
        self._baked.restore()


def attach_merged(pipe, experts: list[mole.Expert], *, mode: str = "uniform",  # noqa: ANN001
                  weights: list[float] | None = None, strength: float = 1.0) -> list[MergedMixture]:
    """:func:`attach_mixture` without gates, merged into the weights: the same outputs up to float rounding, at
    the bare model's speed. Detach every returned mixture when done."""
    return [MergedMixture(mole.bake_into_model(m))
            for m in attach_mixture(pipe, experts, mode=mode, weights=weights, strength=strength)]


def attach_training_free(pipe, experts: list[mole.Expert], method: str, *, mask: list[bool] | None = None,  # noqa: ANN001
                         strength: float = 1.0, every: int = 1) -> list:
    """LoRA Switch or Composite: the UNet mixture driven by :class:`MethodHooks`, the text encoders at NLA.
    Returns the mixtures and the hooks (detach every one when done; the hooks first)."""
    unet = mole.attach(pipe, experts, mode="uniform", mask=mask, strength=strength, components=["unet"])
    out: list = [MethodHooks(pipe.unet, unet, method, lambda: pipe.scheduler.timesteps, every), unet]
    rest = [c for c in mole.index_model(pipe).components() if c != "unet"]
    if any(c in rest for e in experts for c in e.components()):
        out.append(mole.attach(pipe, experts, mode="uniform", mask=mask, strength=strength, components=rest))
    return out


def attach_for_sampling(pipe, experts: list[mole.Expert], spec: SampleSpec) -> list:  # noqa: ANN001
    """:func:`attach_mixture` (or :func:`attach_training_free`) for the CLI's sampling options."""
    if spec.mode in METHODS:
        return attach_training_free(pipe, experts, spec.mode, mask=spec.mask, strength=spec.strength,
                                    every=spec.switch_every)
    return attach_mixture(pipe, experts, gates=spec.gates if spec.mode == "gated" else None, mode=spec.mode,
                          weights=spec.weights, mask=spec.mask, strength=spec.strength)


def bucket_hook(mix: Mixture, buckets: int, T: int):  # noqa: ANN202
    """A UNet forward pre-hook (``with_kwargs=True``) that files the mixture's gate statistics under the
    call's timestep bucket (of ``buckets``, over ``T`` training timesteps)."""
    def hook(module, args, kwargs):  # noqa: ANN001, ANN202
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            mix.stats.bucket = timestep_bucket(t, buckets, T)
    return hook


def sample_images(pipe, experts: list[mole.Expert], spec: SampleSpec) -> list[tuple[Image.Image, dict]]:  # noqa: ANN001
    """Generate ``spec.num`` images (seed, seed+1, ...). Each comes with a JSON-able info dict:
    settings plus the per-block mean gates recorded while sampling (and per timestep bucket)."""
    attached = attach_for_sampling(pipe, experts, spec)
    hooks = attached[0] if spec.mode in METHODS else None  # Switch records per step, Composite per timestep
    mixes = [m for m in attached if isinstance(m, Mixture)]
    T = int(pipe.scheduler.config.num_train_timesteps)
    handle = pipe.unet.register_forward_pre_hook(bucket_hook(mixes[0], spec.timestep_buckets, T),
                                                 with_kwargs=True, prepend=True)
    out = []
    try:
        for i in range(spec.num):
            for m in mixes:
                m.stats.reset()
            if hooks is not None:
                hooks.steps.clear()
            gen = torch.Generator(device="cpu").manual_seed(spec.seed + i)
            image = pipe(spec.prompt, negative_prompt=spec.negative or None, num_inference_steps=spec.steps,
                         guidance_scale=spec.cfg, height=spec.height, width=spec.width, generator=gen).images[0]
            stats = mixes[0].stats.summary() if spec.mode in ("gated", *METHODS) else {}
            labels = (step_labels(stats.get("by_bucket", {})) if spec.mode == "switch"
                      else bucket_labels(spec.timestep_buckets, T) if stats else {})
            method = ({"switch_every": spec.switch_every, "switch_experts": list(hooks.steps)}
                      if spec.mode == "switch" else {})
            info = {"prompt": spec.prompt, "negative": spec.negative, "seed": spec.seed + i, "steps": spec.steps,
                    "cfg": spec.cfg, "size": f"{spec.width}x{spec.height}", "mode": spec.mode, "weights": spec.weights,
                    "mask": spec.mask, "strength": spec.strength, "gates": Path(spec.gates).name if spec.gates
                    else None, "experts": [e.name for e in experts], "mean_gates": stats.get("mean", {}),
                    "mean_gates_by_bucket": stats.get("by_bucket", {}), "bucket_labels": labels, **method, **spec.extra}
            out.append((image, info))
    finally:
        handle.remove()
        for m in attached:
            m.detach()
    return out


def save_png(image: Image.Image, info: dict, path: str | Path) -> Path:
    """PNG with the settings and gate statistics in a ``mole`` text chunk (plus ``parameters``)."""
    meta = PngInfo()
    meta.add_text("mole", json.dumps(info))
    meta.add_text("parameters", f"{info['prompt']}\nNegative prompt: {info['negative']}\nSteps: {info['steps']}, "
                                f"CFG scale: {info['cfg']}, Seed: {info['seed']}, Size: {info['size']}, "
                                f"MoLE: {info['mode']}")
    image.save(path, pnginfo=meta)
    return Path(path)


def image_grid(images: list[Image.Image], cols: int, labels: list[str] | None = None) -> Image.Image:
    """Tile images in a grid with an optional caption strip per tile."""
    from PIL import ImageDraw

    w, h = images[0].size
    strip = 14 if labels else 0
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(img.resize((w, h)), (x, y + strip))
        if labels:
            draw.text((x + 2, y + 1), labels[i][: max(4, w // 6)], fill="black")
    return grid
