"""Where composition is lost, and whether the guide can see it (issue #12): per-block routing by hand.

The composition benchmark's learned gates stay below stacking on the training templates although routing works
(each LoRA on when its trigger word is named). This script asks two questions without training anything:

1. **Ceiling.** An oracle router: the LoRAs a prompt names at weight 1 (UNet and text encoder), the others off.
   Each named LoRA then runs either in every UNet block or only in the blocks an *assignment* lists (its text-
   encoder part always on, at 1 or at the strength ``TEXT_STRENGTHS`` gives). Which accuracy does each
   assignment reach, per composition?
2. **Signal.** For every image, the toy CLIP guide's *global* similarity (image ↔ composed prompt) and *local*
   similarity (image ↔ each named concept's reference images) — the two terms objective ``compose`` follows.
   If the guide scores the better assignment no higher, gate training cannot learn it from the guide.

``--random K`` adds K random assignments (the same for every seed and composition: each named LoRA kept in each
UNet stage with probability 0.7, at least one, and its text-encoder part at a strength drawn from
``RANDOM_TEXT``) and reports, per composition, the rank correlation of the guide's score with the probes'
accuracy over all assignments and over the guide's favourites (the quarter it scores highest): does the guide
order the candidates a block search chooses between as the probes do, where the choice is made?
``--diffusion-judge`` asks the same of a second judge, the diffusion model itself (``diffusion_judge.py``), and of
the sum of both judges' ranks.

Prompts come from the composition benchmark's training templates (``--held-out`` adds the held-out ones).
``python bench/block_routing.py --json`` prints one JSON object as its last line (≈ 3 min per seed on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import composition as C  # noqa: E402
from diffusion_judge import judge_score, lora_gains  # noqa: E402

import mole_core as mole  # noqa: E402
from mole_toy import load_world  # noqa: E402
from mole_toy import world as W  # noqa: E402
from mole_toy.evaluate import sample  # noqa: E402
from mole_toy.guide import load_toy_guide  # noqa: E402
from mole_toy.training import to_tensor  # noqa: E402
from train.block_search import stage_of  # noqa: E402
from train.compose import reference_embeddings  # noqa: E402
from train.dark_view import dark_to_background  # noqa: E402
from train.diffusers_backend import quiet_libraries  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
STAR_MID_UP01 = ("mid_block.", "up_blocks.0.", "up_blocks.1.")
ASSIGNMENTS: dict[str, dict[str, tuple[str, ...]]] = {  # concept → UNet block prefixes it runs in (else: all)
    "every block": {},
    "star in mid, up0, up1": {"star": STAR_MID_UP01},
    "striped in up": {"striped": ("up_blocks.",)},
    "striped in up, star in mid, up0, up1": {"striped": ("up_blocks.",), "star": STAR_MID_UP01},
    "star in mid, up0, up1; striped's text part ×2": {"star": STAR_MID_UP01},
    "star in mid, up0, up1; striped's text part ×2.5": {"star": STAR_MID_UP01},
}
RANDOM_KEEP = 0.7  # --random: probability that a named LoRA runs in a UNet stage
TOP_SHARE = 0.25  # the rank correlation among the guide's favourites: this share of the assignments (≥ 3)
RANDOM_TEXT = (1.0, 1.0, 1.5, 2.0, 2.5)  # --random: its text-encoder part's strength (1, as trained, twice as likely)
TEXT_STRENGTHS: dict[str, dict[str, float]] = {  # assignment → concept → strength of its text-encoder part (else 1)
    "star in mid, up0, up1; striped's text part ×2": {"striped": 2.0},
    "star in mid, up0, up1; striped's text part ×2.5": {"striped": 2.5},
}


def restrict(expert: mole.Expert, prefixes: tuple[str, ...] | None) -> mole.Expert:
    """``expert`` with its UNet factors kept only in blocks starting with one of ``prefixes`` (None: all)."""
    if prefixes is None:
        return expert
    keep = {k: f for k, f in expert.factors.items()
            if not k.startswith("unet:") or k.split(":", 1)[1].startswith(prefixes)}
    return dataclasses.replace(expert, factors=keep)


def unet_stages(experts: list[mole.Expert]) -> list[str]:
    """The UNet stages the experts' factors live in, as block prefixes (``down_blocks.0.``, ``mid_block.``, …)."""
    stages = {stage_of(k) for e in experts for k in e.factors}
    return sorted(st.removeprefix("unet:") + "." for st in stages if st is not None)


Assignment = tuple[dict[str, tuple[str, ...]], dict[str, float]]  # concept → stages it runs in; → text strength


def random_assignments(k: int, concepts: list[str], stages: list[str], seed: int = 0) -> dict[str, Assignment]:
    """``k`` random assignments, deterministic in ``seed``: per concept, each of ``stages`` kept with probability
    :data:`RANDOM_KEEP` (at least one), and a text-encoder strength from :data:`RANDOM_TEXT`."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(k):
        blocks, text = {}, {}
        for c in concepts:
            keep = rng.random(len(stages)) < RANDOM_KEEP
            keep[rng.integers(len(stages))] = True
            blocks[c] = tuple(st for st, on in zip(stages, keep) if on)
            text[c] = float(rng.choice(RANDOM_TEXT))
        out[f"random {i}"] = (blocks, text)
    return out


def _ranks(x: list[float]) -> np.ndarray:
    """Ranks of ``x`` from 0 (lowest); ties share their mean rank."""
    x = np.asarray(x, dtype=float)
    r = np.empty(len(x))
    r[x.argsort(kind="stable")] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (ties share their mean rank); None when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def strengthen_text(expert: mole.Expert, strength: float) -> mole.Expert:
    """``expert`` with its text-encoder factors scaled by ``strength`` (its UNet factors unchanged)."""
    if strength == 1.0:
        return expert
    scaled = {k: dataclasses.replace(f, scale_override=f.scale * strength) if k.startswith("te:") else f
              for k, f in expert.factors.items()}
    return dataclasses.replace(expert, factors=scaled)


def _score(world, pipe, guide, text: torch.Tensor, ref_emb: dict, items: list, sub: tuple,  # noqa: ANN001
           experts: list[mole.Expert], judges: list[mole.Expert], seed: int, s: argparse.Namespace) -> dict:
    """Probe accuracy and mean guide similarities of ``items`` sampled with ``experts`` at weight 1; with
    ``s.diffusion_judge`` also the diffusion model's judgement by the whole named LoRAs ``judges``."""
    mix = mole.attach(pipe, experts, mode="static", weights=[1.0] * len(experts))
    try:
        images = sample(pipe, [p for p, _ in items], seed=1000 + seed, steps=s.sample_steps, guidance=s.guidance)
    finally:
        mix.detach()
    ok = [all(world.probe.score(im, a)[W.concept(c).attribute] for c in sub) for im, (_, a) in zip(images, items)]
    pixels = to_tensor(np.stack([np.asarray(im) for im in images]))

    @torch.no_grad()
    def guide_terms(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: cos to its prompt, mean cos to the named concepts' references."""
        emb = guide.embed_images(view)
        return (emb * text).sum(-1), torch.stack([emb @ ref_emb[c] for c in sub]).mean(0)

    own_global, own_local = guide_terms(pixels)
    out = dict(accuracy=float(np.mean(ok)), guide_global=float(own_global.mean()), guide_local=float(own_local.mean()))
    if s.dark_view:
        dark = sum(guide_terms(dark_to_background(pixels, s.dark_view)))
        out["guide_dark"] = float(torch.minimum(own_global + own_local, dark).mean())
    if s.diffusion_judge:
        out["judge_diffusion"] = judge_score(lora_gains(pipe, images, [p for p, _ in items], judges, seed))
    return out


def run_seed(seed: int, s: argparse.Namespace, log) -> list[dict]:  # noqa: ANN001
    world = load_world(s.assets)
    pipe = world.pipeline()
    pipe.set_progress_bar_config(disable=True)
    experts = dict(zip(C.CONCEPTS, mole.load_experts(world.expert_paths(C.CONCEPTS))))
    guide = load_toy_guide(s.clip or world.clip_path)
    refs = C.references(world, seed, 8)
    ref_emb = reference_embeddings(guide, [to_tensor(np.array(r.image)[None])[0] for r in refs],
                                   [r.concept for r in refs])
    templates = {"train": C.TRAIN_TEMPLATES, **({"held_out": C.HELD_OUT_TEMPLATES} if s.held_out else {})}
    assignments: dict[str, Assignment] = {name: (a, TEXT_STRENGTHS.get(name, {})) for name, a in ASSIGNMENTS.items()}
    assignments |= random_assignments(s.random, C.CONCEPTS, unet_stages(list(experts.values())))
    rows = []
    for (tname, tpl), k in itertools.product(templates.items(), (2, 3)):
        for sub in itertools.combinations(C.CONCEPTS, k):
            items = [(p, a) for p, a in C.prompts_for(sub, tpl, s.prompts, 7000 + seed + k) for _ in range(s.images)]
            with torch.no_grad():
                text = guide.embed_texts([p for p, _ in items])
            done: dict[tuple, dict] = {}  # the same restriction of these LoRAs is sampled once
            for name, (assignment, strengths) in assignments.items():
                effective = tuple((c, assignment.get(c), strengths.get(c, 1.0)) for c in sub)
                if effective not in done:
                    named = [strengthen_text(restrict(experts[c], assignment.get(c)), strengths.get(c, 1.0))
                             for c in sub]
                    done[effective] = _score(world, pipe, guide, text, ref_emb, items, sub, named,
                                             [experts[c] for c in sub], seed, s)
                row = dict(seed=seed, templates=tname, composition="+".join(sub), assignment=name, **done[effective])
                rows.append(row)
                judged = f"  diffusion {row['judge_diffusion']:.5f}" if "judge_diffusion" in row else ""
                log(f"seed {seed} {tname} {row['composition']:<20} {name[:36]:<36} acc {row['accuracy']:.2f}  "
                    f"global {row['guide_global']:.3f}  local {row['guide_local']:.3f}{judged}")
    return rows


def _means(comps: list[str], pick) -> dict:  # noqa: ANN001
    """Mean of ``pick(composition)`` over the pairs and over the triple."""
    return {"pairs": float(np.mean([pick(c) for c in comps if c.count("+") == 1])),
            "triple": float(np.mean([pick(c) for c in comps if c.count("+") == 2]))}


def _rank_means(comps: list[str], pick) -> dict:  # noqa: ANN001
    """Like :func:`_means`, skipping undefined (None) values; None where none is defined."""
    out = {}
    for group, n in (("pairs", 1), ("triple", 2)):
        vals = [v for c in comps if c.count("+") == n and (v := pick(c)) is not None]
        out[group] = float(np.mean(vals)) if vals else None
    return out


def _favourites(names: list[str], comp: str, score: dict) -> list[str]:
    """The :data:`TOP_SHARE` of ``names`` (at least 3) a judge's ``score`` ranks highest on ``comp`` (ties: first
    named)."""
    n = max(3, math.ceil(len(names) * TOP_SHARE))
    return sorted(names, key=lambda a: -score[(comp, a)])[:n]


def _judge(comps: list[str], names: list[str], acc: dict, score: dict) -> dict:
    """How a judge's ``score`` ((composition, assignment) → higher is better) does against the probes'
    ``acc``: the accuracy of its pick per composition, and its rank correlation with the accuracy over all
    assignments and over its favourites, as pair and triple means."""
    def pick(c: str) -> float:
        return acc[(c, max(names, key=lambda a: score[(c, a)]))]
    return {"pick_per_composition": _means(comps, pick),
            "rank_correlation": _rank_means(comps, lambda c: spearman(
                [acc[(c, a)] for a in names], [score[(c, a)] for a in names])),
            "rank_correlation_top": _rank_means(comps, lambda c: spearman(
                *zip(*[(acc[(c, a)], score[(c, a)]) for a in _favourites(names, c, score)])))}


def _rank_sum(comps: list[str], names: list[str], *scores: dict) -> dict:
    """Per composition, the sum of each score's rank among ``names`` (0 = lowest; ties share their mean)."""
    out = {}
    for c in comps:
        for score in scores:
            for a, r in zip(names, _ranks([score[(c, a)] for a in names])):
                out[(c, a)] = out.get((c, a), 0.0) + float(r)
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean over seeds per (templates, composition, assignment); per template set, the pair and triple means of
    ``every block``, of the best single assignment, of the best assignment chosen per composition (by the probes:
    a ceiling) and of the one the guide prefers per composition (highest global + local similarity, i.e. lowest
    compose loss with the default weights), and the mean over the pairs and over the triple of each composition's
    rank correlation between the guide's score and the accuracy across all assignments and across the guide's
    favourites (the :data:`TOP_SHARE` it scores highest, at least 3: the choice a search makes; None: undefined).
    Rows judged by the diffusion model too add the same three figures for it (``diffusion``) and for the sum of
    both judges' ranks (``ensemble``)."""
    metrics = ["accuracy", "guide_global", "guide_local"]
    metrics += [m for m in ("judge_diffusion", "guide_dark") if m in rows[0]]
    keys = sorted({(r["templates"], r["composition"], r["assignment"]) for r in rows})
    cells = {}
    for key in keys:
        sel = [r for r in rows if (r["templates"], r["composition"], r["assignment"]) == key]
        cells[key] = {m: float(np.mean([r[m] for r in sel])) for m in metrics}
    out: dict = {"cells": [dict(templates=t, composition=c, assignment=a, **v) for (t, c, a), v in cells.items()]}
    names = list(dict.fromkeys(r["assignment"] for r in rows))  # the assignments scored, in run order
    for t in sorted({k[0] for k in keys}):
        comps = sorted({k[1] for k in keys if k[0] == t})
        acc = {(c, a): cells[(t, c, a)]["accuracy"] for c in comps for a in names}
        guide = {(c, a): cells[(t, c, a)]["guide_global"] + cells[(t, c, a)]["guide_local"]
                 for c in comps for a in names}
        single = max(names, key=lambda a: sum(_means(comps, lambda c: acc[(c, a)]).values()))  # noqa: B023
        by_guide = _judge(comps, names, acc, guide)
        out[t] = {"every_block": _means(comps, lambda c: acc[(c, "every block")]),  # noqa: B023
                  "best_single": {"assignment": single, **_means(comps, lambda c: acc[(c, single)])},  # noqa: B023
                  "best_per_composition": _means(comps, lambda c: max(acc[(c, a)] for a in names)),  # noqa: B023
                  "guide_pick_per_composition": by_guide["pick_per_composition"],
                  "rank_correlation": by_guide["rank_correlation"],
                  "rank_correlation_top": by_guide["rank_correlation_top"]}
        if "guide_dark" in metrics:
            dark = {(c, a): cells[(t, c, a)]["guide_dark"] for c in comps for a in names}
            out[t]["dark_view"] = _judge(comps, names, acc, dark)
        if "judge_diffusion" in metrics:
            diffusion = {(c, a): cells[(t, c, a)]["judge_diffusion"] for c in comps for a in names}
            out[t]["diffusion"] = _judge(comps, names, acc, diffusion)
            out[t]["ensemble"] = _judge(comps, names, acc, _rank_sum(comps, names, guide, diffusion))
    return out


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def table(summary: dict) -> str:
    lines = ["| templates | composition | assignment | accuracy | guide global | guide local |",
             "|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        if c["assignment"].startswith("random "):  # in the JSON only; summed up below
            continue
        lines.append(f"| {c['templates']} | {c['composition']} | {c['assignment']} | {c['accuracy']:.2f} | "
                     f"{c['guide_global']:.3f} | {c['guide_local']:.3f} |")
    for t in ("train", "held_out"):
        if t in summary:
            s = summary[t]
            lines.append(f"\n{t}: every block {s['every_block']['pairs']:.2f} / {s['every_block']['triple']:.2f} · "
                         f"best single ({s['best_single']['assignment']}) {s['best_single']['pairs']:.2f} / "
                         f"{s['best_single']['triple']:.2f} · best per composition "
                         f"{s['best_per_composition']['pairs']:.2f} / {s['best_per_composition']['triple']:.2f} · "
                         f"the guide's pick per composition {s['guide_pick_per_composition']['pairs']:.2f} / "
                         f"{s['guide_pick_per_composition']['triple']:.2f} · rank correlation guide ↔ probes "
                         f"{_num(s['rank_correlation']['pairs'])} / {_num(s['rank_correlation']['triple'])}, "
                         f"among the guide's favourites {_num(s['rank_correlation_top']['pairs'])} / "
                         f"{_num(s['rank_correlation_top']['triple'])} (pairs / triple)")
            for judge in ("dark_view", "diffusion", "ensemble"):
                if judge in s:
                    j = s[judge]
                    pick = j["pick_per_composition"]
                    lines.append(f"{t}, judged by {judge}: pick per composition {pick['pairs']:.2f}"
                                 f" / {pick['triple']:.2f} · rank correlation with the probes "
                                 f"{_num(j['rank_correlation']['pairs'])} / {_num(j['rank_correlation']['triple'])}, "
                                 f"among its favourites {_num(j['rank_correlation_top']['pairs'])} / "
                                 f"{_num(j['rank_correlation_top']['triple'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per composition (default 8)")
    ap.add_argument("--images", type=int, default=4, help="images per prompt (default 4)")
    ap.add_argument("--held-out", action="store_true", help="also the held-out templates")
    ap.add_argument("--assets", default=None, help="toy world folder (default mole_toy/assets)")
    ap.add_argument("--clip", default=None, help="a toy CLIP file to judge with (default: the world's own), e.g. "
                    "one from `python -m mole_toy build-clip --hard-negatives N --out DIR`")
    ap.add_argument("--random", type=int, default=0, metavar="K", help="also K random assignments (stages and "
                    "text strengths, the same for every seed) and the guide's rank correlation with the probes "
                    "over all assignments (default 0)")
    ap.add_argument("--diffusion-judge", action="store_true", help="also judge every assignment by the diffusion "
                    "model (bench/diffusion_judge.py: how much each named LoRA alone lowers the base model's "
                    "prediction error on the samples) and by both judges' ranks summed (≈ 1.6× the time)")
    ap.add_argument("--dark-view", type=float, default=0.0, metavar="T", help="also judge every assignment by the "
                    "guide's worse score of each image and its dark view (near-black pixels below T × its bright "
                    "level set to its border colour: train/dark_view.py; the block search's --search-dark-view), "
                    "e.g. 0.25 (default 0: off)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    if not 0.0 <= args.dark_view < 1.0:
        ap.error(f"--dark-view must be in [0, 1), got {args.dark_view}")
    if args.random < 0:
        ap.error(f"--random must be ≥ 0, got {args.random}")
    for flag in ("seeds", "prompts", "images"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be ≥ 1, got {getattr(args, flag)}")
    torch.set_num_threads(1)
    quiet_libraries()
    if args.clip is not None and not Path(args.clip).is_file():
        ap.error(f"--clip: no file at {args.clip}")
    s = argparse.Namespace(assets=args.assets, clip=args.clip, prompts=args.prompts, images=args.images,
                           held_out=args.held_out, random=args.random, diffusion_judge=args.diffusion_judge,
                           dark_view=args.dark_view,
                           sample_steps=12, guidance=5.0)
    t0 = time.time()
    rows = [r for seed in range(args.seeds) for r in run_seed(seed, s, lambda m: print(m, file=sys.stderr, flush=True))]
    summary = {**summarise(rows), "seeds": args.seeds, "random": args.random, "seconds": round(time.time() - t0)}
    OUT.mkdir(exist_ok=True)
    (OUT / "block_routing.json").write_text(json.dumps(summary, indent=1))
    print(table(summary))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
