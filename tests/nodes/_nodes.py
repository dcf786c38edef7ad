"""Calling MoLE nodes directly (as the executor would, under inference mode) and making gate files."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.nodes._helpers import slots


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def load(mole, model, clip, *picks, experts=None):
    """MoLE Load Experts with ``(file, strength, on)`` picks."""
    with torch.inference_mode():
        return mole.loaders.MoleLoadExperts.execute(model=model, clip=clip, experts=experts, **slots(*picks)).args[0]


def apply(mole, model, experts, mode="gated", weights="", mask="", clip=None, gates=None, strength=1.0, buckets=4,
          switch_every=1):
    """MoLE Apply → ``(model, clip, gates)``."""
    with torch.inference_mode():
        out = mole.apply.MoleApply.execute(model=model, experts=experts, mode=mode, strength=strength,
                                           weights=weights, mask=mask, timestep_buckets=buckets, clip=clip,
                                           gates=gates, switch_every=switch_every)
    return out.args


def load_gates(mole, name: str):
    with torch.inference_mode():
        return mole.gates.MoleLoadGates.execute(gate_file=name).args[0]


def _write_variant(mole, model, experts, folder: Path, name: str, make, clip=None):
    import mole_core

    _, _, fresh = apply(mole, model, experts, "gated", clip=clip)
    gf = fresh.gate_file
    tensors = {k: make(k, v) for k, v in gf.tensors.items()}
    mole_core.write_gate_file(mole_core.GateFile(gf.path, gf.config, gf.experts, gf.scopes, tensors, dict(gf.info)),
                              folder / name)
    return load_gates(mole, name)


def random_gates(mole, model, experts, folder: Path, name: str, std: float = 1.0, clip=None):
    """Input-dependent gates: random gate weights (via a gate file and MoLE Load Gates)."""
    gen = torch.Generator().manual_seed(9)

    def make(key: str, value: torch.Tensor) -> torch.Tensor:
        return torch.randn(value.shape, generator=gen) * std if key.endswith(".weight") else value.clone()
    return _write_variant(mole, model, experts, folder, name, make, clip)


def constant_gates(mole, model, experts, folder: Path, name: str, probs: list[float]):
    """Gates that ignore their input: zero weights, ``bias = log(probs)``, τ = 1."""
    bias = torch.tensor(probs).log()
    return _write_variant(mole, model, experts, folder, name,
                          lambda k, v: bias.clone() if k.endswith(".bias") else torch.zeros_like(v))


def constant_sigmoid_gates(mole, model, experts, folder: Path, name: str, gates: list[float]):
    """Sigmoid-family gates that ignore their input: zero weights, magnitude 1 (ρ = 0 with m_max = 2) and
    ``bias = logit(gate)``, so expert i runs at ``gates[i]`` (the values need not sum to 1)."""
    import dataclasses

    import mole_core

    _, _, fresh = apply(mole, model, experts, "gated")
    gf = fresh.gate_file
    cfg = dataclasses.replace(gf.config, family="sigmoid", m_max=2.0)
    bias = torch.tensor(gates).logit()
    tensors = {}
    for scope, meta in gf.scopes.items():
        n, d = len(gates), int(meta["feature_dim"])
        tensors.update({f"gates.{scope}.weight": torch.zeros(n, d), f"gates.{scope}.bias": bias.clone(),
                        f"gates.{scope}.log_tau": torch.zeros(()), f"gates.{scope}.magnitude_logit": torch.zeros(()),
                        f"gates.{scope}.center": torch.zeros(d)})
    info = {**gf.info, "gate_config": cfg.to_dict()}
    mole_core.write_gate_file(mole_core.GateFile(gf.path, cfg, gf.experts, gf.scopes, tensors, info), folder / name)
    return load_gates(mole, name)


def denoise_loss(mole, backend, experts, cache, gates) -> float:
    """Summed held-out denoise loss of ``gates`` on ``cache`` (UNet experts attached, 16 draws)."""
    import mole_core
    from train.engine import evaluate_denoise

    mix = mole_core.attach(backend.mixture_target(), mole.train_node.normal_experts(experts), gates=gates,
                           components=["unet"])
    try:
        return sum(evaluate_denoise(backend, cache, draws=16).values())
    finally:
        mix.detach()


def train_and_measure(mole, model, clip, vae, experts, images, steps: int = 30, **fields
                      ) -> tuple[float, float, object]:
    """Train UNet gates on ``images`` through the ComfyUI backend (denoise objective, a private copy of
    ``model``; ``fields`` override the TrainConfig); returns the held-out denoise loss with the initial and the
    trained gates, and the reference cache (its conditioning as the backend sees it)."""
    from train.config import TrainConfig
    from train.data import references_from_images
    from train.engine import prepare_references, train

    cb = mole.comfy_backend
    cfg = TrainConfig(steps=steps, lr=0.05, alpha=0.0, batch_size=4, resolution=64, warmup_steps=0, seed=0,
                      **fields)
    refs = references_from_images(images, ["a photo of a ball"])
    with torch.inference_mode():
        cache = cb.unify_context(prepare_references(cb.ComfyEncoder(model.model, vae, clip, 64), refs, cfg))
        copy_ = cb.private_copy(model, 0)
        start = mole.train_node.initial_gates(model, experts, cfg)
    backend = cb.ComfyBackend(copy_)
    cache = cb.cache_to(cache, backend.device)
    result = train(cfg, backend, mole.train_node.normal_experts(experts), refs, cache=cache)
    before, after = (denoise_loss(mole, backend, experts, cache, g) for g in (start, result.gates))
    return before, after, cache
