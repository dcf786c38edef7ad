"""``--recipe`` / :func:`train.recipes.recipe_config`: the composition benchmark's best recipe as a starting point.

The oracle for ``compose`` is the benchmark itself: the default set's last row of ``bench/composition.py`` (the
best measured) must be what the recipe sets, so that a change to one without the other fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mole_core as mole
from train.cli import build_parser, main
from train.commands import train_config
from train.config import TrainConfig
from train.recipes import RECIPES, recipe_config, recipe_fields

ROOT = Path(__file__).resolve().parents[2]
CONCEPTS = ["purple", "striped", "star"]
MODEL_ARGS = ["train", "--base", "unused", "--images", "unused"]


def _bench_best() -> dict:
    """The bench's default set's last row, checked against the steps that built it (its on-request ancestors:
    `…_min07_place_share` searched on the compositions only, `…_share_pairs`, plus the texture term)."""
    sys.path.insert(0, str(ROOT / "bench"))  # as tests/test_composition_bench.py imports it
    import composition

    ancestor = {r.name: r.fields for r in composition.ON_REQUEST}[
        "mole_sigmoid_compose_trigger_search_paired_dark_text_refine_windows_text_min07_place_share"]
    parent = {r.name: r.fields for r in composition.ON_REQUEST}[
        "mole_sigmoid_compose_trigger_search_paired_dark_text_refine_windows_text_min07_place_share_pairs"]
    assert dict(parent) == {**ancestor, "search_compositions_only": True}
    assert dict(composition.RECIPES[-1].fields) == {**parent, "search_texture_weight": 0.1}
    return dict(composition.RECIPES[-1].fields)


def _cli_config(*argv: str) -> TrainConfig:
    """The TrainConfig `mole-train train` builds from ``argv`` (the command's own reading of the flags)."""
    recipe = next((argv[i + 1] for i, a in enumerate(argv) if a == "--recipe"), "paper")
    return train_config(build_parser(recipe).parse_args([*MODEL_ARGS, *argv]))


def test_the_compose_recipe_is_the_benchmarks_best_row_and_paper_is_the_defaults():
    best = _bench_best()
    assert recipe_fields("compose") == best
    assert recipe_fields("paper") == {} and _cli_config() == TrainConfig()
    cfg = _cli_config("--recipe", "compose")
    assert cfg == TrainConfig(**best) and cfg.block_search and cfg.gate_input == "trigger"
    assert recipe_config("compose", steps=300, lr=3e-2) == TrainConfig(**best, steps=300, lr=3e-2)


def test_options_given_explicitly_win_over_the_recipe_and_the_rest_stay_the_recipes():
    cfg = _cli_config("--recipe", "compose", "--no-search-share-floors", "--search-min-strength", "0.6",
                      "--steps", "50")
    want = TrainConfig(**{**_bench_best(), "search_share_floors": False, "search_min_strength": 0.6, "steps": 50})
    assert cfg == want
    # a value equal to the paper default, given explicitly, is still the user's
    assert _cli_config("--recipe", "compose", "--negative-routing", "own").negative_routing == "own"
    assert _cli_config("--recipe", "compose", "--no-search-compositions-only").search_compositions_only is False


def test_recipe_help_shows_the_recipes_defaults_and_bad_names_are_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "compose", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "comma list of objectives" in text and "(default: compose)" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: compose)" not in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exc:
        main([*MODEL_ARGS, "--recipe", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --recipe: invalid choice: 'nope' (choose from 'paper', 'compose')" in err
    with pytest.raises(mole.MoleError, match=r"^`recipe` must be one of \['compose', 'paper'\], got 'nope'$"):
        recipe_config("nope")
    with pytest.raises(mole.MoleError, match=r"^unknown training option 'stepz' \(see `mole-train train --help`\)$"):
        recipe_config("compose", stepz=3)
    assert sorted(RECIPES) == ["compose", "paper"]


def test_cli_trains_the_compose_recipe_end_to_end_on_the_toy_world(tmp_path):
    """``--recipe compose`` with a tiny judge: the gate file is a trigger-gate file whose recorded options are the
    recipe's (with the given ones on top) and whose block search ran on the compositions (per-set rows for the
    pairs and the triple, floors and shares recorded), written by the CLI from the toy world's files."""
    from mole_toy import load_world

    world = load_world()
    refs = world.write_reference_folder(tmp_path / "refs", CONCEPTS, n=2)
    loras = [f"--lora={p}" for p in world.expert_paths(CONCEPTS)]
    out = tmp_path / "g.safetensors"
    small = ["--steps", "2", "--batch-size", "2", "--resolution", "32", "--rollout-steps", "2", "--search-prompts",
             "1", "--search-steps", "1", "--search-batch", "2"]
    prompts = [a for p in ("a purple striped circle on grey", "a purple star on white", "a striped star on black",
                           "a purple striped star on grey") for a in ("--compose-prompt", p)]
    r = subprocess.run([sys.executable, "-m", "train", "train", "--recipe", "compose", "--base",
                        str(world.pipeline_dir), *loras, "--images", str(refs), "--out", str(out), "--clip-arch",
                        "toy", "--clip-model", str(world.clip_path), *prompts, "--base-prompt",
                        "a red circle on grey", *small], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    gf = mole.read_gate_file(out)
    training = gf.info["training"]
    want = TrainConfig(**{**recipe_fields("compose"), "steps": 2, "batch_size": 2, "resolution": 32,
                          "rollout_steps": 2, "search_prompts": 1, "search_steps": 1, "search_batch": 2})
    assert {k: training[k] for k in want.to_dict()} == want.to_dict()
    assert gf.config.gate_input == "trigger" and gf.config.family == "sigmoid" and gf.components() == ["te", "unet"]
    search = training["block_search_result"]
    assert search["complete"] and sorted(search["by_set"]) == sorted(
        "+".join(f"{c}.safetensors" for c in sub) for sub in (["purple", "striped"], ["purple", "star"],
                                                              ["striped", "star"], CONCEPTS))
    assert set(search["floors"]) == set(search["by_set"])
