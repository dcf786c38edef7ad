"""Canonical target names, LoRA-key parsing, gate scopes and execution order.

A *canonical name* is ``"<component>:<diffusers module path>"`` where component is
``unet``, ``te`` (first/only text encoder) or ``te2`` (SDXL's second text encoder), e.g.
``unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` or
``te:text_model.encoder.layers.3.self_attn.q_proj``. Text-encoder paths always keep the
``text_model.`` wrapper that transformers 5 dropped, so files of every era map alike.

Everything here is a pure function of strings: no torch, no model.
"""

from __future__ import annotations

import re

COMPONENTS = ("unet", "te", "te2")
GRANULARITIES = ("matrix", "layer", "block", "network")

# Multi-word identifiers of SD UNet / CLIP module paths, used to undo kohya's "." → "_".
_COMPOUNDS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v",
    "to_out", "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model",
    "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
    "layer_norm2", "input_blocks", "output_blocks", "middle_block", "in_layers", "out_layers",
    "emb_layers", "skip_connection", "time_embed", "label_emb", "token_embedding",
    "position_embedding", "text_projection", "class_embedding",
}
_MAX_COMPOUND = 3


def split_kohya(name: str) -> str:
    """Turn an underscore-joined module path back into a dotted one.

    ``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` →
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``.
    """
    words = name.split("_")
    parts: list[str] = []
    i = 0
    while i < len(words):
        for k in range(min(_MAX_COMPOUND, len(words) - i), 0, -1):
            cand = "_".join(words[i : i + k])
            if k == 1 or cand in _COMPOUNDS:
                parts.append(cand)
                i += k
                break
    return ".".join(parts)


# --- ComfyUI/LDM UNet paths → diffusers paths (SD1.x, SD2.x, SDXL: 2 res blocks per level) ---
_RESNET_LDM = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_TOP_LDM = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}


def _resnet_sub(rest: str) -> str:
    for ldm, diff in _RESNET_LDM.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diff + rest[len(ldm):]
    return rest


def ldm_to_diffusers_unet(path: str, layers_per_block: int = 2) -> str | None:
    """Map a ComfyUI/LDM UNet module path (``input_blocks.4.1.proj_in``) to diffusers naming.

    Returns None when the path is not a UNet path this mapping knows.
    """
    for ldm, diff in _TOP_LDM.items():
        if path == ldm or path.startswith(ldm + "."):
            return diff + path[len(ldm):]
    per_level = layers_per_block + 1
    m = re.match(r"input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        idx, sub, rest = int(m[1]), int(m[2]), m[3] or ""
        level, j = divmod(idx - 1, per_level)
        if j == layers_per_block:  # downsampler: input_blocks.N.0.op
            return _join(f"down_blocks.{level}.downsamplers.0.conv", rest.removeprefix("op").lstrip("."))
        if sub == 0:
            return _join(f"down_blocks.{level}.resnets.{j}", _resnet_sub(rest))
        return _join(f"down_blocks.{level}.attentions.{j}", rest)
    m = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        sub, rest = int(m[1]), m[2] or ""
        if sub == 1:
            return _join("mid_block.attentions.0", rest)
        return _join(f"mid_block.resnets.{sub // 2}", _resnet_sub(rest))
    m = re.match(r"output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        idx, sub, rest = int(m[1]), int(m[2]), m[3] or ""
        level, j = divmod(idx, per_level)
        if sub == 0:
            return _join(f"up_blocks.{level}.resnets.{j}", _resnet_sub(rest))
        if rest == "conv" or rest.startswith("conv."):
            return _join(f"up_blocks.{level}.upsamplers.0", rest)
        return _join(f"up_blocks.{level}.attentions.{j}", rest)
    return None


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head


def _te_path(path: str) -> str:
    """Normalise a CLIP text-encoder module path to the ``text_model.``-wrapped layout."""
    path = path.removeprefix("transformer.")
    if not path.startswith("text_model.") and not path.startswith("text_projection"):
        path = "text_model." + path
    return path


_OLD_ATTN_PROC = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                  "to_out_lora": "out_proj"}
_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding",
               "add_embedding", "conv_norm_out")
_LDM_ROOTS = ("input_blocks", "output_blocks", "middle_block", "time_embed", "label_emb", "out.")
_TE_ROOTS = ("text_model.", "encoder.layers.", "embeddings.", "final_layer_norm", "text_projection")


def _unet_path(path: str) -> str | None:
    path = re.sub(r"\.processor(\.|$)", r"\1", path)  # old attention-processor layout
    path = re.sub(r"(to_[qkv])_lora$", r"\1", path)
    path = re.sub(r"to_out_lora$", "to_out.0", path)
    if path.startswith(_LDM_ROOTS):
        return ldm_to_diffusers_unet(path)
    if path.startswith(_UNET_ROOTS):
        return path
    return None


def _te_module(path: str) -> str:
    last = path.rsplit(".", 1)[-1]
    if last in _OLD_ATTN_PROC:
        path = path[: -len(last)] + _OLD_ATTN_PROC[last]
    return _te_path(path)


def canonical_from_prefix(prefix: str, component_hint: str | None = None) -> str | None:
    """Map the module part of a LoRA key (suffix like ``.lora_down.weight`` removed) to a
    canonical name, or None if it is not a SD UNet / CLIP text-encoder module.

    Handles kohya (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``, ``lycoris_``),
    diffusers (``unet.``, ``text_encoder.``, ``text_encoder_2.``, old ``processor`` layout),
    PEFT (``base_model.model.``; ``component_hint`` says which model the folder belongs to),
    ComfyUI (``diffusion_model.``, ``text_encoders.clip_l.``) and bare diffusers paths.
    """
    kohya = re.match(r"(lora_unet|lycoris|lora_te2|lora_te1|lora_te)_(.+)$", prefix)
    if kohya:
        path = split_kohya(kohya[2])
        comp = {"lora_unet": "unet", "lycoris": "unet", "lora_te": "te", "lora_te1": "te",
                "lora_te2": "te2"}[kohya[1]]
        return _finish(comp, path)
    for head, comp in (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"),
                       ("diffusion_model.", "unet"), ("model.diffusion_model.", "unet")):
        if prefix.startswith(head):
            return _finish(comp, prefix[len(head):])
    m = re.match(r"text_encoders\.(clip_[lgh])\.(.+)$", prefix)
    if m:
        return _finish("te2" if m[1] == "clip_g" else "te", m[2])
    path = prefix.removeprefix("base_model.model.")
    if component_hint in COMPONENTS:
        return _finish(component_hint, path)
    if path.startswith(_TE_ROOTS):
        return _finish("te", path)
    return _finish("unet", path)


def _finish(component: str, path: str) -> str | None:
    if component == "unet":
        unet = _unet_path(path)
        return f"unet:{unet}" if unet else None
    if path.startswith(_TE_ROOTS) or path.startswith("transformer."):
        return f"{component}:{_te_module(path)}"
    return None


def split_name(name: str) -> tuple[str, str]:
    """``"unet:a.b"`` → ``("unet", "a.b")``."""
    comp, _, path = name.partition(":")
    if comp not in COMPONENTS or not path:
        raise ValueError(f"`name` must look like 'unet:<module path>', got {name!r}")
    return comp, path


def module_to_canonical(component: str, module_path: str) -> str:
    """Canonical name of a module found in a live diffusers/transformers model."""
    path = re.sub(r"(^|\.)_orig_mod\.", r"\1", module_path)  # torch.compile wrapper
    path = path.removeprefix("base_model.model.")
    if component != "unet":
        path = _te_path(path)
    return f"{component}:{path}"


# --- gate scopes (granularity) ---
_BLOCK_RE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.(?:attentions|resnets|downsamplers|upsamplers)\.\d+"
                       r"|mid_block\.(?:attentions|resnets)\.\d+)")
_LAYER_RE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+\.transformer_blocks\.\d+"
                       r"|mid_block\.attentions\.\d+\.transformer_blocks\.\d+)")
_TE_BLOCK_RE = re.compile(r"^(text_model\.encoder\.layers\.\d+)")
_TE_LAYER_RE = re.compile(r"^(text_model\.encoder\.layers\.\d+\.(?:self_attn|mlp))")


def scope_of(name: str, granularity: str) -> str:
    """Gate scope of a canonical target for a granularity (paper Table 9).

    - ``matrix``: the target itself;
    - ``layer``: a transformer layer (``...attentions.j.transformer_blocks.k``; CLIP ``self_attn``/``mlp``);
    - ``block``: a spatial-transformer / resnet / sampler block (CLIP: one encoder layer);
    - ``network``: one gate per component.
    Targets outside any block (``conv_in``, ``time_embedding``...) fall back to their top module.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}")
    comp, path = split_name(name)
    if granularity == "matrix":
        return name
    if granularity == "network":
        return f"{comp}:"
    if comp == "unet":
        m = (_LAYER_RE.match(path) if granularity == "layer" else None) or _BLOCK_RE.match(path)
    else:
        m = (_TE_LAYER_RE.match(path) if granularity == "layer" else None) or _TE_BLOCK_RE.match(path)
    return f"{comp}:{m[1] if m else path.split('.')[0]}"


# --- execution order: a pure function of names, identical for diffusers and ComfyUI ---
_ORDER = {
    "conv_in": 0, "time_embedding": -1, "add_embedding": -1, "down_blocks": 1, "mid_block": 2,
    "up_blocks": 3, "conv_norm_out": 4, "conv_out": 5,
    "resnets": 0, "attentions": 1, "downsamplers": 2, "upsamplers": 2,
    "norm1": 0, "conv1": 1, "time_emb_proj": 2, "norm2": 3, "conv2": 4, "conv_shortcut": 5,
    "norm": 0, "proj_in": 1, "transformer_blocks": 2, "proj_out": 3,
    "attn1": 1, "attn2": 3, "ff": 5, "norm3": 4,
    "to_q": 0, "to_k": 1, "to_v": 2, "to_out": 3,
    "embeddings": 0, "encoder": 1, "final_layer_norm": 2, "text_projection": 3,
    "layer_norm1": 0, "self_attn": 1, "layer_norm2": 2, "mlp": 3,
    "q_proj": 0, "k_proj": 1, "v_proj": 2, "out_proj": 3, "fc1": 0, "fc2": 1,
}


def execution_key(name: str) -> tuple:
    """Sort key giving the order in which SD/CLIP modules run in a forward pass."""
    comp, path = split_name(name)
    parts: list[tuple[int, int | str]] = []
    for p in path.split("."):
        parts.append((0, int(p)) if p.isdigit() else (1, _ORDER.get(p, 99), p))  # type: ignore[arg-type]
    return (COMPONENTS.index(comp), tuple(parts))


def block_label(scope: str) -> str:
    """Short human label for a scope, e.g. ``unet:down_blocks.1.attentions.0`` → ``down1.attn0``."""
    comp, path = scope.split(":", 1)
    if not path:
        return comp
    label = (path.replace("down_blocks.", "down").replace("up_blocks.", "up")
             .replace("mid_block.", "mid.").replace("attentions.", "attn")
             .replace("resnets.", "res").replace("transformer_blocks.", "tb")
             .replace("text_model.encoder.layers.", "L").replace("downsamplers.", "ds")
             .replace("upsamplers.", "us"))
    return label if comp == "unet" else f"{comp}.{label}"
