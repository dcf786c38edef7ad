"""``bench/composition.py --merge``: a recipe's rows join the saved results of the same settings, the other rows
stay as saved, and results of other settings are refused. (The benchmark itself takes an hour; its recipes'
training runs are tested in tests/train/test_compose.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import composition as C  # noqa: E402

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

    def run_seed(seed, s, recipes, log, baselines=True):  # noqa: ANN001, ANN202
        calls.append((seed, [r.name for r in recipes], baselines))
        return {r.name: {"2_train": 0.9, "3_train": 0.8, "2_held_out": 1.0, "3_held_out": 1.0, "base": 0.7,
                         "sample_entropy": 0.5} for r in recipes}

    monkeypatch.setattr(C, "run_seed", run_seed)
    assert C.main(["--quick", "--merge", "--recipes", "mole_denoise,mole_sigmoid_compose_trigger_fixed"]) == 0
    assert calls == [(0, ["mole_denoise", "mole_sigmoid_compose_trigger_fixed"], False)]  # no baselines re-run
    out = json.loads((tmp_path / "composition_quick.json").read_text())
    assert list(out["results"]) == ["stack", "mole_denoise", "mole_sigmoid_compose_trigger_fixed"]
    assert out["results"]["stack"] == {k: list(v) for k, v in ROW.items()}
    assert out["results"]["mole_denoise"]["2_train"] == [0.9, 0.0]
    assert out["elapsed_s"]["all"] == 100.0
    md = (tmp_path / "composition_quick.md").read_text()
    assert "| stack | 0.50 ± 0.10" in md and "| mole_sigmoid_compose_trigger_fixed | 0.90 ± 0.00" in md


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
    assert info.value.code == 2 and "--merge needs --recipes" in capsys.readouterr().err


def test_the_table_lists_the_pairs_per_composition_when_the_results_have_them():
    per = {f"2_train:{a}+{b}": (v, 0.0) for (a, b), v in zip([("purple", "striped"), ("purple", "star"),
                                                                ("striped", "star")], (1.0, 0.75, 0.25))}
    md = C.table({"stack": ROW, "mole_x": {**ROW, **per}, "static_2": {**ROW, **per}})
    assert "| method | purple+striped | purple+star | striped+star |" in md
    assert "| mole_x | 1.00 | 0.75 | 0.25 |" in md
    assert "| stack | 0.50 ± 0.10" in md and "| stack | 1.00" not in md  # saved before the breakdown: no row
    assert "| static_2 |" not in md  # a sweep point, not the sweep's best


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
    assert sorted(out) == sorted(["2_train", *combos])
    assert all(out[k] in (0.0, 0.25, 0.5, 0.75, 1.0) for k in combos)  # 4 images each
    assert out["2_train"] == pytest.approx(sum(out[k] for k in combos) / 3)
