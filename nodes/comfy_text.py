"""A CLIP's text encoders for the training thread, for jobs that train the text encoders' gates.

Router and trigger gates decide in the text encoder, so every training step (and every text-level candidate of
the block search) re-encodes prompts through the gated CLIP. ComfyUI's ``CLIP`` object belongs to the prompt
thread — its patcher loads, patches and unloads the shared ``cond_stage_model`` — so the node copies that module
(the input CLIP's own patches applied, as ComfyUI loads it) and the tokenizer, and the job encodes with the copies:
the calls of ``CLIP.encode_from_tokens(CLIP.tokenize(text), return_dict=True)``, clip skip included, made
differentiable (see :func:`_own_copy`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .comfy_backend import private_module


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """What autograd keeps of an activation: a copy. ComfyUI's text encoders are written for inference and add
    residuals in place (``x += attn(norm(x))``), which would overwrite what ``norm`` saved for backward."""
    return t.clone() if t.requires_grad else t


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


class PrivateTextEncoder:
    """A private copy of ``clip``'s text encoders and tokenizer, made in the prompt thread.

    The copy owns its weights, in every run mode: loading the UNet or the VAE next may unload the CLIP, and
    ComfyUI restores an unloaded model's unpatched weights in place — a copy on shared memory would lose the
    connected CLIP's own LoRA patches mid-training. (A text encoder is small next to the UNet, whose copy
    shares the loaded weights in ``wait`` mode.)
    """

    def __init__(self, clip: Any):
        self.model = private_module(clip.cond_stage_model, clip.patcher)
        self.tokenizer = copy.deepcopy(clip.tokenizer)  # a tokenizer is not safe to share between threads
        self.tokenizer_options = dict(getattr(clip, "tokenizer_options", {}) or {})
        self.layer_idx = clip.layer_idx
        self.load_device = clip.patcher.load_device
        self.offload_device = clip.patcher.offload_device

    def encode(self, text: str) -> dict[str, torch.Tensor]:
        """``{"cond": (1, L, D), "pooled_output": ..., ...}`` for one prompt, with whatever gates are attached
        to the copy (differentiable: no ``no_grad`` on the way)."""
        kwargs = {"tokenizer_options": self.tokenizer_options} if self.tokenizer_options else {}
        tokens = self.tokenizer.tokenize_with_weights(text, False, **kwargs)
        self.model.reset_clip_options()
        if self.layer_idx is not None:
            self.model.set_clip_options({"layer": self.layer_idx})
        with torch.autograd.graph.saved_tensors_hooks(_own_copy, _as_is):
            o = self.model.encode_token_weights(tokens)
        return {"cond": o[0], "pooled_output": o[1], **(o[2] if len(o) > 2 else {})}

    def to(self, device: torch.device) -> PrivateTextEncoder:
        """Move the copy (a job parked on the offload device, or resumed on the load device)."""
        self.model.to(device)
        return self
