"""Measurements for the toy world: probe accuracy on clean and VAE round-tripped images, sampling the
pipeline, base-model accuracy, and each concept LoRA's single-concept accuracy through ``mole_core``."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from . import world as W
from .probes import Probe, accuracy
from .training import decode, encode

Log = Callable[[str], None]
SAMPLE_STEPS = 20
GUIDANCE = 5.0


@torch.no_grad()
def sample(pipe: object, prompts: list[str], seed: int, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
           batch: int = 64) -> np.ndarray:
    """Generate one image per prompt: ``(N, 32, 32, 3)`` uint8, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch):
        imgs = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                    output_type="np").images
        out.append(np.clip(np.rint(imgs * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def probe_accuracy(probe: Probe, vae: torch.nn.Module, n: int, seed: int) -> dict:
    """Probe accuracy on ``n`` clean generator images (all attribute values) and after a VAE round trip."""
    specs = W.sample_specs(n, seed, W.ALL_VALUES)
    images = W.render_batch(specs)
    truths = [s.attributes for s in specs]
    mean, _ = encode(vae, images)
    recon = decode(vae, mean)
    err = np.abs(recon.astype(np.int16) - images.astype(np.int16))
    return {"n": n, "clean": accuracy(probe.batch(list(images)), truths),
            "vae": accuracy(probe.batch(list(recon)), truths),
            "vae_max_abs_error_255": int(err.max()), "vae_mean_abs_error_255": round(float(err.mean()), 4)}


def prompt_set(values: dict[str, tuple[str, ...]], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` attribute combinations cycling through ``values`` in a shuffled order."""
    return [s.attributes for s in W.sample_specs(n, seed, values)]


def generation_accuracy(pipe: object, probe: Probe, attrs: list[dict[str, str]], seed: int) -> tuple[dict, np.ndarray]:
    images = sample(pipe, [W.caption(a) for a in attrs], seed)
    return accuracy(probe.batch(list(images)), attrs), images


def concept_accuracy(pipe: object, probe: Probe, lora_path: str, concept: W.Concept, n: int, seed: int
                     ) -> tuple[dict, np.ndarray]:
    """Single-concept prompts sampled without the LoRA and with it (``mole_core`` static weight 1)."""
    import mole_core

    attrs = prompt_set(W.concept_values([concept]), n, seed)
    without, _ = generation_accuracy(pipe, probe, attrs, seed)
    mix = mole_core.attach(pipe, [mole_core.load_expert(lora_path)], mode="static", weights=[1.0])
    try:
        with_lora, images = generation_accuracy(pipe, probe, attrs, seed)
    finally:
        mix.detach()
    return {"n": n, "without_lora": without, "with_lora": with_lora}, images


def evaluate_world(pipe: object, probe: Probe, loras: dict[str, str], n_base: int, n_concept: int, seed: int,
                   log: Log = print) -> tuple[dict, dict[str, np.ndarray]]:
    """Base-model accuracy on base prompts and per-concept accuracies; returns metrics and sample images."""
    t0 = time.time()
    base, base_imgs = generation_accuracy(pipe, probe, prompt_set(W.BASE_VALUES, n_base, seed), seed)
    log(f"  base model on base prompts: {fmt_acc(base)}")
    metrics: dict = {"sampler": {"scheduler": type(pipe.scheduler).__name__, "steps": SAMPLE_STEPS,
                                 "guidance": GUIDANCE}, "base": {"n": n_base, **base}, "concepts": {}}
    images = {"base": base_imgs}
    for name, path in loras.items():
        c = W.concept(name)
        m, imgs = concept_accuracy(pipe, probe, path, c, n_concept, seed + 1)
        metrics["concepts"][name] = m
        images[name] = imgs
        log(f"  {name}: {c.attribute} accuracy without LoRA {m['without_lora'][c.attribute]:.2f}, "
            f"with LoRA {m['with_lora'][c.attribute]:.2f} (all attributes {m['with_lora']['all']:.2f})")
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics, images


def fmt_acc(acc: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if isinstance(v, float))
