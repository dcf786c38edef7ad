"""Toy CLIP: a small contrastive image–text model of the toy world, a differentiable guide.

:class:`ToyClip` embeds 32×32 images (``(B, 3, H, W)`` in [-1, 1]) and toy-world captions into one
L2-normalised space, so a generated image can be scored against a prompt (``encode_text``) or against
reference images (``encode_image``), with gradients flowing back to the pixels.

It is trained only on the generator's renders and their exact captions (every attribute value, base
and novel, in every combination) with a symmetric InfoNCE loss, under light noise / blur so that it
reads a diffusion model's samples too. It shares no code or weights with :mod:`mole_toy.probes`: the
probes stay an independent measurement of what the guide steers.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import world as W

Log = Callable[[str], None]
UNK = "<unk>"
FORMAT = "mole-toy-clip/1"
CONV_BLOCKS = 5  # image_net's convolutional blocks (then pooling and the projection head)


def toy_vocabulary() -> tuple[str, ...]:
    """``<unk>``, the grammar words ``a`` / ``on``, then every attribute value (``plain`` included)."""
    values = [v for a in W.ATTRIBUTES for v in W.ALL_VALUES[a]]
    return (UNK, "a", "on", *values)


@dataclass(frozen=True)
class ClipConfig:
    """Architecture of a :class:`ToyClip` (saved as JSON in the safetensors metadata)."""

    vocab: tuple[str, ...] = field(default_factory=toy_vocabulary)
    dim: int = 64
    width: int = 16
    word_dim: int = 64
    hidden: int = 128


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class ToyClip(nn.Module):
    """Image encoder (small conv net) and text encoder (bag of words + MLP) into a shared space."""

    def __init__(self, config: ClipConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ClipConfig()
        w = cfg.width
        self.image_net = nn.Sequential(
            _block(3, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1), _block(2 * w, 4 * w, 2),
            _block(4 * w, 4 * w, 1), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * w * 16, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))
        self.words = nn.Embedding(len(cfg.vocab), cfg.word_dim, padding_idx=0)  # <unk> stays the zero vector
        self.text_net = nn.Sequential(nn.Linear(cfg.word_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self._index = {word: i for i, word in enumerate(cfg.vocab)}

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learnt softmax temperature's inverse, ``exp(log_scale)`` capped at 100."""
        return self.log_scale.exp().clamp(max=100.0)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Word ids per text (lower-cased, punctuation dropped; unknown words → ``<unk>``)."""
        return [[self._index.get(w, 0) for w in re.findall(r"[a-z<>]+", t.lower())] for t in texts]

    @staticmethod
    def _resized(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (W.SIZE, W.SIZE):
            x = F.interpolate(x, size=(W.SIZE, W.SIZE), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > W.SIZE)
        return x.float()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → ``(B, D)`` unit vectors; resized (bilinear) to 32×32 if needed."""
        return F.normalize(self.image_net(self._resized(x)), dim=-1)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → the last convolutional block's features ``(B, 4w, 8, 8)`` (resized as
        :meth:`encode_image` does)."""
        return self.image_net[:CONV_BLOCKS](self._resized(x))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions → ``(B, D)`` unit vectors."""
        ids = self.tokenize(list(texts))
        if not ids:
            return self.words.weight.new_zeros(0, self.config.dim)
        flat = torch.tensor([i for row in ids for i in row] or [0], dtype=torch.long, device=self.words.weight.device)
        offsets = torch.tensor([0, *np.cumsum([len(r) for r in ids])[:-1].tolist()], dtype=torch.long,
                               device=flat.device)
        bags = F.embedding_bag(flat, self.words.weight, offsets, mode="sum", padding_idx=0)
        return F.normalize(self.text_net(bags), dim=-1)

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Logits ``(B_images, B_texts)``: scaled cosine similarities."""
        return self.logit_scale * self.encode_image(images) @ self.encode_text(texts).T


# ----- data -----

def to_input(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → ``(N, 3, H, W)`` float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image 3×3 gaussian blur with std ``sigma`` ``(B,)`` (0: identity)."""
    d = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-d[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # (B*3, 1, 3, 3)
    b, c, h, w = x.shape
    out = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (1, 1, 1, 1), mode="replicate"), k2, groups=b * c)
    return out.reshape(b, c, h, w)


def _amount(b: int, gen: torch.Generator, top: float) -> torch.Tensor:
    """Per-image strength uniform in [0, ``top``], shaped ``(B, 1, 1, 1)``."""
    return torch.rand(b, 1, 1, 1, generator=gen) * top


def augment(x: torch.Tensor, gen: torch.Generator, noise: float = 0.08, mottle: float = 0.08, blur: float = 0.8,
            shift: float = 0.04) -> torch.Tensor:
    """Diffusion-sample-like corruption of ``x`` in [-1, 1]: random blur (std ≤ ``blur`` px, half the
    images), pixel noise (std ≤ ``noise``), smooth mottling (8×8 noise upsampled, std ≤ ``mottle``) and
    a small per-channel offset (≤ ``shift``)."""
    b, _, h, w = x.shape
    sigma = torch.rand(b, generator=gen) * blur * (torch.rand(b, generator=gen) < 0.5)
    x = _blur(x, sigma)
    x = x + torch.randn(x.shape, generator=gen) * _amount(b, gen, noise)
    smooth = F.interpolate(torch.randn(b, 3, h // 4, w // 4, generator=gen), size=(h, w), mode="bilinear",
                           align_corners=False)
    x = x + smooth * _amount(b, gen, mottle)
    x = x + (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * shift
    return x.clamp(-1.0, 1.0)


def _render_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    specs = W.sample_specs(n, seed, W.ALL_VALUES)
    return to_input(W.render_batch(specs)), [W.caption(s) for s in specs]


# ----- training -----

def clip_loss(logits: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE; items with the same caption id in ``labels`` all count as positives.
    ``negatives`` ``(B_texts, H)``: logits of each caption against hard-negative images, which join the
    caption → image softmax as images no caption matches."""
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    t2i = logits.T
    if negatives is not None and negatives.shape[1]:
        t2i = torch.cat([t2i, negatives], 1)
        target_t2i = torch.cat([target, target.new_zeros(target.shape[0], negatives.shape[1])], 1)
    else:
        target_t2i = target
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(t2i, target_t2i))


def _hard_negative_pool(n: int, seed: int, dark: tuple[float, float]) -> torch.Tensor:
    """``n`` renders of dotted / striped shapes whose dark parts are off the world's contrast (brightness
    uniform in ``dark`` instead of :data:`world.DARK`): what no caption describes."""
    values = {**W.ALL_VALUES, "texture": tuple(t for t in W.TEXTURES if t != "plain")}
    rng = np.random.default_rng(seed)
    specs = W.sample_specs(n, seed, values)
    return to_input(np.stack([W.render(s, dark=float(rng.uniform(*dark))) for s in specs]))


def _lr(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_toy_clip(seed: int = 0, steps: int = 1200, images: int = 6000, batch: int = 128, lr: float = 2e-3,
                   config: ClipConfig | None = None, hard_negatives: int = 0,
                   negative_dark: tuple[float, float] = (0.0, 0.2), log: Log = print) -> tuple[ToyClip, dict]:
    """Train a :class:`ToyClip` on ``images`` fresh renders over every attribute value (deterministic in
    ``seed`` on one thread); returns the model (eval mode) and training info. ``hard_negatives`` per step:
    textured renders with the dark parts' brightness in ``negative_dark`` (off the world's contrast), shown
    to every caption as an image it does not describe, so texture contrast counts."""
    torch.manual_seed(seed)
    model = ToyClip(config)
    x_all, caps = _render_pool(images, seed + 1)
    x_neg = _hard_negative_pool(images // 2, seed + 3, negative_dark) if hard_negatives else None
    ids = {c: i for i, c in enumerate(sorted(set(caps)))}
    y_all = torch.tensor([ids[c] for c in caps])
    gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        texts = model.encode_text([caps[i] for i in idx.tolist()])
        logits = model.logit_scale * model.encode_image(augment(x_all[idx], gen)) @ texts.T
        negatives = None
        if x_neg is not None:
            neg = x_neg[torch.randint(0, len(x_neg), (hard_negatives,), generator=gen)]
            negatives = model.logit_scale * texts @ model.encode_image(augment(neg, gen)).T
        loss = clip_loss(logits, y_all[idx], negatives)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"  toy-clip step {step + 1}/{steps}  loss {np.mean(losses[-50:]):.4f}  "
                f"scale {model.logit_scale.item():.1f}  ({time.time() - t0:.0f} s)")
    model.eval()
    info = {"steps": steps, "images": images, "batch": batch, "lr": lr, "seed": seed,
            "final_loss": round(float(np.mean(losses[-50:])), 4), "seconds": round(time.time() - t0, 1)}
    if hard_negatives:
        info |= {"hard_negatives": hard_negatives, "negative_dark": list(negative_dark)}
    return model, info


# ----- evaluation -----

def _retrieval(model: ToyClip, n: int, gen: np.random.Generator, noisy: torch.Generator | None,
               group: int) -> dict:
    combos = W.combinations(W.ALL_VALUES)
    t2i = i2t = total = 0
    while total < n:
        specs = [W.random_layout(gen, combos[i]) for i in gen.choice(len(combos), group, replace=False)]
        x = to_input(W.render_batch(specs))
        x = augment(x, noisy) if noisy is not None else x
        sim = model.encode_image(x) @ model.encode_text([W.caption(s) for s in specs]).T
        truth = torch.arange(group)
        t2i += int((sim.argmax(0) == truth).sum())
        i2t += int((sim.argmax(1) == truth).sum())
        total += group
    return {"text_to_image": round(t2i / total, 4), "image_to_text": round(i2t / total, 4),
            "chance": round(1 / group, 4), "group": group, "images": total}


def _zero_shot(model: ToyClip, n: int, seed: int, noisy: torch.Generator | None) -> dict:
    combos = W.combinations(W.ALL_VALUES)
    index = {tuple(c[a] for a in W.ATTRIBUTES): i for i, c in enumerate(combos)}
    specs = W.sample_specs(n, seed, W.ALL_VALUES)
    x = to_input(W.render_batch(specs))
    x = augment(x, noisy) if noisy is not None else x
    sim = model.encode_image(x) @ model.encode_text([W.caption(c) for c in combos]).T  # (n, all captions)
    hits = {a: 0 for a in W.ATTRIBUTES}
    every = full = 0
    for i, spec in enumerate(specs):
        truth = spec.attributes
        ok = True
        for a in W.ATTRIBUTES:
            cand = [index[tuple(v if b == a else truth[b] for b in W.ATTRIBUTES)] for v in W.ALL_VALUES[a]]
            right = W.ALL_VALUES[a][int(sim[i, cand].argmax())] == truth[a]
            hits[a] += right
            ok &= right
        every += ok
        full += int(sim[i].argmax()) == index[tuple(truth[a] for a in W.ATTRIBUTES)]
    out = {a: {"accuracy": round(hits[a] / n, 4), "chance": round(1 / len(W.ALL_VALUES[a]), 4)} for a in W.ATTRIBUTES}
    out["all_attributes"] = round(every / n, 4)
    out["caption_top1"] = {"accuracy": round(full / n, 4), "chance": round(1 / len(combos), 5)}
    return out


@torch.no_grad()
def evaluate_toy_clip(model: ToyClip, n: int = 640, seed: int = 1000, group: int = 64) -> dict:
    """Held-out metrics on fresh renders (``seed`` apart from training), clean and lightly corrupted:
    retrieval top-1 among ``group`` distinct random captions (both directions), per-attribute zero-shot
    accuracy (the best of the captions that vary only that attribute), full-caption top-1; chance beside."""
    model.eval()
    out = {}
    for name, noise_seed in (("clean", None), ("noisy", seed + 3)):
        gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
        out[name] = {"retrieval": _retrieval(model, n, np.random.default_rng(seed + 1), gen, group),
                     "zero_shot": _zero_shot(model, n, seed + 2, gen)}
    out["images"], out["seed"] = n, seed
    return out


# ----- files -----

def save_toy_clip(model: ToyClip, path: str | Path) -> Path:
    """Write fp16 weights and the config (JSON metadata) as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(asdict(model.config))})
    return path


def load_toy_clip(path: str | Path) -> ToyClip:
    """The model saved at ``path``: fp32, eval mode, frozen (``requires_grad`` False)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a toy CLIP file (format {meta.get('format')!r}, expected {FORMAT!r})")
    cfg = json.loads(meta["config"])
    model = ToyClip(ClipConfig(**{**cfg, "vocab": tuple(cfg["vocab"])}))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    model.eval()
    model.requires_grad_(False)
    return model
