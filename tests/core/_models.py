"""Small real models and random experts for engine tests (no files, no downloads)."""

from __future__ import annotations

import torch
from torch import nn

from mole_core.expert import Expert, LoraFactor


class Attn(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](torch.tanh(self.to_q(t)) * self.to_k(t))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn1 = Attn(dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t + self.attn1(t)


class Attention2D(nn.Module):
    """A miniature spatial transformer: 1×1 conv proj_in, linear attention, as in SD1.x."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim), TransformerBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(x).flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            t = blk(t)
        return x + t.transpose(1, 2).reshape(b, c, h, w)


class Resnet(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.conv1(x))


class TinyNet(nn.Module):
    """Module names follow a diffusers UNet so scopes group like SD blocks."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(4, dim, 3, padding=1)
        self.down_blocks = nn.ModuleList([nn.Module()])
        self.down_blocks[0].resnets = nn.ModuleList([Resnet(dim), Resnet(dim)])
        self.down_blocks[0].attentions = nn.ModuleList([Attention2D(dim), Attention2D(dim)])
        self.mid_block = nn.Module()
        self.mid_block.attentions = nn.ModuleList([Attention2D(dim)])
        self.conv_out = nn.Conv2d(dim, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        d = self.down_blocks[0]
        for res, att in zip(d.resnets, d.attentions):
            x = att(res(x))
        x = self.mid_block.attentions[0](x)
        return self.conv_out(x)


def random_expert(model: nn.Module, rank: int, seed: int, *, alpha: float | None = None,
                  suffixes: tuple[str, ...] = ("to_q", "to_k", "to_out.0", "proj_in", "conv1"),
                  scale: float = 0.08, name: str | None = None) -> Expert:
    """An expert with random factors on every module whose name ends with one of ``suffixes``."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path, m in model.named_modules():
        if not path.endswith(suffixes):
            continue
        if isinstance(m, nn.Linear):
            down = torch.randn(rank, m.in_features, generator=g) * scale
            up = torch.randn(m.out_features, rank, generator=g) * scale
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size
            down = torch.randn(rank, m.in_channels, *k, generator=g) * scale / k[0]
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * scale
        else:
            continue
        factors[f"unet:{path}"] = LoraFactor(down, up, alpha=alpha)
    return Expert(name or f"expert{seed}", factors, sha256=f"{seed:064x}")


def naive_mixture(model: nn.Module, experts: list[Expert], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-expert loop (official-code style) reference: merged weights W + Σ w_i s_i ΔW_i."""
    out = {}
    for path, m in model.named_modules():
        key = f"unet:{path}"
        deltas = [w * e.strength * e.factors[key].delta() for w, e in zip(weights.tolist(), experts)
                  if key in e.factors]
        if deltas:
            out[path] = m.weight.detach() + sum(deltas).reshape(m.weight.shape)
    return out
