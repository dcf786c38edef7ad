"""Composition quality on the toy world: do learned gates beat NLA? (issue #6)

For every 2- and 3-concept composition of the toy world's concept LoRAs and every seed, this trains
MoLE gates (denoise objective on per-concept reference images — never on composition images) in
several variants and samples composition prompts with each method:

- ``nla``: every expert at 1/N;  ``stack``: every expert at 1;  ``single_<concept>``: one expert alone;
- ``switch`` / ``composite``: the training-free LoRA Switch (one LoRA per sampling step, cycling) and LoRA
  Composite (each LoRA's own CFG prediction, averaged) of Zhong et al. (2024), text encoders at NLA;
- ``mole_block`` / ``mole_layer``: learned gates per block / per transformer layer (α = 0.5);
- ``mole_block_no_balance``: block gates without the balance loss (α = 0);
- ``mole_block_experts``: block gates reading pooled expert outputs instead of the block input;
- ``mole_block_lambda_n``: block gates trained and sampled at mixture strength λ = N, so that uniform gates
  equal ``stack`` instead of ``nla`` (the paper's mixture is convex, λ = 1: it can only redistribute NLA's
  total weight between experts per block).

Probes read every attribute of every image exactly (colour, texture, shape, background), so the
metrics are counts, not CLIP similarities:

- composition accuracy: every requested concept present (its attribute reads as the novel value);
- all attributes: the concepts *and* the prompt's base attributes (bounded by the base model's accuracy);
- per-concept fidelity;
- base preservation: accuracy on prompts that use no concept, with the experts attached;
- gate entropy (of the mean gate over blocks and images) and the largest mean gate share.

``python bench/quality.py --quick --json`` prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mole_core as mole  # noqa: E402
from mole_toy import load_world  # noqa: E402
from mole_toy import world as W  # noqa: E402
from mole_toy.evaluate import sample  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import Reference  # noqa: E402
from train.diffusers_backend import DiffusersBackend, quiet_libraries  # noqa: E402
from train.engine import reference_cache, train  # noqa: E402
from train.sampling import attach_mixture, attach_training_free  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
DEFAULT_CONCEPTS = ["purple", "striped", "star"]  # the demo's three (colour, texture, shape)


@dataclass(frozen=True)
class Variant:
    """A MoLE training recipe."""

    name: str
    granularity: str = "block"
    gate_input: str = "input"
    alpha: float = 0.5
    full_strength: bool = False  # λ = N: uniform gates = every LoRA at weight 1 ("stack"), not 1/N
    objective: str = "denoise"
    family: str = "softmax"  # compose variants gate the text encoders too (prompt-routed, max-pooled tokens)
    extra: tuple[tuple[str, object], ...] = ()  # further TrainConfig fields


VARIANTS = [Variant("mole_block"), Variant("mole_layer", granularity="layer"),
            Variant("mole_block_no_balance", alpha=0.0), Variant("mole_block_experts", gate_input="experts"),
            Variant("mole_block_lambda_n", full_strength=True)]
FULL_EXTRA = [Variant("mole_matrix", granularity="matrix"), Variant("mole_network", granularity="network")]
# run on request (--variants): kept out of the default sets so the full run stays within 20 minutes here
_COMPOSE = (("train_text_gates", True), ("text_pool", "max"), ("steps", 100), ("prior_weight", 0.1))
ON_REQUEST = [Variant("mole_block_prompt", gate_input="prompt"),
              # objective 'compose' (issue #12): composed prompts sampled and scored by the toy CLIP
              Variant("mole_softmax_compose", gate_input="prompt", objective="compose", extra=_COMPOSE),
              Variant("mole_sigmoid_compose", gate_input="prompt", objective="compose", family="sigmoid", alpha=0.0,
                      extra=_COMPOSE),
              Variant("mole_sigmoid_compose_network", granularity="network", gate_input="prompt",
                      objective="compose", family="sigmoid", alpha=0.0, extra=_COMPOSE)]
ALL_VARIANTS = {v.name: v for v in VARIANTS + FULL_EXTRA + ON_REQUEST}


@dataclass
class Settings:
    seeds: list[int]
    steps: int
    lr: float
    refs: int
    prompts: int
    images: int
    sample_steps: int
    guidance: float
    variants: list[Variant]
    base_prompts: int
    pairs: int | None = None  # how many 2-concept subsets (None: all)
    batch: int = 8


def settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings([0, 1], 40, 3e-2, 8, 4, 4, 12, 5.0, VARIANTS, 16, pairs=1, batch=4)
    else:
        s = Settings([0, 1, 2], 60, 3e-2, 8, 4, 4, 12, 5.0, VARIANTS + FULL_EXTRA, 16, pairs=1, batch=4)
    if args.seeds:
        s.seeds = list(range(args.seeds))
    if args.steps:
        s.steps = args.steps
    if args.pairs:
        s.pairs = args.pairs
    if args.variants is not None:
        s.variants = [ALL_VARIANTS[n] for n in args.variants.split(",") if n]
    return s


SWITCH_EVERY = 1  # the toy sampler runs 12 steps: 4 cycles through 3 LoRAs


def static_methods(n: int, names: list[str]) -> dict[str, dict]:
    """The methods that train nothing: NLA, stacking, LoRA Switch, LoRA Composite, each LoRA alone."""
    out = {"nla": {"mode": "uniform"}, "stack": {"mode": "static", "weights": [1.0] * n},
           "switch": {"method": "switch"}, "composite": {"method": "composite"}}
    for i, c in enumerate(names):
        out[f"single_{c}"] = {"mode": "static", "weights": [1.0 if j == i else 0.0 for j in range(n)]}
    return out


def attach_method(pipe, experts: list[mole.Expert], method: dict) -> list:  # noqa: ANN001
    """Mixtures for one method: static/uniform everywhere, gated UNet + NLA text encoders, or LoRA
    Switch/Composite (hooks + mixtures; everything returned has ``detach``)."""
    if "method" in method:
        return attach_training_free(pipe, experts, method["method"], every=SWITCH_EVERY)
    return attach_mixture(pipe, experts, gates=method.get("gates"), mode=method.get("mode", "uniform"),
                          weights=method.get("weights"), strength=method.get("strength", 1.0))


def gate_summary(method: dict, mixes: list[mole.Mixture], n: int) -> tuple[float, float]:
    """Entropy (nats) of the mean gate over blocks and images, and its largest share."""
    if "gates" in method:
        means = mixes[0].stats.mean_gates()
        q = np.mean(np.array(list(means.values())), axis=0) if means else np.full(n, 1 / n)
    else:
        w = np.array(method.get("weights") or [1.0] * n, dtype=float)
        q = w / w.sum()
    q = np.clip(q, 1e-12, 1)
    return float(-(q * np.log(q)).sum()), float(q.max())


def evaluate(world, pipe, experts, method: dict, comps, base_specs, s: Settings, seed: int) -> dict:  # noqa: ANN001
    """Sample composition and base prompts with one method and score them with the probes."""
    mixes = attach_method(pipe, experts, method)
    try:
        prompts = [c.prompt for c in comps for _ in range(s.images)]
        wanted = [c.wanted for c in comps for _ in range(s.images)]
        images = sample(pipe, prompts, seed=1000 + seed, steps=s.sample_steps, guidance=s.guidance)
        entropy, share = gate_summary(method, mixes, len(experts))
        base_images = sample(pipe, [W.caption(b) for b in base_specs], seed=2000 + seed, steps=s.sample_steps,
                             guidance=s.guidance) if base_specs else []
    finally:
        for m in mixes:
            m.detach()
    scores = [world.probe.score(im, w) for im, w in zip(images, wanted)]
    base = [world.probe.score(im, b) for im, b in zip(base_images, base_specs)]
    attrs = [W.concept(c).attribute for c in comps[0].concepts]
    fidelity = {c: float(np.mean([sc[a] for sc in scores])) for c, a in zip(comps[0].concepts, attrs)}
    return {"composition": float(np.mean([all(sc[a] for a in attrs) for sc in scores])),
            "exact": float(np.mean([sc["all"] for sc in scores])), "fidelity": fidelity,
            "base": float(np.mean([b["all"] for b in base])) if base else float("nan"), "entropy": entropy,
            "max_share": share,
            "images": images[:: s.images][: len(comps)]}


def run_subset(world, pipe, backend, subset: tuple[str, ...], seed: int, s: Settings, log) -> dict:  # noqa: ANN001
    """All methods for one composition and seed."""
    experts = mole.load_experts(world.expert_paths(list(subset)))
    refs = [Reference(None, cap, name, img) for name, items in world.reference_images(list(subset), s.refs, seed)
            .items() for img, cap in items]
    comps = world.composition_prompts(len(subset), per_set=s.prompts, seed=seed, concepts=list(subset))
    # base preservation is measured with the largest expert set attached (the 3-concept runs)
    n_base = s.base_prompts if len(subset) == 3 else 0
    base_specs = [sp.attributes for sp in W.sample_specs(n_base, 3000 + seed, W.BASE_VALUES)] if n_base else []
    methods = static_methods(len(experts), list(subset))
    cfg0 = TrainConfig(steps=s.steps, lr=s.lr, resolution=W.SIZE, batch_size=s.batch, seed=seed, checkpoint_every=0)
    caches = {1.0: reference_cache(backend, experts, refs, cfg0)}
    for v in s.variants:
        lam = float(len(experts)) if v.full_strength else 1.0
        cfg = TrainConfig(**{**cfg0.to_dict(), "granularity": v.granularity, "gate_input": v.gate_input,
                             "alpha": v.alpha, "strength": lam, "objective": v.objective,
                             "gate_family": v.family, **dict(v.extra)})
        if lam not in caches:  # the prompts' embeddings depend on the text encoders' LoRA strength
            caches[lam] = reference_cache(backend, experts, refs, cfg)
        t0 = time.perf_counter()
        compose = compose_setup(world, subset, seed) if v.objective == "compose" else {}
        res = train(cfg, backend, experts, refs, cache=None if cfg.train_text_gates else caches[lam], **compose)
        methods[v.name] = {"gates": res.gates, "strength": lam, "train_s": time.perf_counter() - t0}
        log(f"  {'+'.join(subset):24s} seed {seed} trained {v.name} in {methods[v.name]['train_s']:.1f} s")
    out = {}
    for name, method in methods.items():
        out[name] = evaluate(world, pipe, experts, method, comps, base_specs, s, seed)
        log(f"  {'+'.join(subset):24s} seed {seed} {name:24s} comp {out[name]['composition']:.3f} "
            f"base {out[name]['base']:.3f} H {out[name]['entropy']:.3f}")
    return out


def compose_setup(world, subset: tuple[str, ...], seed: int) -> dict:  # noqa: ANN001
    """Training prompts of objective 'compose': every 1..k-concept composition of the subset (prompt seeds
    disjoint from the evaluation's), base prompts, and the toy CLIP as the guide."""
    from mole_toy.guide import load_toy_guide
    from train.compose import ComposePrompts

    if world.clip_path is None:
        raise SystemExit("the toy world has no CLIP: run `python -m mole_toy build-clip`")
    comps = [c.prompt for k in range(1, len(subset) + 1) for sub in itertools.combinations(subset, k)
             for c in world.composition_prompts(k, per_set=4, seed=100 + seed, concepts=list(sub))]
    base = [W.caption(sp) for sp in W.sample_specs(24, 5000 + seed, W.BASE_VALUES)]
    return {"compose_prompts": ComposePrompts(comps, base), "guide": load_toy_guide(world.clip_path)}


def aggregate(results: dict[int, list[dict]]) -> dict:
    """Mean and spread over seeds (and over the compositions of each size) per method and metric."""
    agg: dict = {}
    for k, runs in results.items():
        methods = set().union(*[r.keys() for r in runs])
        for m in sorted(methods):
            key = m if not m.startswith("single_") else "single (mean)"
            vals = [r[m] for r in runs if m in r]
            entry = agg.setdefault(k, {}).setdefault(key, {"composition": [], "exact": [], "base": [],
                                                          "entropy": [], "max_share": [], "fidelity": []})
            for v in vals:
                entry["composition"].append(v["composition"])
                entry["exact"].append(v["exact"])
                if not math.isnan(v["base"]):
                    entry["base"].append(v["base"])
                entry["entropy"].append(v["entropy"])
                entry["max_share"].append(v["max_share"])
                entry["fidelity"].append(float(np.mean(list(v["fidelity"].values()))))
    return {k: {m: {metric: (float(np.mean(v)), float(np.std(v))) if v else (float("nan"), float("nan"))
                    for metric, v in e.items()} for m, e in ms.items()} for k, ms in agg.items()}


def table(agg: dict, k: int) -> str:
    rows = [f"### {k}-concept compositions", "",
            "| method | composition acc. | all attributes | concept fidelity | base preservation | gate entropy "
            "| max share |", "|---|---|---|---|---|---|---|"]
    for m, e in sorted(agg[k].items(), key=lambda x: -x[1]["composition"][0]):
        cells = [f"{e[x][0]:.3f} ± {e[x][1]:.3f}" for x in ("composition", "exact", "fidelity", "base", "entropy",
                                                            "max_share")]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def study_tables(agg: dict) -> str:
    """Granularity (paper Table 9) and balance-loss (Table 7 / Fig. 5) views of the same runs."""
    def cell(m: str, k: int, metric: str) -> str:
        e = agg[k].get(m)
        return f"{e[metric][0]:.3f} ± {e[metric][1]:.3f}" if e else "—"

    gran = [m for m in ("mole_matrix", "mole_layer", "mole_block", "mole_network") if m in agg[3]]
    rows = ["### Granularity (block gates vs finer/coarser scopes, α = 0.5)", "",
            "| gates | composition acc. (2) | composition acc. (3) | concept fidelity (3) | base preservation |",
            "|---|---|---|---|---|"]
    rows += [f"| {m} | {cell(m, 2, 'composition')} | {cell(m, 3, 'composition')} | {cell(m, 3, 'fidelity')} | "
             f"{cell(m, 3, 'base')} |" for m in gran]
    rows += ["", "### Balance loss (block gates, α = 0.5 vs α = 0)", "",
             "| variant | max mean-gate share (3) | gate entropy (3, ln 3 = 1.099) | composition acc. (3) |",
             "|---|---|---|---|"]
    rows += [f"| {m} | {cell(m, 3, 'max_share')} | {cell(m, 3, 'entropy')} | {cell(m, 3, 'composition')} |"
             for m in ("mole_block", "mole_block_no_balance") if m in agg[3]]
    return "\n".join(rows)


def save_grid(samples: dict[str, np.ndarray], path: Path) -> None:
    from PIL import Image, ImageDraw

    names = list(samples)
    cols = max(len(v) for v in samples.values())
    cell, left = 64, 150
    grid = Image.new("RGB", (left + cols * cell, len(names) * cell), "white")
    d = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        d.text((4, r * cell + 26), name, fill="black")
        for c, img in enumerate(samples[name]):
            grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (left + c * cell, r * cell))
    grid.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run (2 seeds, fewer prompts/steps)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="gate-training steps per variant")
    ap.add_argument("--pairs", type=int, default=None, help="2-concept subsets to run (default 1: the first pair; "
                    "each costs ~3 min per seed here)")
    ap.add_argument("--variants", default=None, help="comma-separated MoLE variants to train instead of the default "
                    f"set (the baselines always run; empty: baselines only); known: {', '.join(ALL_VARIANTS)}")
    ap.add_argument("--assets", default=None, help="toy world folder (default mole_toy/assets)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1)")
    ap.add_argument("--concepts", default=None, help="comma-separated concept LoRAs to compose (default "
                    f"{','.join(DEFAULT_CONCEPTS)}; the toy world also has pink)")
    args = ap.parse_args(argv)
    unknown = [n for n in (args.variants or "").split(",") if n and n not in ALL_VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {sorted(ALL_VARIANTS)}")
    torch.set_num_threads(args.threads or 1)  # one thread: same numbers on every run (and faster on a shared box)
    quiet_libraries()
    s = settings(args)
    t0 = time.perf_counter()
    world = load_world(args.assets)
    pipe = world.pipeline()
    pipe.set_progress_bar_config(disable=True)
    backend = DiffusersBackend(pipe, resolution=W.SIZE)
    concepts = args.concepts.split(",") if args.concepts else DEFAULT_CONCEPTS
    unknown = sorted(set(concepts) - set(world.manifest["concepts"]))
    if unknown:
        ap.error(f"--concepts: unknown {unknown}; the toy world has {list(world.manifest['concepts'])}")
    if len(concepts) < 3:
        ap.error(f"--concepts: at least 3 needed (2- and 3-concept compositions), got {concepts}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    results: dict[int, list[dict]] = {2: [], 3: []}
    grid: dict[str, np.ndarray] = {}
    for k in (2, 3):
        subsets = list(itertools.combinations(concepts, k))
        for subset in subsets[: s.pairs] if k == 2 else subsets:
            for seed in s.seeds:
                res = run_subset(world, pipe, backend, subset, seed, s, log)
                results[k].append(res)
                if k == 3 and seed == s.seeds[0] and not grid:
                    grid = {m: r["images"] for m, r in res.items()}
    agg = aggregate(results)
    OUT.mkdir(exist_ok=True)
    if grid:
        suffix = ("_quick" if args.quick else "") + (f"_{args.variants.replace(',', '_')}" if args.variants else "")
        save_grid(grid, OUT / f"quality_grid{suffix}.png")
    print(table(agg, 2) + "\n\n" + table(agg, 3) + "\n\n" + study_tables(agg))
    summary = {
        "bench": "quality", "quick": args.quick, "seeds": s.seeds, "gate_steps": s.steps, "lr": s.lr,
        "concepts": concepts, "elapsed_s": round(time.perf_counter() - t0, 1),
        "composition_accuracy_2": {m: e["composition"][0] for m, e in agg[2].items()},
        "composition_accuracy_3": {m: e["composition"][0] for m, e in agg[3].items()},
        "composition_spread_2": {m: e["composition"][1] for m, e in agg[2].items()},
        "composition_spread_3": {m: e["composition"][1] for m, e in agg[3].items()},
        "base_preservation": {m: e["base"][0] for m, e in agg[3].items()},
        "concept_fidelity_3": {m: e["fidelity"][0] for m, e in agg[3].items()},
        "gate_entropy": {m: e["entropy"][0] for m, e in agg[3].items()},
        "max_gate_share": {m: e["max_share"][0] for m, e in agg[3].items()},
        "log_n": math.log(3),
    }
    (OUT / ("quality_quick.json" if args.quick else "quality.json")).write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
