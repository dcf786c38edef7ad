"""``bench/block_routing.py``: restricting a LoRA to blocks, the summary's arithmetic, and one tiny real run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import mole_core as mole
from mole_core.expert import LoraFactor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import block_routing as B  # noqa: E402


def _expert() -> mole.Expert:
    f = LoraFactor(down=torch.ones(1, 4), up=torch.ones(4, 1), alpha=None)
    names = ["unet:down_blocks.2.attentions.0.proj_in", "unet:mid_block.resnets.0.conv1",
             "unet:up_blocks.1.attentions.0.proj_out", "unet:up_blocks.10.resnets.0.conv1",
             "te:text_model.encoder.layers.0.self_attn.q_proj"]
    return mole.Expert(name="star", factors=dict.fromkeys(names, f))


def test_restrict_keeps_the_listed_unet_blocks_and_every_text_encoder_part():
    e = _expert()
    kept = B.restrict(e, B.STAR_MID_UP01)
    assert sorted(kept.factors) == ["te:text_model.encoder.layers.0.self_attn.q_proj",
                                    "unet:mid_block.resnets.0.conv1", "unet:up_blocks.1.attentions.0.proj_out"]
    assert B.restrict(e, None) is e and len(e.factors) == 5  # the original is not changed


def test_strengthen_text_scales_only_the_text_encoder_factors():
    e = _expert()
    strong = B.strengthen_text(e, 2.5)
    te = "te:text_model.encoder.layers.0.self_attn.q_proj"
    assert torch.equal(strong.factors[te].delta(), 2.5 * e.factors[te].delta())
    assert all(strong.factors[k] is e.factors[k] for k in e.factors if k != te)
    assert B.strengthen_text(e, 1.0) is e and e.factors[te].scale == 1.0
    assert set(B.TEXT_STRENGTHS) <= set(B.ASSIGNMENTS)


def _row(t, c, a, acc, glob, local):  # noqa: ANN001, ANN202
    return dict(seed=0, templates=t, composition=c, assignment=a, accuracy=acc, guide_global=glob, guide_local=local)


def test_summary_means_best_assignments_and_the_guides_pick_by_hand():
    every, star, striped, both = list(B.ASSIGNMENTS)[:4]  # rows for these four only
    acc = {"a+b": (0.5, 0.9, 0.5, 0.9), "a+c": (0.2, 0.2, 0.6, 0.6), "a+b+c": (0.4, 0.8, 0.1, 0.3)}
    guide = {"a+b": (0.1, 0.3, 0.1, 0.3), "a+c": (0.5, 0.5, 0.2, 0.2), "a+b+c": (0.2, 0.1, 0.3, 0.2)}
    rows = [_row("train", c, a, acc[c][i] + d, guide[c][i], 0.0)  # two seeds, mean = acc
            for c in acc for i, a in enumerate((every, star, striped, both)) for d in (-0.1, 0.1)]
    s = B.summarise(rows)["train"]
    assert s["every_block"] == pytest.approx({"pairs": 0.35, "triple": 0.4})
    assert s["best_single"]["assignment"] == star and s["best_single"]["pairs"] == pytest.approx(0.55)
    assert s["best_per_composition"] == pytest.approx({"pairs": 0.75, "triple": 0.8})
    # the guide prefers star (a+b), every block (a+c: first of the tied maxima), striped (a+b+c)
    assert s["guide_pick_per_composition"] == pytest.approx({"pairs": 0.55, "triple": 0.1})
    # ranks: a+b agree (1), a+c are reversed (−1); the triple: accuracy ranks 2 3 0 1, guide 1.5 0 3 1.5
    assert s["rank_correlation"] == pytest.approx({"pairs": 0.0, "triple": -(0.9 ** 0.5)})
    # the guide's 3 favourites: a+b 1 (star, both, every) agree; a+c (every, star, striped) reversed; the triple
    # (striped, every, both): accuracy ranks 0 2 1, guide 2 .5 .5: centred (−1, 1, 0)·(1, −.5, −.5) = −1.5 over √2·√1.5
    assert s["rank_correlation_top"] == pytest.approx({"pairs": 0.0, "triple": -1.5 / (2 ** 0.5 * 1.5 ** 0.5)})
    assert {every, both} <= set(B.ASSIGNMENTS)


def test_summary_adds_the_diffusion_judge_and_the_summed_ranks_by_hand():
    every, star, striped, both = list(B.ASSIGNMENTS)[:4]
    acc = {"a+b": (0.5, 0.9, 0.5, 0.9), "a+c": (0.2, 0.2, 0.6, 0.6), "a+b+c": (0.4, 0.8, 0.1, 0.3)}
    guide = {"a+b": (0.1, 0.3, 0.1, 0.3), "a+c": (0.5, 0.5, 0.2, 0.2), "a+b+c": (0.2, 0.1, 0.3, 0.2)}
    judge = {"a+b": (0.4, 0.1, 0.2, 0.3), "a+c": (0.1, 0.2, 0.3, 0.4), "a+b+c": (0.3, 0.4, 0.1, 0.2)}
    rows = [{**_row("train", c, a, acc[c][i], guide[c][i], 0.0), "judge_diffusion": judge[c][i]}
            for c in acc for i, a in enumerate((every, star, striped, both))]
    s = B.summarise(rows)["train"]
    assert s["guide_pick_per_composition"] == pytest.approx({"pairs": 0.55, "triple": 0.1})  # as without the judge
    d = s["diffusion"]
    assert d["pick_per_composition"] == pytest.approx({"pairs": 0.55, "triple": 0.8})  # every, both; star
    # a+b: accuracy ranks centred (−1, 1, −1, 1), judge (1.5, −1.5, −.5, .5): −2 / (2·√5); a+c: 4 / (2·√5); the
    # triple ranks alike
    assert d["rank_correlation"] == pytest.approx({"pairs": 1 / (2 * 5 ** 0.5), "triple": 1.0})
    # its favourites: a+b (every, both, striped) 0; a+c (both, striped, star) 1.5 / (√1.5·√2); the triple alike
    assert d["rank_correlation_top"] == pytest.approx({"pairs": 0.5 * 1.5 / (1.5 ** 0.5 * 2 ** 0.5), "triple": 1.0})
    # rank sums: a+b (3.5, 2.5, 1.5, 4.5) → both; a+c (2.5, 3.5, 2.5, 3.5) → star (first of the tied); the
    # triple (3.5, 3, 3, 2.5) → every block
    assert s["ensemble"]["pick_per_composition"] == pytest.approx({"pairs": 0.55, "triple": 0.4})
    sums = B._rank_sum(["a+b+c"], [every, star, striped, both],
                       {("a+b+c", a): v for a, v in zip((every, star, striped, both), guide["a+b+c"])},
                       {("a+b+c", a): v for a, v in zip((every, star, striped, both), judge["a+b+c"])})
    assert list(sums.values()) == [3.5, 3.0, 3.0, 2.5]
    unjudged = [{k: v for k, v in r.items() if k != "judge_diffusion"} for r in rows]
    assert "diffusion" not in B.summarise(unjudged)["train"]
    # the dark view is judged like any score: the same numbers as guide_dark give the same three figures
    dark = [{**{k: v for k, v in r.items() if k != "judge_diffusion"}, "guide_dark": r["judge_diffusion"]}
            for r in rows]
    assert B.summarise(dark)["train"]["dark_view"] == d
    assert "dark_view" not in s and "diffusion" not in B.summarise(dark)["train"]


def test_spearman_by_hand_with_ties_and_constant_sides():
    assert B.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ranks 0.5 0.5 2 against 0 1 2: centred (−.5, −.5, 1)·(−1, 0, 1) = 1.5 over √1.5·√2
    assert B.spearman([0.5, 0.5, 1.0], [1, 2, 3]) == pytest.approx(1.5 / (1.5 ** 0.5 * 2 ** 0.5))
    assert B.spearman([0.2, 0.2, 0.2], [1, 2, 3]) is None


def test_random_assignments_are_seeded_and_keep_each_lora_somewhere():
    stages = B.unet_stages([_expert()])
    assert stages == ["down_blocks.2.", "mid_block.", "up_blocks.1.", "up_blocks.10."]
    a = B.random_assignments(40, ["purple", "star"], stages)
    assert a == B.random_assignments(40, ["purple", "star"], stages) != B.random_assignments(40, ["purple", "star"],
                                                                                              stages, seed=1)
    assert list(a) == [f"random {i}" for i in range(40)]
    blocks = [b[c] for b, _ in a.values() for c in ("purple", "star")]
    assert all(b and set(b) <= set(stages) for b in blocks)
    assert {len(b) for b in blocks} > {len(stages)}  # some stages dropped, not always all kept
    assert {t for _, text in a.values() for t in text.values()} == set(B.RANDOM_TEXT)
    kept = B.restrict(_expert(), ("up_blocks.1.",))  # a stage prefix ends in a dot: up_blocks.10 is another stage
    assert [k for k in kept.factors if k.startswith("unet:")] == ["unet:up_blocks.1.attentions.0.proj_out"]


@pytest.mark.slow
def test_a_tiny_run_scores_every_composition_and_assignment(capsys):
    assert B.main(["--prompts", "1", "--images", "1", "--random", "2", "--diffusion-judge", "--dark-view", "0.25",
                   "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["cells"]) == 4 * (len(B.ASSIGNMENTS) + 2)  # three pairs and the triple
    assert all(0 <= c["accuracy"] <= 1 and -1 <= c["guide_global"] <= 1 for c in out["cells"])
    assert set(out["train"]) == {"every_block", "best_single", "best_per_composition", "guide_pick_per_composition",
                                 "rank_correlation", "rank_correlation_top", "dark_view", "diffusion", "ensemble"}
    assert all(abs(c["judge_diffusion"]) < 10 for c in out["cells"])
    # per image the worse of its own score and its dark view's: never above the guide's own score
    assert all(c["guide_dark"] <= c["guide_global"] + c["guide_local"] + 1e-6 for c in out["cells"])
    assert out["random"] == 2 and (B.OUT / "block_routing.json").is_file()


def test_random_must_not_be_negative(capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--random", "-1"])
    assert e.value.code == 2 and "--random must be ≥ 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.1", "1"])
def test_dark_view_must_be_below_one_and_not_negative(value, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--dark-view", value])
    assert e.value.code == 2 and f"--dark-view must be in [0, 1), got {float(value)}" in capsys.readouterr().err


def test_clip_flag_must_name_a_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--clip", str(tmp_path / "none.safetensors")])
    assert e.value.code == 2 and "--clip: no file at" in capsys.readouterr().err
