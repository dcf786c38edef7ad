"""The composition objective: train gates on images sampled from the *composed* prompts.

Each training step draws a batch of prompts — composition prompts (naming one or more concepts) and
base prompts (naming none) — samples them from pure noise with a short DDIM rollout under
classifier-free guidance, with the gated mixture active, and scores the last step:

- *global guidance*: ``1 − cos`` between the image-text guide's embedding of the decoded predicted x0
  and its embedding of the prompt (the paper's CLIP similarity to the composed prompt);
- *local guidance*: ``1 − cos`` to the mean embedding of each named concept's reference images;
- *prior preservation* (base prompts): MSE between the gated model's guided noise prediction and the
  base model's (no LoRA, in the UNet or the text encoders) on the same noisy latents;
- *naming* (``route_weight``, ``gate_input="router"`` only): binary cross-entropy between each LoRA's router
  logit and whether the prompt names its concept — the trigger words the trainer already knows, taught to
  the one decision every scope reuses; how strongly each scope then runs a named LoRA stays the guidance's.

Gradients flow through **one rollout step** (the earlier steps run without a graph), so memory is that
of one guided denoiser call: the last step (``grad_step = last``, the official code's one-step
truncation) or, by default, a step drawn at random per training step (``random``), scoring that step's
predicted x0 — at high noise the prediction already shows colour and shape, which the last step can no
longer change. The rollout's noise and step come from the trainer's seeded generator: same seed, same gates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from mole_core import Mixture, MoleError
from mole_core.triggers import trigger_words

from .backend import Backend
from .config import TrainConfig
from .dark_view import dark_to_background
from .texture import texture_scores


class ImageTextGuide(Protocol):
    """A frozen image-text model (open_clip through :class:`train.objectives.ClipGuide`, or the toy CLIP)."""

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → unit embeddings ``(B, D)`` (differentiable)."""

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Prompts → unit embeddings ``(B, D)``."""


@dataclass
class ComposePrompts:
    """What the composition objective samples: prompts that name concepts, and prompts that name none."""

    compositions: list[str]
    base: list[str]

    def __post_init__(self) -> None:
        if not self.compositions:
            raise MoleError("objective 'compose' needs at least one composition prompt")


def _bare(word: str) -> str:
    """A prompt word as concept names are matched: lower case, punctuation stripped."""
    return re.sub(r"[^\w-]", "", word.lower())


def names_a_concept(word: str, concepts: list[str]) -> bool:
    """Whether ``word`` (one whitespace-separated prompt word) is a concept's name."""
    return _bare(word) in {c.lower() for c in concepts if c}


def named_concepts(prompt: str, concepts: list[str]) -> list[str]:
    """Concepts whose name appears in ``prompt`` as a whole word (case-insensitive): name each
    reference sub-folder after its LoRA's trigger word."""
    words = set(re.findall(r"[\w-]+", prompt.lower()))
    return [c for c in concepts if c and c.lower() in words]


def twin_prompt(prompt: str, concepts: list[str]) -> str:
    """``prompt`` without the concepts' names (whole words, case-insensitive): what the prompt asks of
    the base model alone, so the gated model should draw it as the base model does."""
    return " ".join(w for w in prompt.split() if not names_a_concept(w, concepts))


def rollout_timesteps(T: int, steps: int) -> list[int]:
    """Integer timesteps of a ``steps``-step DDIM rollout, from ``T − 1`` down to 0 (evenly spaced)."""
    if steps < 1:
        raise MoleError(f"`rollout_steps` must be ≥ 1, got {steps}")
    return [round((T - 1) * (1 - i / steps)) for i in range(steps)]


def x0_and_eps(prediction_type: str, alphas: torch.Tensor, x_t: torch.Tensor, out: torch.Tensor, t: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoised estimate and noise from a model output (ε, v or x0); finite at zero terminal SNR for v."""
    a = alphas[t].to(x_t.dtype)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "v_prediction":
        return sa * x_t - sb * out, sb * x_t + sa * out
    if prediction_type == "sample":
        return out, (x_t - sa * out) / sb
    return (x_t - sb * out) / sa, out


def _cat_cond(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


class ComposeObjective:
    """The per-step loss of objective ``compose`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, backend: Backend, mixtures: list[Mixture], guide: ImageTextGuide,
                 prompts: ComposePrompts, ref_embeddings: dict[str, torch.Tensor], latent_shape: tuple[int, ...],
                 ref_grams: dict[str, torch.Tensor] | None = None):
        """``ref_grams`` (:func:`train.texture.reference_grams`): the texture term's references, needed when
        ``cfg.search_texture_weight`` is above 0."""
        if cfg.search_texture_weight and ref_grams is None:
            raise MoleError("`search_texture_weight` needs the references' Gram matrices (train.texture)")
        self.cfg, self.backend, self.mixtures, self.guide = cfg, backend, mixtures, guide
        self.prompts = prompts
        self.ref_emb, self.ref_grams = ref_embeddings, ref_grams
        self.latent_shape = latent_shape
        self.timesteps = rollout_timesteps(len(backend.alphas_cumprod), cfg.rollout_steps)
        self.text_emb = {p: e for p, e in zip(prompts.compositions,
                                              guide.embed_texts(prompts.compositions).detach())}
        self.named = {p: named_concepts(p, list(ref_embeddings)) for p in prompts.compositions}
        self.router, self.expert_concepts = None, []
        if cfg.route_weight > 0:
            self.router, self.expert_concepts = _router_and_concepts(mixtures, list(ref_embeddings))

    def draw(self, gen: torch.Generator, n: int) -> tuple[list[str], int, int]:
        """``n`` prompts, compositions first: about ``base_share`` of them base prompts (when there are any);
        with ``twin_prior`` half of the rest are the compositions' twins (their concept words removed),
        which share the compositions' noise. Returns the prompts, the number of compositions and of twins."""
        n_base = min(round(n * self.cfg.base_share), n - 1) if self.prompts.base else 0
        n_comp = n - n_base
        n_twin = n_comp // 2 if self.cfg.twin_prior and n_comp >= 2 else 0
        n_comp -= n_twin
        comp = [self.prompts.compositions[i] for i in
                torch.randint(len(self.prompts.compositions), (n_comp,), generator=gen).tolist()]
        if self.cfg.word_dropout > 0:
            comp = [self._drop_words(p, gen) for p in comp]
        twins = [twin_prompt(p, list(self.ref_emb)) for p in comp[:n_twin]]
        base = ([self.prompts.base[i] for i in torch.randint(len(self.prompts.base), (n_base,), generator=gen).tolist()]
                if n_base else [])
        return comp + twins + base, n_comp, n_twin

    def _drop_words(self, prompt: str, gen: torch.Generator) -> str:
        """``prompt`` with each word that names no concept dropped with probability ``word_dropout``: the
        routers then cannot lean on the words that happen to co-occur with a concept in the training prompts."""
        concepts = list(self.ref_emb)
        words = prompt.split()
        keep = torch.rand(len(words), generator=gen) >= self.cfg.word_dropout
        kept = [w for w, k in zip(words, keep.tolist()) if k or names_a_concept(w, concepts)]
        out = " ".join(kept)
        if out not in self.text_emb:
            self.text_emb[out] = self.guide.embed_texts([out]).detach()[0]
            self.named[out] = named_concepts(out, list(self.ref_emb))
        return out

    def _encode(self, prompts: list[str]) -> tuple[dict, dict]:
        """Conditioning of ``prompts`` and of the empty prompt, through the (gated) text encoders."""
        routes: list[torch.Tensor] = []  # the router's logits of each text-encoder call (a host may encode prompt
        hook = (self.router.router_module.register_forward_hook(lambda *_: routes.append(self.router._route))
                if self.router is not None else None)  # by prompt: ComfyUI); runs after the mixture's own hook
        try:
            cond = self.backend.encode_prompts(prompts)
        finally:
            if hook is not None:
                hook.remove()
        self._route = torch.cat(routes) if len(routes) > 1 else self.router._route if self.router is not None else None
        uncond = self.backend.encode_prompts([""] * len(prompts))
        return cond, uncond

    def _guided(self, x_t: torch.Tensor, t: int, cond: dict, uncond: dict) -> torch.Tensor:
        """Classifier-free-guided model output (the model's own parameterisation: ε, v or x0)."""
        b = x_t.shape[0]
        tt = torch.full((2 * b,), t, device=self.backend.device, dtype=torch.long)
        out_u, out_c = self.backend.predict(torch.cat([x_t, x_t]), tt, _cat_cond(uncond, cond)).chunk(2)
        return out_u + self.cfg.rollout_cfg * (out_c - out_u)

    def _ddim(self, x: torch.Tensor, timesteps: list[int], cond: dict, uncond: dict) -> torch.Tensor:
        """Guided DDIM (η = 0) steps taking ``x`` from ``timesteps[0]`` to ``timesteps[-1]``."""
        alphas = self.backend.alphas_cumprod.to(x.device)
        for t, t_next in zip(timesteps, timesteps[1:]):
            x0, eps = x0_and_eps(self.backend.prediction_type, alphas, x, self._guided(x, t, cond, uncond), t)
            x = alphas[t_next].sqrt() * x0 + (1 - alphas[t_next]).sqrt() * eps
        return x

    def __call__(self, gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        prompts, n_comp, n_twin = self.draw(gen, n)
        device, kind = self.backend.device, self.backend.prediction_type
        x = torch.randn((n, *self.latent_shape), generator=gen)
        x[n_comp:n_comp + n_twin] = x[:n_twin]  # a twin starts from its composition's noise
        x = x.to(device)
        alphas = self.backend.alphas_cumprod.to(device)
        k = len(self.timesteps) - 1
        if self.cfg.grad_step == "random":
            k = int(torch.randint(len(self.timesteps), (1,), generator=gen))
        with torch.no_grad():
            cond, uncond = self._encode(prompts)
            x = self._ddim(x, self.timesteps[:k + 1], cond, uncond)
        t_last = self.timesteps[k]
        exclude = self.cfg.exclude_weight > 0
        first = 0 if exclude else n_comp  # rows that need the base model's prediction
        base_out = self._base_prediction(x[first:], t_last, prompts[first:]) if n > first else None
        cond, uncond = self._encode(prompts)  # with a graph: the text-encoder gates train too
        out = self._guided(x, t_last, cond, uncond)
        terms: dict[str, torch.Tensor] = {}
        rows = n if exclude else n_comp  # rows whose image is scored by the guide
        emb = None
        if rows:
            x0, _ = x0_and_eps(kind, alphas, x[:rows], out[:rows], t_last)
            emb = self.guide.embed_images(self.backend.decode(x0))
        if n_comp:
            text = torch.stack([self.text_emb[p] for p in prompts[:n_comp]]).to(emb.device)
            terms["global"] = self.cfg.global_weight * (1 - (emb[:n_comp] * text).sum(-1)).mean()
            terms["local"] = self.cfg.local_weight * self._local(emb[:n_comp], prompts[:n_comp])
        if exclude:
            with torch.no_grad():
                x0_base, _ = x0_and_eps(kind, alphas, x, base_out, t_last)
                emb_base = self.guide.embed_images(self.backend.decode(x0_base))
            terms["exclude"] = self.cfg.exclude_weight * self._exclude(emb, emb_base, prompts)
        if self.router is not None:
            terms["route"] = self.cfg.route_weight * self._naming(prompts)
        prior_base = base_out[n_comp - first:] if base_out is not None else None
        terms["prior"] = (self.cfg.prior_weight * F.mse_loss(out[n_comp:].float(), prior_base.float())
                          if n > n_comp else out.sum() * 0.0)
        return terms

    @torch.no_grad()
    def guidance(self, prompts: list[str], noise: torch.Tensor, steps: int,
                 conditioning: tuple[dict, dict] | None = None) -> torch.Tensor:
        """Per composition prompt, the guidance this objective maximises (:meth:`score_images`) of the image a
        ``steps``-step DDIM rollout samples from ``noise`` (one latent per prompt; ``conditioning``: the prompts'
        from :meth:`conditioning`, else encoded now); with ``search_dark_view`` the worse of that image's score and
        its dark view's (:mod:`train.dark_view`); with ``search_texture_weight`` plus that weight × the image's
        texture term (:func:`train.texture.texture_scores`)."""
        images = self.rollout_images(prompts, noise, steps, conditioning)
        dark = self.cfg.search_dark_view
        views = [images] + ([dark_to_background(images, dark)] if dark else [])
        score = torch.stack([self.score_images(view, prompts) for view in views]).amin(0)
        if self.cfg.search_texture_weight:
            texture = texture_scores(self.guide, images, [self.named[p] for p in prompts], self.ref_grams)
            score = score + self.cfg.search_texture_weight * texture.to(score.device)
        return score

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> tuple[dict, dict]:
        """The conditioning of ``prompts`` and of as many empty prompts, through the text encoders as they are now
        (rows in prompt order: a caller may slice them)."""
        return self._encode(prompts)

    @torch.no_grad()
    def rollout_images(self, prompts: list[str], noise: torch.Tensor, steps: int,
                       conditioning: tuple[dict, dict] | None = None) -> torch.Tensor:
        """The decoded x0 (``(B, 3, H, W)`` in [-1, 1]) of a ``steps``-step DDIM rollout from ``noise`` (with CFG;
        ``conditioning`` as in :meth:`guidance`)."""
        kind, alphas = self.backend.prediction_type, self.backend.alphas_cumprod.to(self.backend.device)
        cond, uncond = conditioning if conditioning is not None else self._encode(prompts)
        timesteps = rollout_timesteps(len(alphas), steps)
        x = self._ddim(noise.to(self.backend.device), timesteps, cond, uncond)
        x0, _ = x0_and_eps(kind, alphas, x, self._guided(x, timesteps[-1], cond, uncond), timesteps[-1])
        return self.backend.decode(x0)

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per image, ``global_weight`` · cos to its prompt + ``local_weight`` · mean cos to the references of the
        concepts its prompt names."""
        emb = self.guide.embed_images(images)
        text = torch.stack([self.text_emb[p] for p in prompts]).to(emb.device)
        local = torch.stack([torch.stack([row @ self.ref_emb[c].to(row.device) for c in self.named[p]]).mean()
                             for row, p in zip(emb, prompts)])
        return self.cfg.global_weight * (emb * text).sum(-1) + self.cfg.local_weight * local

    def _naming(self, prompts: list[str]) -> torch.Tensor:
        """Mean binary cross-entropy of the router logits of ``prompts`` against "the prompt names the LoRA's
        concept", over the LoRAs that have a concept."""
        rows = [i for i, c in enumerate(self.expert_concepts) if c]
        target = torch.tensor([[float(self.expert_concepts[i] in named_concepts(p, list(self.ref_emb))) for i in rows]
                               for p in prompts], device=self._route.device)
        return F.binary_cross_entropy_with_logits(self._route[:, rows].float(), target)

    def _exclude(self, emb: torch.Tensor, emb_base: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Mean over images and the concepts their prompt does *not* name of
        ``relu(cos(image, refs_c) − cos(base image, refs_c))``: no image may look more like an unnamed
        concept than the base model's image of the same prompt and noise does — a per-concept signal that
        switches each LoRA off where its concept is not asked for (the prior term only says "no LoRA")."""
        losses = []
        for row, base, p in zip(emb, emb_base, prompts):
            named = set(named_concepts(p, list(self.ref_emb)))
            for c, ref in self.ref_emb.items():
                if c and c not in named:
                    ref = ref.to(row.device)
                    losses.append(F.relu((row * ref).sum() - (base * ref).sum()))
        return torch.stack(losses).mean() if losses else emb.sum() * 0.0

    def _local(self, emb: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        losses = []
        for row, p in zip(emb, prompts):
            for c in self.named[p]:
                losses.append(1 - (row * self.ref_emb[c].to(row.device)).sum())
        return torch.stack(losses).mean() if losses else emb.sum() * 0.0

    @torch.no_grad()
    def _base_prediction(self, x_t: torch.Tensor, t: int, prompts: list[str]) -> torch.Tensor:
        """The base model's guided noise prediction: every mixture detached (no LoRA anywhere)."""
        attached = [m for m in self.mixtures if m.attached]
        for m in attached:
            m.detach()
        try:
            encode = getattr(self.backend, "encode_base_prompts", None)  # hosts that pre-encode prompts
            cond, uncond = (encode(prompts), encode([""] * len(prompts))) if encode else self._encode(prompts)
            return self._guided(x_t, t, cond, uncond)
        finally:
            for m in attached:
                m.reattach()


def _router_and_concepts(mixtures: list[Mixture], concepts: list[str]) -> tuple[Mixture, list[str | None]]:
    """The mixture that holds the router, and each expert's concept (the one its file is named after)."""
    router = next((m for m in mixtures if m.router_lead is not None), None)
    if router is None:
        raise MoleError("`route_weight` needs gate_input 'router' or 'trigger' with the text encoders attached")
    own = trigger_words(router.experts, concepts)
    if not any(own):
        names = sorted(c.lower() for c in concepts if c)
        raise MoleError(f"`route_weight`: no LoRA is named after a concept ({', '.join(names)}); name each "
                        f"LoRA file after its concept's trigger word (e.g. {next(iter(names), 'purple')}.safetensors)")
    return router, own


def reference_embeddings(guide: ImageTextGuide, images: list[torch.Tensor], concepts: list[str]
                         ) -> dict[str, torch.Tensor]:
    """Unit mean guide embedding of each concept's reference images (``(3, H, W)`` in [-1, 1] each)."""
    with torch.no_grad():
        embs = torch.cat([guide.embed_images(img[None]) for img in images])
    out = {}
    for c in sorted(set(concepts)):
        rows = embs[[i for i, k in enumerate(concepts) if k == c]]
        out[c] = F.normalize(rows.mean(0), dim=-1)
    return out


def latent_shape(backend: Backend, resolution: int) -> tuple[int, ...]:
    """Shape ``(C, h, w)`` of one latent at ``resolution`` pixels: the backend's own ``latent_shape`` when it
    has one, else one VAE encode of a blank image."""
    if hasattr(backend, "latent_shape"):
        return tuple(backend.latent_shape(resolution))
    with torch.no_grad():
        z = backend.encode_images(torch.zeros(1, 3, resolution, resolution, device=backend.device))
    return tuple(z.shape[1:])

