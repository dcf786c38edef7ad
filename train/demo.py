"""``mole-train demo`` / ``make demo``: the whole job end to end on the embedded toy world.

The toy world (``mole_toy/assets``, built by ``python -m mole_toy build``) is a tiny text-to-image
model that draws coloured shapes, plus concept LoRAs that each teach one thing it has never seen
(a colour, a texture, a shape). The demo trains MoLE gates for three concepts
with the composition objective (sampled compositions scored by the toy CLIP, reference images of each
concept, base prompts kept as the base model draws them) and the block search (``--no-search``: without
it), then samples prompts that ask for all three at
once — and prompts that ask for none — with MoLE, with NLA (every LoRA at 1/N) and with plain stacking
(every LoRA at 1), same seeds, scores every image with the toy world's exact attribute probes
(composition accuracy = every requested concept present; base preservation = a base prompt drawn right)
and writes everything to the output folder.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

import mole_core as mole
from mole_core import MoleError
from mole_core.viz import heatmap_payload, save_heatmap
from mole_toy import world as W
from mole_toy.guide import load_toy_guide

from .compose import ComposePrompts
from .config import TrainConfig
from .data import scan_folder
from .diffusers_backend import DiffusersBackend, quiet_libraries
from .engine import gate_statistics, reference_cache, train
from .plots import training_curves
from .recipes import recipe_fields
from .sampling import attach_mixture, image_grid, save_png

DEMO_CONCEPTS = ["purple", "striped", "star"]
DEMO_STEPS = 150
# the compose recipe (train/recipes.py = bench/composition.py's best row: trigger routing on UNet and text encoder,
# objective compose, then the block search) at the demo's scale: the search with a smaller judge (prompts per set,
# DDIM steps; 351 candidates, their rollouts 48 images at a time); ``--no-search`` skips it
DEMO_SEARCH = dict(search_prompts=4, search_steps=6, search_batch=48)
SEARCH_ONLY = {k: v for k, v in recipe_fields("compose").items() if k == "block_search" or k.startswith("search_")}
RECIPE = {k: v for k, v in recipe_fields("compose").items() if k not in SEARCH_ONLY}
TRAIN_PROMPTS, BASE_PROMPTS = 16, 24
PROMPTS, IMAGES, SAMPLE_STEPS, CFG, BASE_EVAL = 4, 4, 20, 5.0, 16
METHODS = ("mole", "nla", "stack")  # learned gates, every LoRA at 1/N, every LoRA at 1


def _world(rebuild: bool):  # noqa: ANN202
    from mole_toy import load_world

    if rebuild:
        from mole_toy.build import build

        build()
    try:
        return load_world()
    except FileNotFoundError as exc:
        raise MoleError(f"{exc}") from None


def _sample(world, pipe, experts, method: str, gates, prompts: list[str], seed: int):  # noqa: ANN001, ANN202
    from mole_toy.evaluate import sample

    stack = method == "stack"
    mixes = attach_mixture(pipe, experts, gates=gates if method == "mole" else None,
                           mode="static" if stack else "uniform", weights=[1.0] * len(experts) if stack else None)
    try:
        images = sample(pipe, prompts, seed=seed, steps=SAMPLE_STEPS, guidance=CFG)
        stats = mixes[0].stats.summary() if method == "mole" else {}
    finally:
        for m in mixes:
            m.detach()
    return images, stats


def demo_config(steps: int, size: int, search: bool) -> TrainConfig:
    """The compose recipe at the demo's scale; its block search (with the demo's smaller judge) only if ``search``."""
    return TrainConfig(steps=steps, lr=3e-2, resolution=size, batch_size=8, checkpoint_every=0, seed=0, **RECIPE,
                       **({**SEARCH_ONLY, **DEMO_SEARCH} if search else {}))


def _report(p: dict, log) -> None:  # noqa: ANN001
    """Every 20th step, and every 50th candidate of the block search."""
    if p.get("phase") == "block_search":
        if p["candidate"] % 50 == 0 or p["candidate"] == p["candidates"]:
            log(f"  block search {p['candidate']}/{p['candidates']}")
    elif p["step"] % 20 == 0:
        log(f"  step {p['step']:4d}/{p['steps']} loss {p['loss']:.4f} gate entropy {p['gate_entropy']:.3f}")


def training_prompts(world) -> ComposePrompts:  # noqa: ANN001
    """Every 1-, 2- and 3-concept composition of the demo's concepts (prompt seeds apart from the evaluation's)
    and base prompts naming no concept."""
    comps = [c.prompt for k in (1, 2, 3) for sub in itertools.combinations(DEMO_CONCEPTS, k)
             for c in world.composition_prompts(k, per_set=TRAIN_PROMPTS, seed=100, concepts=list(sub))]
    base = [W.caption(sp) for sp in W.sample_specs(BASE_PROMPTS, 77, W.BASE_VALUES)]
    return ComposePrompts(comps, base)


def run_demo(out: Path, steps: int | None = None, rebuild: bool = False, log=print,  # noqa: ANN001
             search: bool = True) -> dict:
    """Train gates on the toy world (``search``: then the recipe's block search), sample MoLE vs NLA vs stacking,
    score; returns the metrics (also in metrics.json)."""
    t0 = time.perf_counter()
    quiet_libraries()
    world = _world(rebuild)
    out.mkdir(parents=True, exist_ok=True)
    refs_dir = world.write_reference_folder(out / "refs", DEMO_CONCEPTS, n=8, seed=0)
    pipe = world.pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = world.manifest.get("image_size", 32)
    backend = DiffusersBackend(pipe, resolution=size)
    experts = mole.load_experts(world.expert_paths(DEMO_CONCEPTS))
    refs = scan_folder(refs_dir)
    cfg = demo_config(steps or DEMO_STEPS, size, search)
    cache = reference_cache(backend, experts, refs, cfg)
    prompts_in = training_prompts(world)
    log(f"training gates (recipe compose: {cfg.steps} steps{', then the block search' if search else ''}) on "
        f"{len(prompts_in.compositions)} composition prompts of {', '.join(DEMO_CONCEPTS)} and "
        f"{len(prompts_in.base)} base prompts, guided by the toy CLIP and {len(refs)} reference images…")
    t_train = time.perf_counter()
    res = train(cfg, backend, experts, refs, cache=cache, out_path=str(out / "gates.safetensors"),
                compose_prompts=prompts_in, guide=load_toy_guide(world.clip_path),
                progress=lambda p: _report(p, log))
    train_s = time.perf_counter() - t_train
    training_curves(res.history).save(out / "curves.png")
    stats = gate_statistics(backend, experts, res.gates, cache)
    save_heatmap(heatmap_payload(stats["mean"], [e.name for e in experts], title="mean gate per expert and block "
                                 "(on the references)"), str(out / "heatmap.png"))
    comps = world.composition_prompts(3, per_set=PROMPTS, seed=0, concepts=DEMO_CONCEPTS)
    prompts = [c.prompt for c in comps for _ in range(IMAGES)]
    wanted = [c.wanted for c in comps for _ in range(IMAGES)]
    metrics: dict = {"concepts": DEMO_CONCEPTS, "prompts": [c.prompt for c in comps], "gate_steps": cfg.steps,
                     "block_search": cfg.block_search,
                     "train_seconds": round(train_s, 1), "final_training": res.metrics}
    concept_attrs = [W.concept(c).attribute for c in DEMO_CONCEPTS]
    base_specs = [sp.attributes for sp in W.sample_specs(BASE_EVAL, 3000, W.BASE_VALUES)]
    modes = {"mole": "gated", "nla": "uniform", "stack": "static " + ",".join("1" * len(experts))}
    tiles: list[Image.Image] = []
    labels: list[str] = []
    for method in METHODS:
        images, gstats = _sample(world, pipe, experts, method, res.gates, prompts, seed=1234)
        folder = out / "samples" / method
        folder.mkdir(parents=True, exist_ok=True)
        scores = [world.probe.score(im, w) for im, w in zip(images, wanted)]
        for i, (im, p) in enumerate(zip(images, prompts)):
            info = {"prompt": p, "negative": "", "seed": 1234, "steps": SAMPLE_STEPS, "cfg": CFG, "size": size,
                    "mode": modes[method],
                    "probe": scores[i]["pred"],
                    "mean_gates": gstats.get("mean", {})}
            save_png(Image.fromarray(im), info, folder / f"{i:03d}.png")
        base_images, _ = _sample(world, pipe, experts, method, res.gates, [W.caption(b) for b in base_specs],
                                 seed=4321)
        metrics[method] = {
            "composition_accuracy": float(np.mean([all(s[a] for a in concept_attrs) for s in scores])),
            "base_preservation": float(np.mean([world.probe.score(im, b)["all"]
                                                for im, b in zip(base_images, base_specs)])),
            "all_attributes_accuracy": float(np.mean([s["all"] for s in scores])),
            "attribute_accuracy": {a: float(np.mean([s[a] for s in scores])) for a in wanted[0]},
        }
        if gstats:
            q = np.mean(np.array(list(gstats["mean"].values())), axis=0)
            metrics[method]["mean_gates"] = dict(zip([e.name for e in experts], np.round(q, 4).tolist()))
        tiles += [Image.fromarray(im).resize((96, 96), Image.NEAREST) for im in images[::IMAGES]]
        labels += [f"{method}: {c.prompt}" for c in comps]
    image_grid(tiles, cols=len(comps), labels=labels).save(out / "mole_vs_nla.png")  # rows: METHODS
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return {k: metrics[k] for k in ("concepts", "seconds", "train_seconds")} | {
        m: metrics[m]["composition_accuracy"] for m in METHODS} | {
        f"{m}_base": metrics[m]["base_preservation"] for m in METHODS}
