"""The gate-training loop: backend-agnostic, resumable, cancellable, torchrun-ready.

``train(cfg, backend, experts, refs)`` attaches the experts (UNet gated; text encoders in NLA
mode unless ``train_text_gates``), caches reference latents and prompt conditioning once,
and optimises only the gates with AdamW on ``Σ objectives + α · balance``. Under ``torchrun``
the gates are wrapped in torch DDP (the only synchronised parameters), each rank takes its
slice of the global batch, and only rank 0 writes files and reports progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import mole_core as mole
from mole_core import Mixture, MoleError
from mole_core.gate_file import GateFile
from mole_core.gates import share_entropy

from .backend import Backend, add_noise
from .block_search import SearchResult, prompt_sets, search_blocks
from .checkpoint import read_checkpoint, restore, save_checkpoint
from .compose import ComposeObjective, ComposePrompts, ImageTextGuide, latent_shape, reference_embeddings, twin_prompt
from .config import TrainConfig
from .data import CachedSet, Reference, load_image, to_tensor
from .objectives import ClipGuide, StepContext, build_objectives
from .texture import check_textured, reference_grams

ProgressFn = Callable[[dict], None]


class TrainingDiverged(MoleError):
    """Loss or gradients became NaN/inf; the last good gates were kept."""


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    gates: GateFile
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    cancelled: bool = False
    metrics: dict = field(default_factory=dict)
    path: str | None = None  # where the gates were written (a cancelled run: the partial file)


def partial_path(out_path: str) -> str:
    """Where a cancelled or diverged run writes its gates: beside ``out_path``, never over it, so a gate file
    saved before is never replaced by a failed run (``g.safetensors`` → ``g.partial.safetensors``)."""
    p = Path(out_path)
    return str(p.with_name(p.name.removesuffix(".safetensors") + ".partial.safetensors"))


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def prepare_references(backend: Backend, refs: list[Reference], cfg: TrainConfig) -> CachedSet:
    """Encode every reference image once (latents) and every distinct caption once (conditioning)."""
    latents = []
    for ref in refs:
        img = to_tensor(load_image(ref), cfg.resolution, crop=not cfg.random_crop)
        latents.append(backend.encode_images(img[None].to(backend.device))[0])
    captions = sorted({r.caption for r in refs})
    conds = [backend.encode_prompts([c]) for c in captions]
    crop = cfg.resolution // int(getattr(backend, "vae_scale_factor", 8))
    return CachedSet(latents, [captions.index(r.caption) for r in refs], conds, [r.caption for r in refs],
                     [r.concept for r in refs], crop)


def reference_cache(backend: Backend, experts: list[mole.Expert], refs: list[Reference],
                    cfg: TrainConfig) -> CachedSet:
    """:func:`prepare_references` with the text encoders' LoRA parts in NLA mode — the conditioning
    training and sampling see (pass it to :func:`train` and :func:`gate_statistics`)."""
    static = _attach_text_nla(backend, experts, cfg)
    try:
        return prepare_references(backend, refs, cfg)
    finally:
        if static is not None:
            static.detach()


def _attach_text_nla(backend: Backend, experts: list[mole.Expert], cfg: TrainConfig) -> Mixture | None:
    """The experts' text-encoder parts in NLA mode, unless the text encoders are gated or have none."""
    if cfg.train_text_gates:
        return None
    target = backend.mixture_target()
    text = [c for c in mole.index_model(target).components() if c != "unet"]
    if not any(c in text for e in experts for c in e.components()):
        return None
    return mole.attach(target, experts, mode="uniform", components=text, strength=cfg.strength)


def attach_for_training(backend: Backend, experts: list[mole.Expert], cfg: TrainConfig
                        ) -> tuple[Mixture, Mixture | None]:
    """Gated mixture on the UNet (and text encoders if ``train_text_gates``), NLA on the rest."""
    gate_cfg = cfg.gate_config()
    comps = None if cfg.train_text_gates else ["unet"]
    gated = mole.attach(backend.mixture_target(), experts, gate_cfg, components=comps, strength=cfg.strength)
    if not cfg.train_magnitudes:  # the magnitudes stay at their start: not gate parameters of this run
        for gate in gated.gates.values():
            if hasattr(gate, "magnitude_logit"):
                gate.magnitude_logit.requires_grad_(False)
    return gated, _attach_text_nla(backend, experts, cfg)


def _batch_cond(cache: CachedSet, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    keys = cache.conds[0].keys()
    return {k: torch.cat([cache.conds[cache.cond_index[i]][k] for i in idx.tolist()]) for k in keys}


def _crop(lat: torch.Tensor, size: int, gen: torch.Generator, random: bool) -> torch.Tensor:
    h, w = lat.shape[-2:]
    if h == w == size:
        return lat
    if random:
        top = int(torch.randint(h - size + 1, (1,), generator=gen))
        left = int(torch.randint(w - size + 1, (1,), generator=gen))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return lat[..., top:top + size, left:left + size]


def _balance(mix: Mixture, world: int) -> torch.Tensor:
    """Eq. 14–15 with q averaged over the *global* batch (exact under DDP)."""
    gates = list(mix.live_gates.values())
    if not gates:
        raise MoleError("no gates were computed in the forward pass (are the LoRAs on the UNet?)")
    q = torch.stack([g.float().mean(0) for g in gates]).mean(0)
    if world > 1:
        from torch.distributed.nn.functional import all_gather

        q = torch.stack(all_gather(q)).mean(0)
    active = torch.tensor(mix.mask, device=q.device)
    return -q[active].clamp_min(1e-12).log().sum()


def _gate_metrics(mix: Mixture) -> dict:
    gates = [g.detach().float() for g in mix.live_gates.values()]
    if not gates:
        return {"gate_entropy": float("nan"), "mean_gates": [], "mean_gate_entropy": float("nan")}
    q = torch.stack([g.mean(0) for g in gates]).mean(0)
    ent = torch.stack([share_entropy(g).mean() for g in gates]).mean()
    return {"gate_entropy": float(ent), "mean_gates": [round(float(v), 5) for v in q],
            "mean_gate_entropy": float(share_entropy(q))}


class _GateStep(nn.Module):
    """Holds the gates as its only parameters, so DDP synchronises exactly those."""

    def __init__(self, gates: nn.Module):
        super().__init__()
        self.gates = gates

    def forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or (``lr_schedule = cosine``) a cosine decay to 0 at the last step."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))
    return cfg.lr * warm


def train(cfg: TrainConfig, backend: Backend, experts: list[mole.Expert], refs: list[Reference], *,
          progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
          checkpoint_path: str | None = None, resume_from: str | None = None, out_path: str | None = None,
          clip_guide: ClipGuide | None = None, cache: CachedSet | None = None,
          compose_prompts: ComposePrompts | None = None, guide: ImageTextGuide | None = None) -> TrainResult:
    """Train MoLE gates; see the module docstring. Returns the gates in memory (and writes them
    to ``out_path`` on rank 0). Raises :class:`TrainingDiverged` on NaN/inf (last good gates kept).

    Objective ``compose`` needs ``compose_prompts`` and an image-text ``guide`` (``clip_guide`` serves
    when ``guide`` is not given); its local term uses the references' concepts."""
    rank, world = _dist()
    if cfg.batch_size % world:
        raise MoleError(f"`batch_size` {cfg.batch_size} must be divisible by the number of processes ({world})")
    guide = guide or clip_guide
    if "compose" in cfg.objectives and (compose_prompts is None or guide is None):
        raise MoleError("objective 'compose' needs composition prompts and an image-text guide (a CLIP model)")
    if cfg.search_texture_weight:
        check_textured(guide)
    objectives = build_objectives(cfg, clip_guide)
    frozen = [(p, p.requires_grad) for m in backend.denoiser_modules() for p in m.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    gated = static = None
    try:
        gated, static = attach_for_training(backend, experts, cfg)
        gated.stats.enabled = False
        if cache is None:  # after attaching: prompts are encoded with the text encoders' LoRA parts (NLA)
            cache = prepare_references(backend, refs, cfg)
        if clip_guide is not None and "clip" in cfg.objectives:
            clip_guide.prepare([to_tensor(load_image(r), cfg.resolution) for r in refs],
                               [r.concept for r in refs], [r.caption for r in refs])
        shape = latent_shape(backend, cfg.resolution) if cfg.center_features or "compose" in cfg.objectives else ()
        texts = sorted({r.caption for r in refs}) + _compose_texts(compose_prompts, refs)
        if cfg.center_features:
            _calibrate(backend, gated, shape, texts)
        if cfg.gate_input == "trigger":  # each LoRA's key: the word its file is named after
            words = mole.trigger_words(experts, sorted({r.concept for r in refs if r.concept}))
            mole.calibrate_triggers(gated, backend.encode_prompts, texts, words)
        compose = None
        if "compose" in cfg.objectives:
            ref_images = [to_tensor(load_image(r), cfg.resolution) for r in refs]
            refs_emb = reference_embeddings(guide, ref_images, [r.concept for r in refs])
            grams = reference_grams(guide, ref_images, [r.concept for r in refs]) if cfg.search_texture_weight else None
            compose = ComposeObjective(cfg, backend, [m for m in (gated, static) if m is not None], guide,
                                       compose_prompts, refs_emb, shape, ref_grams=grams)
            if cfg.block_search and cfg.search_compositions_only:  # its one-line error before training
                prompt_sets(compose, experts, cfg.search_prompts, compositions_only=True)
        backend.set_gradient_checkpointing(cfg.gradient_checkpointing)
        return _run(_Run(cfg, backend, experts, cache, gated, objectives, compose, rank, world),
                    _Io(progress, should_stop, checkpoint_path, resume_from, out_path))
    finally:
        for m in (gated, static):
            if m is not None:
                m.detach()
        for p, flag in frozen:
            p.requires_grad_(flag)
        backend.set_gradient_checkpointing(False)


def _compose_texts(prompts: ComposePrompts | None, refs: list[Reference]) -> list[str]:
    if prompts is None:
        return []
    concepts = sorted({r.concept for r in refs if r.concept})
    return [*prompts.compositions, *[twin_prompt(p, concepts) for p in prompts.compositions], *prompts.base, ""]


def _calibrate(backend: Backend, mix: Mixture, shape: tuple[int, ...], prompts: list[str]) -> None:
    """Centre the gates' features on ``prompts`` (text encoders and UNet see each once, at mid noise, on
    latents of ``shape``)."""
    texts = sorted(set(prompts))

    def run() -> None:
        for i in range(0, len(texts), 16):
            cond = backend.encode_prompts(texts[i:i + 16])
            n = len(texts[i:i + 16])
            t = torch.full((n,), len(backend.alphas_cumprod) // 2, device=backend.device)
            backend.predict(torch.zeros((n, *shape), device=backend.device), t, cond)

    mix.calibrate_centers(run)


@dataclass
class _Run:
    """What one training run optimises: the gated mixture over the experts, on the cached references and/or
    the composition objective, as rank ``rank`` of ``world`` processes."""

    cfg: TrainConfig
    backend: Backend
    experts: list[mole.Expert]
    cache: CachedSet
    mix: Mixture
    objectives: list
    compose: ComposeObjective | None
    rank: int
    world: int


@dataclass
class _Io:
    """Where a run reports and what it reads and writes."""

    progress: ProgressFn | None = None
    should_stop: Callable[[], bool] | None = None
    checkpoint_path: str | None = None
    resume_from: str | None = None
    out_path: str | None = None


def _run(run: _Run, io: _Io) -> TrainResult:
    cfg, mix = run.cfg, run.mix
    gen = torch.Generator().manual_seed(cfg.seed)
    params = mix.gate_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step_module: nn.Module = _GateStep(mix.gates)
    if run.world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, broadcast_buffers=False)
    identity = {"experts": [e.summary() for e in run.experts], "config": cfg.to_dict()}
    start, history = _resume(run, io.resume_from, opt, gen)
    t0, cancelled, step = time.perf_counter(), False, start
    for step in range(start, cfg.steps):
        if io.should_stop is not None and io.should_stop():
            cancelled = True
            break
        terms = _accumulate(run, step_module, gen)
        record = _optimizer_step(run, io.out_path, opt, params, terms, step, history)
        history.append(record)
        elapsed = time.perf_counter() - t0
        if io.progress is not None and run.rank == 0:
            io.progress({**record, "steps": cfg.steps, "terms": dict(terms), "elapsed_s": elapsed,
                         "eta_s": elapsed / (step + 1 - start) * (cfg.steps - step - 1)})
        if io.checkpoint_path and run.rank == 0 and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(io.checkpoint_path, [mix], opt, gen, step + 1, {**identity, "history": history})
    else:
        step = cfg.steps
    steps_done = step if cancelled else cfg.steps
    if io.checkpoint_path and run.rank == 0:  # before the block search: a resumed run searches again
        save_checkpoint(io.checkpoint_path, [mix], opt, gen, steps_done, {**identity, "history": history})
    search = None
    if cfg.block_search and not cancelled and run.compose is not None:
        search = _block_search(run, io)
        cancelled = not search.complete  # stopped during the search: partial gates, --resume searches again
    metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
    training = {**cfg.to_dict(), "steps_done": steps_done, "world_size": run.world,
                **({"block_search_result": search.to_dict()} if search is not None else {})}
    gf = mole.snapshot(mix, training=training, metrics=metrics)
    path = (partial_path(io.out_path) if cancelled else io.out_path) if io.out_path else None
    if path and run.rank == 0:
        mole.write_gate_file(gf, path)
    return TrainResult(gf, history, steps_done, cancelled, metrics, path)


def _block_search(run: _Run, io: _Io) -> SearchResult:
    """The block search after training (``block_search``), its progress reported as ``phase`` records."""
    def progress(i: int, n: int) -> None:
        if io.progress is not None and run.rank == 0:
            io.progress({"phase": "block_search", "candidate": i + 1, "candidates": n})

    cfg = run.cfg
    return search_blocks(run.compose, run.mix, per_set=cfg.search_prompts, steps=cfg.search_steps,
                         seed=cfg.seed + 1, batch=cfg.search_batch, text_strengths=cfg.text_strengths,
                         rounds=cfg.search_rounds, by_set=cfg.search_by_set, draws=cfg.search_draws,
                         windows=cfg.search_windows, text_by_set=cfg.search_text_by_set,
                         aggregate=cfg.search_aggregate, min_strength=cfg.search_min_strength,
                         place_floors=cfg.search_place_floors, share_floors=cfg.search_share_floors,
                         compositions_only=cfg.search_compositions_only, share_max_step=cfg.search_share_max_step,
                         progress=progress,
                         should_stop=io.should_stop)


def _resume(run: _Run, resume_from: str | None, opt: torch.optim.Optimizer, gen: torch.Generator
            ) -> tuple[int, list[dict]]:
    """The step to start from and the history so far: 0 and none, or what the checkpoint restores (gates,
    optimiser, RNG) after checking that it was made with the same experts."""
    if not resume_from:
        return 0, []
    state = read_checkpoint(resume_from)
    if [e["sha256"] for e in state.info.get("experts", [])] != [e.sha256 for e in run.experts]:
        raise MoleError(f"{resume_from}: checkpoint was made with other experts")
    restore(state, [run.mix], opt, gen, resume_from)
    return state.step, list(state.info.get("history", []))


def _accumulate(run: _Run, step_module: nn.Module, gen: torch.Generator) -> dict[str, float]:
    """Forward and backward over ``grad_accum`` micro-batches; returns the loss terms averaged over them."""
    cfg, backend = run.cfg, run.backend
    T = len(backend.alphas_cumprod)
    lo, hi = int(cfg.t_min * T), max(int(cfg.t_min * T) + 1, int(cfg.t_max * T))
    local = cfg.batch_size // run.world
    mine = slice(run.rank * local, (run.rank + 1) * local)
    amp = torch.autocast(backend.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()
    terms_acc: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        # the whole global batch is drawn on every rank (same RNG stream), each keeps its slice
        idx = torch.randint(len(run.cache), (cfg.batch_size,), generator=gen)
        t = torch.randint(lo, hi, (cfg.batch_size,), generator=gen)
        x0 = torch.stack([_crop(run.cache.latents[i], run.cache.crop, gen, cfg.random_crop) for i in idx.tolist()])
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        idx, t, x0, noise = idx[mine], t[mine], x0[mine], noise[mine].to(x0.device, x0.dtype)
        t_dev = t.to(backend.device)

        def forward(idx=idx, t=t_dev, x0=x0, noise=noise) -> tuple[torch.Tensor, dict]:
            return _loss(run, amp, gen, local, idx, t, x0, noise)

        box: dict = {}
        sync = run.world > 1 and micro < cfg.grad_accum - 1
        with step_module.no_sync() if sync else nullcontext():  # type: ignore[operator]
            loss = step_module(lambda box=box, forward=forward: _keep(box, forward()))
            loss.backward()
        for k, v in box["terms"].items():
            terms_acc[k] = terms_acc.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
    return terms_acc


def _loss(run: _Run, amp: AbstractContextManager, gen: torch.Generator, local: int, idx: torch.Tensor, t: torch.Tensor,
          x0: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One micro-batch's loss (already divided by ``grad_accum``) and its terms."""
    cfg, backend, mix = run.cfg, run.backend, run.mix
    mix.clear_live_gates()
    mix.routes.clear()  # gate_input router: an earlier step's routes belong to a spent graph
    terms: dict[str, torch.Tensor] = {}
    if run.objectives:
        x_t = add_noise(backend.alphas_cumprod, x0, noise, t)
        cond = (backend.encode_prompts([run.cache.captions[i] for i in idx.tolist()])
                if cfg.train_text_gates else _batch_cond(run.cache, idx))
        with amp:
            out = backend.predict(x_t, t, cond)
        ctx = StepContext(backend, cfg, x0, noise, t, x_t, out, idx)
        for obj in run.objectives:
            terms.update(obj(ctx))
    if run.compose is not None:
        with amp:
            terms.update(run.compose(gen, local))
    if cfg.alpha > 0 and mix.config.convex:  # sigmoid gates need no balance: they do not compete
        terms["balance"] = cfg.alpha * _balance(mix, run.world)
    return sum(terms.values()) / cfg.grad_accum, terms


def _optimizer_step(run: _Run, out_path: str | None, opt: torch.optim.Optimizer, params: list,
                    terms: dict[str, float], step: int, history: list[dict]) -> dict:
    """Check for divergence (last good gates kept, :class:`TrainingDiverged`), clip, step; the step's record."""
    cfg = run.cfg
    total = sum(terms.values())
    bad_grad = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params)
    if not math.isfinite(total) or bad_grad:
        _save_last_good(run.mix, out_path, cfg, history, step, run.rank)
        where = "loss" if not math.isfinite(total) else "gradient"
        raise TrainingDiverged(f"non-finite {where} at step {step + 1} ({_fmt(terms)}); training stopped, "
                               f"last good gates kept{' in ' + partial_path(out_path) if out_path else ''}")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    for group in opt.param_groups:
        group["lr"] = _lr(cfg, step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": total, **terms, "lr": _lr(cfg, step), **_gate_metrics(run.mix)}


def _keep(box: dict, result: tuple[torch.Tensor, dict]) -> torch.Tensor:
    box["terms"] = result[1]
    return result[0]


def _fmt(terms: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in terms.items())


def _save_last_good(mix: Mixture, out_path: str | None, cfg: TrainConfig, history: list, step: int,
                    rank: int) -> None:
    if out_path and rank == 0:
        mole.save_gates(mix, partial_path(out_path), training={**cfg.to_dict(), "steps_done": step, "diverged": True},
                        metrics=history[-1] if history else {})


@torch.no_grad()
def evaluate_denoise(backend: Backend, cache: CachedSet, *, draws: int = 8, seed: int = 1234,
                     t_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
    """Mean denoising loss per concept on fixed noise and timesteps (held-out evaluation)."""
    from .backend import training_target

    gen = torch.Generator().manual_seed(seed)
    T = len(backend.alphas_cumprod)
    lo, hi = int(t_range[0] * T), max(int(t_range[0] * T) + 1, int(t_range[1] * T))
    sums: dict[str, list[float]] = {}
    for i in range(len(cache)):
        x0 = _crop(cache.latents[i], cache.crop, gen, False)[None].expand(draws, -1, -1, -1)
        t = torch.randint(lo, hi, (draws,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
        cond = _batch_cond(cache, torch.full((draws,), i))
        t_dev = t.to(backend.device)
        out = backend.predict(add_noise(backend.alphas_cumprod, x0, noise, t_dev), t_dev, cond)
        target = training_target(backend.prediction_type, backend.alphas_cumprod, x0, noise, t_dev)
        sums.setdefault(cache.concepts[i], []).append(float((out.float() - target.float()).pow(2).mean()))
    return {c: sum(v) / len(v) for c, v in sums.items()}


STATS_BATCH = 8  # references per UNet call of gate_statistics


@torch.no_grad()
def gate_statistics(backend: Backend, experts: list[mole.Expert], gates: GateFile, cache: CachedSet, *,
                    fractions: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.1), seed: int = 0) -> dict:
    """Mean gate per expert and block on the references at a few noise levels (for heatmaps).

    Router and trigger gates re-encode each caption through the gated text encoder (the UNet finds the
    prompt's decision by its conditioning; the cached conditioning was encoded without the router).
    Returns :meth:`mole_core.GateStats.summary` with one bucket per noise level."""
    gen = torch.Generator().manual_seed(seed)
    mix = mole.attach(backend.mixture_target(), experts, gates=gates, components=gates.components())
    try:
        T = len(backend.alphas_cumprod)
        for b, frac in enumerate(fractions):
            mix.stats.bucket = b
            for lo in range(0, len(cache), STATS_BATCH):  # the statistics are sums over rows: batches change nothing
                rows = list(range(lo, min(lo + STATS_BATCH, len(cache))))
                t = torch.full((len(rows),), int(frac * (T - 1)), device=backend.device)
                x_t = []
                for i, ti in zip(rows, t):
                    x0 = _crop(cache.latents[i], cache.crop, gen, False)[None]
                    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
                    x_t.append(add_noise(backend.alphas_cumprod, x0, noise, ti[None]))
                cond = backend.encode_prompts([cache.captions[i] for i in rows]) if mix.router_lead is not None \
                    else _batch_cond(cache, torch.tensor(rows))
                backend.predict(torch.cat(x_t), t, cond)
        return mix.stats.summary()
    finally:
        mix.detach()
