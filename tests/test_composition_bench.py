"""``bench/composition.py --merge``: a recipe's rows join the saved results of the same settings, the other rows
stay as saved, and results of other settings are refused. (The benchmark itself takes an hour; its recipes'
training runs are tested in tests/train/test_compose.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import composition as C  # noqa: E402

import mole_core as mole  # noqa: E402
from mole_toy.evaluate import sample  # noqa: E402
from train.config import TrainConfig  # noqa: E402

ROW = {"2_train": (0.5, 0.1), "3_train": (0.4, 0.1), "2_held_out": (1.0, 0.0), "3_held_out": (1.0, 0.0),
       "base": (0.6, 0.0), "sample_entropy": (0.7, 0.0)}


def _saved(tmp_path: Path, **over: object) -> Path:
    summary = {"bench": "composition", "quick": True, "seeds": [0], "gate_steps": 120, "images_per_composition": 16,
               "elapsed_s": 100.0, "results": {"stack": ROW, "mole_denoise": ROW}, **over}
    path = tmp_path / "composition_quick.json"
    path.write_text(json.dumps(summary))
    return path


def test_merge_replaces_the_recipes_rows_and_keeps_the_others(tmp_path, monkeypatch, capsys):
    _saved(tmp_path)
    monkeypatch.setattr(C, "OUT", tmp_path)
    calls = []

    def run_seed(seed, s, recipes, log, baselines):  # noqa: ANN001, ANN202
        calls.append((seed, [r.name for r in recipes], baselines))
        return {r.name: {"2_train": 0.9, "3_train": 0.8, "2_held_out": 1.0, "3_held_out": 1.0, "base": 0.7,
                         "sample_entropy": 0.5} for r in recipes}

    monkeypatch.setattr(C, "run_seed", run_seed)
    assert C.main(["--quick", "--merge", "--recipes", "mole_denoise,mole_sigmoid_compose_trigger_fixed"]) == 0
    assert calls == [(0, ["mole_denoise", "mole_sigmoid_compose_trigger_fixed"], [])]  # no baselines re-run
    out = json.loads((tmp_path / "composition_quick.json").read_text())
    assert list(out["results"]) == ["stack", "mole_denoise", "mole_sigmoid_compose_trigger_fixed"]
    assert out["results"]["stack"] == {k: list(v) for k, v in ROW.items()}
    assert out["results"]["mole_denoise"]["2_train"] == [0.9, 0.0]
    assert out["elapsed_s"]["all"] == 100.0
    md = (tmp_path / "composition_quick.md").read_text()
    assert "| stack | 0.50 ± 0.10" in md and "| mole_sigmoid_compose_trigger_fixed | 0.90 ± 0.00" in md


def test_merge_into_another_file_keeps_its_order_and_leaves_the_default_results_alone(tmp_path, monkeypatch,
                                                                                       capsys):
    """``--into FILE``: the rows go into that file (the history of on-request recipes), a row it has replaced in
    place, a new one last; its table is rewritten beside it, and bench/out's results are neither read nor written."""
    history = tmp_path / "results" / "history.json"
    history.parent.mkdir()
    summary = {"bench": "composition", "quick": True, "seeds": [0], "gate_steps": 120, "images_per_composition": 16,
               "elapsed_s": {"all": 100.0}, "results": {"mole_sigmoid_compose_trigger_fixed": ROW, "stack": ROW}}
    history.write_text(json.dumps(summary))
    monkeypatch.setattr(C, "OUT", tmp_path / "out")
    monkeypatch.setattr(C, "run_seed", lambda seed, s, recipes, log, baselines: {
        r.name: dict(ROW_RUN, **{"2_train": 0.9}) for r in recipes})
    assert C.main(["--quick", "--merge", "--into", str(history), "--recipes",
                   "mole_denoise,mole_sigmoid_compose_trigger_fixed"]) == 0
    out = json.loads(history.read_text())
    assert list(out["results"]) == ["mole_sigmoid_compose_trigger_fixed", "stack", "mole_denoise"]
    assert out["results"]["mole_sigmoid_compose_trigger_fixed"]["2_train"] == [0.9, 0.0]
    assert out["results"]["stack"] == {k: list(v) for k, v in ROW.items()}
    assert set(out["elapsed_s"]) == {"all", "mole_denoise,mole_sigmoid_compose_trigger_fixed"}
    assert (tmp_path / "results" / "history.md").read_text() == C.table(out["results"]) + "\n"
    assert not (tmp_path / "out").exists()
    for bad in (["--into", str(history), "--recipes", "mole_denoise"], ["--merge", "--into", "h.md", "--recipes",
                                                                          "mole_denoise"]):
        with pytest.raises(SystemExit) as info:
            C.main(["--quick", *bad])
        assert info.value.code == 2 and "--into needs --merge and a .json file" in capsys.readouterr().err


@pytest.mark.parametrize("over, message", [
    ({"seeds": [0, 1, 2]}, "was measured with"),
    ({"images_per_composition": 64}, "was measured with"),
    ({"gate_steps": 300}, "was measured with"),
])
def test_merge_refuses_results_of_other_settings(tmp_path, monkeypatch, over, message):
    _saved(tmp_path, **over)
    monkeypatch.setattr(C, "OUT", tmp_path)
    monkeypatch.setattr(C, "run_seed", lambda *a, **k: pytest.fail("ran before checking the saved settings"))
    with pytest.raises(SystemExit, match=message):
        C.main(["--quick", "--merge", "--recipes", "mole_denoise"])


def test_merge_needs_saved_results_and_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "OUT", tmp_path)
    with pytest.raises(SystemExit, match="no saved results"):
        C.main(["--quick", "--merge", "--recipes", "mole_denoise"])
    with pytest.raises(SystemExit) as info:
        C.main(["--quick", "--merge"])
    assert info.value.code == 2 and "--merge needs --recipes or --baselines" in capsys.readouterr().err


def test_switch_and_composite_are_baselines_on_request_that_merge_into_their_places(tmp_path, monkeypatch, capsys):
    """The default run leaves LoRA Switch and LoRA Composite out; ``--merge --baselines switch,composite`` judges
    them alone and files their rows among the baselines, before the recipes."""
    calls = []

    def run_seed(seed, s, recipes, log, baselines):  # noqa: ANN001, ANN202
        calls.append(([r.name for r in recipes], baselines))
        return {name: dict(ROW_RUN) for name in [*baselines, *(r.name for r in recipes)]}

    monkeypatch.setattr(C, "OUT", tmp_path)
    monkeypatch.setattr(C, "run_seed", run_seed)
    assert C.main(["--quick"]) == 0
    assert calls[-1] == ([r.name for r in C.RECIPES], ["stack", "nla", "static_1.5", "static_2", "static_2.5"])
    assert C.main(["--quick", "--merge", "--baselines", "switch,composite"]) == 0
    assert calls[-1] == ([], ["switch", "composite"])
    out = json.loads((tmp_path / "composition_quick.json").read_text())
    assert list(out["results"]) == ["stack", "nla", "switch", "composite", "static_1.5", "static_2", "static_2.5",
                                    "static_best", *(r.name for r in C.RECIPES)]
    assert set(out["elapsed_s"]) == {"all", "switch,composite"}
    with pytest.raises(SystemExit) as info:
        C.main(["--quick", "--baselines", "stack,lora_hub"])
    assert info.value.code == 2 and "--baselines: unknown ['lora_hub']" in capsys.readouterr().err


def test_first_seed_runs_later_seeds_and_baselines_none_runs_only_the_recipes(tmp_path, monkeypatch, capsys):
    """``--first-seed 3 --seeds 3``: seeds 3, 4, 5 (recorded in the results); ``--baselines none``: no baseline;
    nothing to run, or a negative first seed, is a usage error before any seed runs."""
    calls = []

    def run_seed(seed, s, recipes, log, baselines):  # noqa: ANN001, ANN202
        calls.append((seed, [r.name for r in recipes], baselines))
        return {r.name: dict(ROW_RUN) for r in recipes}

    monkeypatch.setattr(C, "OUT", tmp_path)
    monkeypatch.setattr(C, "run_seed", run_seed)
    assert C.main(["--first-seed", "3", "--seeds", "3", "--baselines", "none", "--recipes", "mole_denoise"]) == 0
    assert calls == [(seed, ["mole_denoise"], []) for seed in (3, 4, 5)]
    assert json.loads((tmp_path / "composition.json").read_text())["seeds"] == [3, 4, 5]
    for bad, message in ((["--first-seed", "-1"], "--first-seed must be ≥ 0, got -1"),
                         (["--merge", "--baselines", "none"], "nothing to run")):
        with pytest.raises(SystemExit) as info:
            C.main(["--quick", *bad])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert len(calls) == 3


ROW_RUN = {k: v[0] for k, v in ROW.items()}


def test_the_table_lists_the_pairs_per_composition_when_the_results_have_them():
    per = {f"2_train:{a}+{b}": (v, 0.0) for (a, b), v in zip([("purple", "striped"), ("purple", "star"),
                                                                ("striped", "star")], (1.0, 0.75, 0.25))}
    md = C.table({"stack": ROW, "mole_x": {**ROW, **per}, "static_2": {**ROW, **per}})
    assert "| method | purple+striped | purple+star | striped+star |" in md
    assert "| mole_x | 1.00 | 0.75 | 0.25 |" in md
    assert "| stack | 0.50 ± 0.10" in md and "| stack | 1.00" not in md  # saved before the breakdown: no row
    assert "| static_2 |" not in md  # a sweep point, not the sweep's best
    assert "Whole prompt" not in md  # saved before the whole-prompt keys: no such table


def test_the_table_shows_the_whole_prompt_accuracy_of_rows_that_have_it():
    whole = {f"{k}_whole": (v, 0.05) for k, v in (("2_train", 0.6), ("3_train", 0.9), ("2_held_out", 0.7),
                                                     ("3_held_out", 1.0))}
    per = {f"2_train_whole:{a}+{b}": (v, 0.0) for (a, b), v in zip([("purple", "striped"), ("purple", "star"),
                                                                      ("striped", "star")], (1.0, 0.5, 0.25))}
    md = C.table({"stack": ROW, "mole_x": {**ROW, **whole, **per}})
    assert "| mole_x | 0.60 ± 0.05 | 0.90 ± 0.05 | 0.70 ± 0.05 | 1.00 ± 0.05 | 0.60 ± 0.00 |" in md
    assert md.count("| stack |") == 1  # only in the concept table
    assert "Whole prompt, 2 concepts on the training templates, per composition" in md
    assert "| mole_x | 1.00 | 0.50 | 0.25 |" in md


@pytest.mark.slow
def test_composition_accuracy_per_composition_averages_to_the_sets_mean():
    import argparse
    import itertools

    from mole_toy import load_world

    world = load_world(None)
    pipe = world.pipeline()
    pipe.set_progress_bar_config(disable=True)
    sets = {"2_train": [(p, a, sub) for sub in itertools.combinations(C.CONCEPTS, 2)
                        for p, a in C.prompts_for(sub, C.TRAIN_TEMPLATES, 2, 7002) for _ in range(2)]}
    s = argparse.Namespace(sample_steps=4, guidance=5.0)
    out = C.composition_accuracy(world, pipe, sets, 0, s)
    combos = [f"2_train:{a}+{b}" for a, b in itertools.combinations(C.CONCEPTS, 2)]
    whole = [k.replace(":", "_whole:") for k in combos]
    assert sorted(out) == sorted(["2_train", *combos, "2_train_whole", *whole])
    assert all(out[k] in (0.0, 0.25, 0.5, 0.75, 1.0) for k in combos + whole)  # 4 images each
    assert out["2_train"] == pytest.approx(sum(out[k] for k in combos) / 3)
    assert out["2_train_whole"] == pytest.approx(sum(out[k] for k in whole) / 3)
    assert all(out[w] <= out[k] for k, w in zip(combos, whole))  # the whole prompt includes the named concepts


@pytest.mark.slow
def test_whole_prompt_accuracy_fails_a_leaked_concept_the_concept_accuracy_passes():
    """The striped and star LoRAs stacked on "a red striped circle …" prompts: the star LoRA leaks into the shape.
    The concept accuracy (striped only) does not see it; the whole-prompt accuracy does, image by image as the
    probe reads the shape."""
    import argparse

    from mole_toy import load_world
    from train.sampling import attach_mixture

    world = load_world(None)
    pipe = world.pipeline()
    pipe.set_progress_bar_config(disable=True)
    experts = mole.load_experts(world.expert_paths(C.CONCEPTS))
    items = [(p, a, ("striped",)) for p, a in C.prompts_for(("striped",), C.TRAIN_TEMPLATES, 8, 7001)]
    mixes = attach_mixture(pipe, experts, mode="static", weights=[0.0, 1.0, 1.0])
    try:
        out = C.composition_accuracy(world, pipe, {"s": items}, 0, argparse.Namespace(sample_steps=8, guidance=5.0))
        images = sample(pipe, [p for p, _, _ in items], seed=1000, steps=8, guidance=5.0)
    finally:
        for m in mixes:
            m.detach()
    preds = [world.probe(im) for im in images]
    assert out["s"] == pytest.approx(np.mean([p["texture"] == "striped" for p in preds]))
    assert out["s_whole"] == pytest.approx(np.mean([all(p[k] == v for k, v in a.items())
                                                    for p, (_, a, _) in zip(preds, items)]))
    leaked = [p["texture"] == "striped" and p["shape"] == "star" for p in preds]  # striped, but a star
    assert np.mean(leaked) >= 0.25
    assert out["s_whole"] <= out["s"] - np.mean(leaked)  # each of them passes the concept, fails the whole


def test_every_recipe_is_a_valid_training_config_with_a_unique_name():
    """A recipe with a misspelt or contradictory field would fail only after an hour of baselines."""
    recipes = C.RECIPES + C.ON_REQUEST
    assert len({r.name for r in recipes}) == len(recipes)
    for r in recipes:
        TrainConfig(**{**dict(steps=300, resolution=32, seed=0), **r.fields})


def test_progress_log_reports_each_tenth_of_training_and_of_the_search_once():
    """A searched recipe runs half an hour per seed before its results: the log says how far it is."""
    lines: list[str] = []
    report = C.progress_log(2, "recipe", lines.append)
    for step in range(1, 31):  # 30 steps: a line at 3, 6, ..., 30
        report({"step": step, "steps": 30, "loss": 1.0 / step})
    for i in range(1, 8):  # a search of 7 candidates whose count grows to 14 in its last pass
        report({"phase": "block_search", "candidate": i, "candidates": 7 if i < 7 else 14})
    train_lines = [x for x in lines if " step " in x]
    assert len(train_lines) == 10
    assert train_lines[0] == "seed 2: recipe step 3/30, loss 0.3333"
    assert train_lines[-1] == "seed 2: recipe step 30/30, loss 0.0333"
    search = [x.split()[-1] for x in lines if "block search" in x]
    # tenths 1, 2, 4, 5, 7, 8 of 7 candidates (int(10 i / 7) for i = 1..6), then 7/14 is tenth 5: below the one reached
    assert search == ["1/7", "2/7", "3/7", "4/7", "5/7", "6/7"]
