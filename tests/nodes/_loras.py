"""LoRA files for the tiny ComfyUI model, written directly with safetensors.

A LoRA is a dict ``{canonical name: (down, up)}`` (canonical = ``unet:<diffusers path>`` or
``te:text_model.…``) plus rank and alpha; writers turn it into the three layouts the nodes must
accept: kohya (``lora_unet_<diffusers path>``), ComfyUI (``diffusion_model.<LDM path>``,
``text_encoders.clip_l.transformer.…``) and PEFT style (``base_model.model.<diffusers path>`` /
``unet.<diffusers path>`` with ``lora_A/lora_B``, which core ComfyUI does not map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import comfy.utils
import torch
from safetensors.torch import save_file

ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
        "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
CONV_TARGETS = ("down_blocks.0.resnets.0.conv1", "up_blocks.3.resnets.2.conv2")  # 3×3 convs (LoCon)
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@dataclass
class Lora:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float | None

    def components(self) -> set[str]:
        return {k.split(":", 1)[0] for k in self.factors}


def unet_names(model) -> dict[str, str]:
    """diffusers module path → LDM module path of the tiny model's Linear/Conv weights."""
    out = {}
    for diff, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
        if diff.endswith(".weight"):
            out[diff[: -len(".weight")]] = ldm[: -len(".weight")]
    return out


def _targets(model, clip, attn: bool, conv: bool, te: bool) -> dict[str, torch.Size]:
    names = unet_names(model)
    sd = model.model.diffusion_model.state_dict()
    out = {}
    for diff, ldm in names.items():
        is_attn = ".attentions." in diff and (diff.endswith(("proj_in", "proj_out")) or diff.endswith(ATTN))
        if (attn and is_attn) or (conv and diff in CONV_TARGETS):
            out[f"unet:{diff}"] = sd[f"{ldm}.weight"].shape
    if te and clip is not None:
        csd = clip.cond_stage_model.state_dict()
        for encoder, comp in (("clip_l", "te"), ("clip_h", "te"), ("clip_g", "te2")):  # SDXL: l + g; SD2.x: h
            prefix = f"{encoder}.transformer."
            for k, v in csd.items():
                if k.startswith(prefix + "text_model.encoder.layers.") and k.endswith(".weight") \
                        and k[: -len(".weight")].endswith(TE_TARGETS):
                    out[f"{comp}:" + k[len(prefix): -len(".weight")]] = v.shape
    return out


def random_lora(model, clip=None, seed: int = 0, rank: int = 4, alpha: float | None = 2.0, attn: bool = True,
                conv: bool = True, te: bool = True, scale: float = 1.0) -> Lora:
    """Random factors for the tiny model; ``|ΔW|`` about ``scale`` × 30 % of a weight's size."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, shape in sorted(_targets(model, clip, attn, conv, te).items()):
        out_dim, fan_in = shape[0], math.prod(shape[1:])
        down = torch.randn(rank, *shape[1:], generator=gen) / math.sqrt(fan_in)
        up = torch.randn(out_dim, rank, *([1, 1] if len(shape) == 4 else []), generator=gen)
        up *= scale * 0.3 / math.sqrt(rank) * (rank / alpha if alpha else 1.0)
        factors[name] = (down.contiguous(), up.contiguous())
    return Lora(factors, rank, alpha)


def _split(name: str) -> tuple[str, str]:
    comp, path = name.split(":", 1)
    return comp, path


def write_kohya(lora: Lora, path: str | Path) -> Path:
    sd = {}
    sdxl = "te2" in lora.components()  # kohya SDXL: lora_te1_ (CLIP-L) and lora_te2_ (CLIP-G)
    prefixes = {"unet": "lora_unet_", "te": "lora_te1_" if sdxl else "lora_te_", "te2": "lora_te2_"}
    for name, (down, up) in lora.factors.items():
        comp, p = _split(name)
        key = prefixes[comp] + p.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        if lora.alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(lora.alpha))
    save_file(sd, str(path))
    return Path(path)


def write_comfy(lora: Lora, model, path: str | Path) -> Path:
    names = unet_names(model)
    sd = {}
    for name, (down, up) in lora.factors.items():
        comp, p = _split(name)
        encoder = "clip_g" if comp == "te2" else "clip_l"
        key = f"diffusion_model.{names[p]}" if comp == "unet" else f"text_encoders.{encoder}.transformer.{p}"
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        if lora.alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(lora.alpha))
    save_file(sd, str(path))
    return Path(path)


def write_peft(lora: Lora, path: str | Path, unet_prefix: str = "base_model.model.") -> Path:
    """PEFT/diffusers style, no alphas (scale 1): only valid for LoRAs made with ``alpha=None``
    or ``alpha == rank``."""
    assert lora.alpha in (None, lora.rank), "PEFT-style files carry no alpha"
    sd = {}
    for name, (down, up) in lora.factors.items():
        comp, p = _split(name)
        key = f"{unet_prefix}{p}" if comp == "unet" else f"text_encoder.{p}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
    save_file(sd, str(path))
    return Path(path)


def write_other_family(path: str | Path, seed: int = 0) -> Path:
    """A kohya LoRA for an SDXL-sized model: layer names SD1.5 lacks, and 640-wide layers where the
    names exist (``lora_unet_down_blocks_1_attentions_0_proj_in``) — 0 targets fit the tiny SD1.5."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, dim in (("lora_unet_down_blocks_1_attentions_0_proj_in", 640),
                     ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_7_attn1_to_q", 1280),
                     ("lora_te2_text_model_encoder_layers_30_self_attn_q_proj", 1280)):
        sd[f"{key}.lora_down.weight"] = torch.randn(4, dim, generator=gen)
        sd[f"{key}.lora_up.weight"] = torch.randn(dim, 4, generator=gen)
        sd[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))
    return Path(path)


def write_loha(model, path: str | Path, seed: int = 0) -> Path:
    """A LoHa (kohya names) on two attention layers of the tiny model."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for module in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in"):
        weight = model.model.diffusion_model.state_dict()[f"{unet_names(model)[module]}.weight"]
        out_dim, in_dim = weight.shape[0], math.prod(weight.shape[1:])
        key = "lora_unet_" + module.replace(".", "_")
        for i in (1, 2):
            sd[f"{key}.hada_w{i}_a"] = torch.randn(out_dim, 2, generator=gen) * 0.3
            sd[f"{key}.hada_w{i}_b"] = torch.randn(2, in_dim, generator=gen) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path))
    return Path(path)


DORA_MODULES = {  # module → the axis its DoRA magnitude is on
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "output",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input",
    "mid_block.attentions.0.proj_in": "output",  # a 1×1 conv in the SD1.5 topology
}


def write_dora(model, path: str | Path, seed: int = 0) -> Path:
    """A DoRA (kohya / LyCORIS names: ``lora_down``/``lora_up``/``alpha`` + ``dora_scale``) on three layers of
    the tiny model, with the magnitude on the output axis (shape ``(out, 1[, 1, 1])``) or the input axis
    (``(1, in[, 1, 1])``), near the base weight's own norms so the decomposition matters."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for module, axis in DORA_MODULES.items():
        weight = model.model.diffusion_model.state_dict()[f"{unet_names(model)[module]}.weight"].float()
        out_dim, in_dim = weight.shape[0], math.prod(weight.shape[1:])
        key = "lora_unet_" + module.replace(".", "_")
        conv = weight.dim() == 4
        sd[f"{key}.lora_down.weight"] = torch.randn(2, *weight.shape[1:], generator=gen) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(out_dim, 2, *([1, 1] if conv else []), generator=gen) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(1.0)
        flat = weight.reshape(out_dim, in_dim)
        norms = flat.norm(dim=1) if axis == "output" else flat.norm(dim=0)
        scale = norms * (1 + 0.3 * torch.randn(norms.shape, generator=gen))
        shape = (out_dim, 1) if axis == "output" else (1, in_dim)
        sd[f"{key}.dora_scale"] = scale.reshape(*shape, *([1, 1] if conv else []))
    save_file(sd, str(path))
    return Path(path)


LYCORIS_KINDS = ("loha_tucker", "lokr", "glora", "oft", "boft", "dora_loha")
_LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # square: GLoRA's layouts tell apart by W
_SQUARE = "mid_block.attentions.0.transformer_blocks.0.attn1.to_k"
_CONV = "down_blocks.0.resnets.0.conv1"  # 3×3


def _divisor(n: int, near: int) -> int:
    return max(d for d in range(1, near + 1) if n % d == 0)


def _lycoris_module(kind: str, weight: torch.Tensor, gen: torch.Generator, layer: str) -> dict[str, torch.Tensor]:
    """The tensors of one ``kind`` module for a layer of base ``weight`` (LyCORIS names, as ComfyUI reads them)."""
    def rnd(*shape, s=0.3):
        return torch.randn(*shape, generator=gen) * s

    o, i, conv, r = weight.shape[0], weight.shape[1], weight.dim() == 4, 2
    kernel = tuple(weight.shape[2:])
    if kind == "loha_tucker":  # Tucker cores on the 3×3 conv, plain LoHa on the Linear
        if conv:
            return {"hada_w1_a": rnd(r, o), "hada_w1_b": rnd(r, i), "hada_t1": rnd(r, r, *kernel),
                    "hada_w2_a": rnd(r, o), "hada_w2_b": rnd(r, i), "hada_t2": rnd(r, r, *kernel),
                    "alpha": torch.tensor(1.0)}
        return {"hada_w1_a": rnd(o, r), "hada_w1_b": rnd(r, i), "hada_w2_a": rnd(o, r), "hada_w2_b": rnd(r, i),
                "alpha": torch.tensor(1.0)}
    if kind == "lokr":  # the conv's w2 whole (a Tucker core trips ComfyUI's own LoKr code on this torch: it logs an
        a, b = _divisor(o, 4), _divisor(i, 4)  # error and skips the layer); the Linear's w1 decomposed
        if conv:
            return {"lokr_w1": rnd(a, b), "lokr_w2": rnd(o // a, i // b, *kernel), "alpha": torch.tensor(1.0)}
        return {"lokr_w1_a": rnd(a, r), "lokr_w1_b": rnd(r, b), "lokr_w2": rnd(o // a, i // b),
                "alpha": torch.tensor(1.0)}
    if kind == "glora":
        if layer == _SQUARE:  # the old LyCORIS layout: b2 b1 + W a2 a1
            return {"a1.weight": rnd(r, i), "a2.weight": rnd(i, r), "b1.weight": rnd(r, i), "b2.weight": rnd(o, r),
                    "alpha": torch.tensor(1.0)}
        return {"a1.weight": rnd(i, r), "a2.weight": rnd(r, i), "b1.weight": rnd(o, r),
                "b2.weight": rnd(r, i, *kernel), "alpha": torch.tensor(1.0)}
    if kind == "oft":  # the conv's rotation clamped by alpha; the Linear's not (alpha 0); rescale unused
        b = _divisor(o, 8)
        return {"oft_blocks": rnd(o // b, b, b), "alpha": torch.tensor(0.5 if conv else 0.0),
                "rescale": 1 + rnd(o, *([1] * (weight.dim() - 1)))}
    if kind == "boft":  # two butterfly stages of 4×4 blocks, with rescale
        return {"oft_blocks": rnd(2, o // 4, 4, 4), "alpha": torch.tensor(0.5 if conv else 100.0),
                "rescale": 1 + rnd(o, *([1] * (weight.dim() - 1)))}
    if kind == "dora_loha":  # LoHa with a DoRA magnitude on the output axis
        flat = weight.reshape(o, -1).float()
        return {**_lycoris_module("loha_tucker", weight, gen, layer),
                "dora_scale": (flat.norm(dim=1) * (1 + rnd(o))).reshape(o, *([1] * (weight.dim() - 1)))}
    raise ValueError(kind)


def write_lycoris(model, path: str | Path, kind: str, seed: int = 0) -> Path:
    """A LyCORIS module of ``kind`` (:data:`LYCORIS_KINDS`) on a Linear and a 3×3 conv of the tiny model (GLoRA:
    also a square Linear in the old layout), kohya names."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    layers = (_LINEAR, _CONV, _SQUARE) if kind == "glora" else (_LINEAR, _CONV)
    for module in layers:
        weight = model.model.diffusion_model.state_dict()[f"{unet_names(model)[module]}.weight"]
        key = "lora_unet_" + module.replace(".", "_")
        sd.update({f"{key}.{role}": t.contiguous() for role, t in _lycoris_module(kind, weight, gen, module).items()})
    save_file(sd, str(path))
    return Path(path)
