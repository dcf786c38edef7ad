"""The trainer's :class:`train.backend.Backend` over ComfyUI objects.

Two halves, one per thread:

* :class:`ComfyEncoder` runs in the prompt thread (inside the node, under the executor's inference
  mode): reference images through the ``VAE`` and the model's ``process_latent_in``; prompts through
  the ``CLIP`` and the model's own ``extra_conds`` (cross-attention context, SDXL's ADM vector ``y``).
  These are ordinary ComfyUI operations, run where ComfyUI runs them.
* :class:`ComfyBackend` runs in the training thread over a **private copy** of the diffusion model
  (:func:`private_copy`), so the queue and other prompts can load, patch or unload the shared model
  while the gates train; a job that trains the text encoders' gates re-encodes prompts through a
  private copy of the CLIP (:class:`.comfy_text.PrivateTextEncoder`).

Maths (VP ↔ VE). The trainer draws integer timesteps ``t`` and thinks in variance-preserving terms,
``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε``. ComfyUI's ``BaseModel.apply_model(x, σ)`` takes k-diffusion inputs
``x = x0 + σ ε`` and returns the denoised ``x0`` for every ε-family prediction type (ε, v, x0). With
``σ_t`` the model's own schedule (``model_sampling.sigmas``, including a sampling patch such as
ModelSamplingDiscrete), ``ᾱ_t = 1 / (1 + σ_t²)``, ``x_VE = x_t / √ᾱ_t`` and ``ε̂ = (x_VE − x̂0) / σ_t``:
exact for ε- and v-prediction models alike, so the backend reports ``prediction_type = "epsilon"``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Protocol

import comfy.model_management as mm
import comfy.model_sampling
import torch
from torch import nn

import mole_core

from ..train.data import CachedSet
from .comfy_index import build_index, unet_key_map
from .injection import holder_of

log = logging.getLogger(__name__)


# ----- checks and schedule -----
def check_trainable(patcher: Any) -> None:
    """One-line MoleError when the model cannot be trained by this backend.

    Supported: UNet models (SD1.x, SD2.x, SDXL) with an ε-family prediction (ε, v, x0) and a
    discrete noise schedule; not inpainting models (their input has extra channels) and not a
    model that already carries a gated MoLE.
    """
    base = patcher.model
    unet_key_map(base)  # raises for non-UNet models
    ms = base.model_sampling
    if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, comfy.model_sampling.IMG_TO_IMG):
        kinds = [c.__name__ for c in type(ms).__mro__ if c.__module__ == comfy.model_sampling.__name__]
        raise mole_core.MoleError(f"gate training needs an ε- or v-prediction model; this one samples with "
                                  f"{'/'.join(kinds)} (flow models are not supported)")
    sigmas = getattr(ms, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or len(sigmas) < 2:
        raise mole_core.MoleError("gate training needs a model with a discrete noise schedule (model_sampling.sigmas)")
    if base.concat_keys:
        raise mole_core.MoleError("inpainting/instruct models (extra input channels) are not supported for training")
    holder = holder_of(patcher)
    if holder is not None:
        raise mole_core.MoleError(f"`model` already carries a gated MoLE (MoLE Apply #{holder.node_id}); connect the "
                                  "model from before MoLE Apply")


def schedule(base: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas, alphas_cumprod)`` ``(T,)`` float32 on CPU, ``ᾱ_t = 1 / (1 + σ_t²)``."""
    sigmas = base.model_sampling.sigmas.detach().float().cpu().clone()
    return sigmas, 1.0 / (1.0 + sigmas * sigmas)


def training_memory(patcher: Any, resolution: int, batch_size: int, copy_weights: bool = True) -> int:
    """Bytes to ask model management for before the copy: the copied weights (none when they are shared)
    plus activations.

    Activations are kept for backward, so three times ComfyUI's own inference estimate for the batch
    (a heuristic; gate parameters and optimizer state are negligible).
    """
    base = patcher.model
    latent = base.latent_format.latent_channels
    side = max(1, resolution // 8)
    activations = base.memory_required([batch_size, latent, side, side])
    return int((patcher.model_size() if copy_weights else 0) + 3 * activations)


# ----- the private copy -----
def _replace_tensors(module: nn.Module, make: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
    """Replace each parameter and buffer ``t`` of ``module`` by ``make(t)`` (None: keep ``t``), outside inference
    mode; parameters stay frozen parameters."""
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                new = make(p)
                if new is not None:
                    setattr(sub, name, nn.Parameter(new, requires_grad=False))
            for name, b in list(sub.named_buffers(recurse=False)):
                new = make(b) if b is not None else None
                if new is not None:
                    sub._buffers[name] = new


def normalize_copy_(module: nn.Module) -> nn.Module:
    """Make a deep copy usable for autograd and free of foreign hooks, in place.

    Replaces every inference-mode parameter or buffer by a normal clone (ComfyUI loads weights under
    inference mode, and inference tensors cannot be saved for backward) and drops forward hooks the copy
    inherited from the original (e.g. another extension's injections): they belong to the original.
    """
    _replace_tensors(module, lambda t: t.detach().clone() if t.is_inference() else None)
    for sub in module.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._forward_hooks_with_kwargs,
                      sub._forward_pre_hooks_with_kwargs, sub._forward_hooks_always_called):
            hooks.clear()
    return module


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal-mode tensor on the same memory as ``t`` (an inference tensor cannot be saved for backward;
    a DLPack round trip makes a tensor without that flag and without a copy)."""
    return torch.utils.dlpack.from_dlpack(t.detach()) if t.is_inference() else t.detach()


def private_copy(patcher: Any, memory_required: int, share_weights: bool = False) -> Any:
    """A copy of ``patcher``'s ``BaseModel`` for training, made in the prompt thread.

    ComfyUI first loads the patcher in full (its LoRA patches and object patches applied, no lowvram
    deferral) after freeing ``memory_required`` bytes beyond it; then the module is deep-copied outside
    inference mode (references to patchers are cut) and normalised by :func:`normalize_copy_`. The copy
    lives on the patcher's load device; nothing of the shared model or of other clones changes.

    ``share_weights``: the copy's parameters and buffers use the loaded model's memory instead of their own
    (no second copy of the weights: a real-size SDXL fits in 24 GB only so). Only for a run that ends before
    anything else can load, patch or unload the model — the node's ``wait`` mode; a stopped job gets its own
    weights (:func:`own_weights`) before it is kept for a resume.
    """
    mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
    base = patcher.model
    memo: dict[int, Any] = {id(patcher): None}
    if base.current_patcher is not None:
        memo[id(base.current_patcher)] = None
    clone = _deep_copy(base, memo, share_weights)
    clone.current_patcher = None
    return normalize_copy_(clone).requires_grad_(False)


def _deep_copy(module: nn.Module, memo: dict[int, Any], share_weights: bool) -> nn.Module:
    """``copy.deepcopy`` outside inference mode; with ``share_weights`` the copy's parameters and buffers alias
    ``module``'s memory (:func:`_alias`)."""
    with torch.inference_mode(False):
        if share_weights:
            for p in module.parameters():
                memo[id(p)] = nn.Parameter(_alias(p), requires_grad=False)
            for b in module.buffers():
                memo[id(b)] = _alias(b)
        return copy.deepcopy(module, memo)


def own_weights(module: nn.Module, device: torch.device) -> bool:
    """Give a copy made with ``share_weights`` its own weights on ``device`` (a stopped job kept for a resume:
    other prompts may patch the shared ones next). False, and nothing changed, when ``device`` lacks the memory."""
    tensors = [*module.parameters(), *module.buffers()]
    if mm.get_free_memory(device) < 1.1 * sum(t.numel() * t.element_size() for t in tensors):
        return False
    _replace_tensors(module, lambda t: t.detach().to(device, copy=True))
    return True


def private_module(module: nn.Module, patcher: Any | None = None) -> nn.Module:
    """A normalised deep copy of any module with its own weights (the VAE decoder for the CLIP objective, a CLIP's
    text encoders), made after ``patcher`` is loaded in full (its patches applied)."""
    if patcher is not None:
        mm.load_models_gpu([patcher], force_full_load=True)
    memo: dict[int, Any] = {id(patcher): None} if patcher is not None else {}
    return normalize_copy_(_deep_copy(module, memo, share_weights=False)).requires_grad_(False)


# ----- prompt thread: encoding -----
class ComfyEncoder:
    """Encodes references and prompts with ComfyUI's VAE and CLIP (the first half of the backend).

    ``base`` is the *shared* ``BaseModel``: only its latent format and ``extra_conds`` are used.
    """

    def __init__(self, base: Any, vae: Any, clip: Any, resolution: int):
        self.base, self.vae, self.clip, self.resolution = base, vae, clip, resolution
        self.device = mm.intermediate_device()
        ratio = getattr(vae, "downscale_ratio", 8)
        if not isinstance(ratio, int):
            raise mole_core.MoleError("`vae` is a video/audio VAE; gate training needs an image VAE")
        self.vae_scale_factor = ratio

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → latents ``(B, C, h, w)`` as the UNet expects them."""
        pixels = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
        latents = self.vae.encode(pixels)
        want = self.base.latent_format.latent_channels
        if latents.dim() != 4 or latents.shape[1] != want:
            raise mole_core.MoleError(f"`vae` gives latents of shape {tuple(latents.shape[1:])}, the model expects "
                                      f"{want} channels: connect the VAE that belongs to this model")
        return self.base.process_latent_in(latents).to(self.device)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts → ``{"c_crossattn": (B, L, D), "y": (B, adm) for SDXL, ...}`` via the model's ``extra_conds``."""
        rows = [self._encode_one(p) for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _encode_one(self, text: str) -> dict[str, torch.Tensor]:
        out = self.clip.encode_from_tokens(self.clip.tokenize(text), return_dict=True)
        return model_conditioning(self.base, out, self.resolution, self.vae_scale_factor, self.device)


def model_conditioning(base: Any, clip_out: dict[str, Any], resolution: int, vae_scale_factor: int,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """A CLIP's ``encode_from_tokens(..., return_dict=True)`` → the tensors ``base.apply_model`` takes, via the
    model's own ``extra_conds`` (``c_crossattn``; SDXL's ADM vector ``y`` at ``resolution``)."""
    out = dict(clip_out)
    cond = out.pop("cond")
    side = resolution // vae_scale_factor
    noise = torch.zeros(1, base.latent_format.latent_channels, side, side)
    conds = base.extra_conds(**out, cross_attn=cond, device=device, noise=noise, width=resolution, height=resolution,
                             prompt_type="positive")
    tensors = {k: v.cond for k, v in conds.items() if isinstance(getattr(v, "cond", None), torch.Tensor)}
    if "c_crossattn" not in tensors:
        raise mole_core.MoleError("the model produced no cross-attention conditioning from `clip`")
    return {k: v.to(device) for k, v in tensors.items()}


def unify_lengths_(conds: list[dict[str, torch.Tensor]], length: int = 1) -> list[dict[str, torch.Tensor]]:
    """Repeat every context to a common token length (a multiple of ``length``) in place (ComfyUI's
    ``CONDCrossAttn`` rule: repetition does not change attention), so prompts of different lengths batch together."""
    common = math.lcm(length, *(c["c_crossattn"].shape[1] for c in conds))
    for c in conds:
        ctx = c["c_crossattn"]
        if ctx.shape[1] != common:
            c["c_crossattn"] = ctx.repeat(1, common // ctx.shape[1], 1)
    return conds


def unify_context(cache: CachedSet) -> CachedSet:
    """:func:`unify_lengths_` over the references' captions, so the trainer can batch them."""
    unify_lengths_(cache.conds)
    return cache


@dataclass
class PromptTable:
    """Conditioning of every prompt the compose objective can draw, encoded once in the prompt thread:
    ``lora`` through the CLIP with the experts' text-encoder parts (NLA, as training sees them), ``base``
    through the CLIP without any LoRA (the prior term's base model). All contexts share one token length."""

    lora: dict[str, dict[str, torch.Tensor]]
    base: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def encode(cls, lora: ComfyEncoder | None, base: ComfyEncoder, prompts: list[str]) -> PromptTable:
        """Both halves; ``lora`` None leaves that half empty (a job that encodes through its own CLIP copy)."""
        texts = sorted(set(prompts))
        rows = {"lora": [lora.encode_prompts([t]) for t in texts] if lora is not None else [],
                "base": [base.encode_prompts([t]) for t in texts]}
        unify_lengths_(rows["lora"] + rows["base"])
        return cls(dict(zip(texts, rows["lora"])), dict(zip(texts, rows["base"])))

    def to(self, device: torch.device) -> PromptTable:
        """Normal-mode clones on ``device`` (for the training thread)."""
        with torch.inference_mode(False):
            return PromptTable(*({p: {k: v.detach().clone().to(device) for k, v in c.items()} for p, c in t.items()}
                                 for t in (self.lora, self.base)))

    @property
    def length(self) -> int:
        """The token length every context in the table shares."""
        first = next(iter(self.base.values()), None)
        return int(first["c_crossattn"].shape[1]) if first is not None else 1

    @staticmethod
    def lookup(table: dict[str, dict[str, torch.Tensor]], prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in prompts if p not in table]
        if missing:
            raise mole_core.MoleError(f"prompt {missing[0]!r} was not encoded before training (ComfyUI encodes the "
                                      "composition, base and reference prompts once)")
        return {k: torch.cat([table[p][k] for p in prompts]) for k in table[prompts[0]]}


def cache_to(cache: CachedSet, device: torch.device) -> CachedSet:
    """Normal-mode clones of the cached latents and conditioning on ``device`` (training thread)."""
    with torch.inference_mode(False):
        latents = [x.detach().clone().to(device) for x in cache.latents]
        conds = [{k: v.detach().clone().to(device) for k, v in c.items()} for c in cache.conds]
    return CachedSet(latents, list(cache.cond_index), conds, list(cache.captions), list(cache.concepts), cache.crop)


# ----- training thread: the denoiser -----
class TextEncoder(Protocol):
    """What the backend needs of a text-encoder copy (:class:`.comfy_text.PrivateTextEncoder`)."""

    model: nn.Module  # the text encoders (``cond_stage_model``), indexed for the mixture

    def encode(self, text: str) -> dict[str, Any]:
        """One prompt → ``CLIP.encode_from_tokens(..., return_dict=True)``'s dict."""


class ComfyBackend:
    """:class:`train.backend.Backend` over a private ``BaseModel`` copy (see the module docstring)."""

    prediction_type = "epsilon"

    def __init__(self, model: Any, vae_model: nn.Module | None = None, vae_scale_factor: int = 8,
                 prompts: PromptTable | None = None, text: TextEncoder | None = None, resolution: int = 512):
        self.model = model
        self.vae_model = vae_model
        self.vae_scale_factor = vae_scale_factor
        self.prompts = prompts
        self.text = text
        self.resolution = resolution
        self.sigmas, self.alphas_cumprod = schedule(model)
        self.device = next(model.diffusion_model.parameters()).device
        self._sigmas_dev = self.sigmas.to(self.device)
        clip = SimpleNamespace(cond_stage_model=text.model) if text is not None else None
        self._index = build_index(SimpleNamespace(model=model), clip)[0]

    def mixture_target(self) -> mole_core.ModelIndex:
        """The private UNet's layers, and the private text encoders' when they are trained too."""
        return self._index

    def denoiser_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = [self.model.diffusion_model]
        mods += [self.text.model] if self.text is not None else []
        return mods + ([self.vae_model] if self.vae_model is not None else [])

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            log.warning("MoLE: gradient checkpointing is not available in ComfyUI training; ignored")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise mole_core.MoleError("images are encoded once in the prompt thread (ComfyEncoder)")

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning of ``prompts``: through the private text encoders (their gates attached) when the job
        trains them, else from the :class:`PromptTable` encoded in the prompt thread (objective compose)."""
        if self.text is not None:
            rows = [model_conditioning(self.model, self.text.encode(p), self.resolution, self.vae_scale_factor,
                                       self.device) for p in prompts]
            unify_lengths_(rows, self.prompts.length if self.prompts is not None else 1)
            return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        if self.prompts is None:
            raise mole_core.MoleError("prompts are encoded once in the prompt thread; text-encoder gates are "
                                      "trained only with the CLIP's private copy (gate_input router or trigger)")
        return PromptTable.lookup(self.prompts.lora, prompts)

    def encode_base_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning without any LoRA in the text encoders (the compose objective's prior term)."""
        if self.prompts is None:
            raise mole_core.MoleError("base prompts are encoded in the prompt thread (objective compose only)")
        return PromptTable.lookup(self.prompts.base, prompts)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent at ``resolution`` pixels (no VAE in the training thread)."""
        side = resolution // self.vae_scale_factor
        return self.model.latent_format.latent_channels, side, side

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """ε̂ for VP inputs ``x_t (B, C, h, w)`` at integer timesteps ``t (B,)`` (exact for ε and v models)."""
        sigma = self._sigmas_dev[t.to(self.device)]
        s = sigma.reshape(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        x_ve = x_t * torch.sqrt(1.0 + s * s)
        extra = {k: v for k, v in cond.items() if k != "c_crossattn"}
        denoised = self.model.apply_model(x_ve, sigma, c_crossattn=cond["c_crossattn"], transformer_options={},
                                          **extra)
        return (x_ve - denoised.to(x_ve.dtype)) / s

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents → images in [-1, 1] through the private VAE copy (CLIP objective only)."""
        if self.vae_model is None:
            raise mole_core.MoleError("decoding needs the VAE copy (objectives 'denoise + clip' and 'compose')")
        z = self.model.process_latent_out(latents)
        dtype = next(self.vae_model.parameters()).dtype
        return self.vae_model.decode(z.to(dtype)).float()
