"""`mole-train demo` (what `make demo` runs) end to end on the committed toy world, with a short training."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from train.cli import main


def test_demo_writes_every_output(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "demo_out"
    assert main(["demo", "--out", str(out), "--steps", "4", "--no-search"]) == 0  # the search: test_block_search
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("\n{") + 1: printed.index("demo finished")])
    assert summary["concepts"] == ["purple", "striped", "star"]
    for name in ("gates.safetensors", "heatmap.png", "curves.png", "metrics.json", "mole_vs_nla.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gate_steps"] == 4
    for method in ("mole", "nla", "stack"):
        assert 0.0 <= metrics[method]["composition_accuracy"] <= 1.0
        assert summary[method] == metrics[method]["composition_accuracy"]
        pngs = sorted((out / "samples" / method).glob("*.png"))
        assert len(pngs) == 16
        info = json.loads(Image.open(pngs[0]).text["mole"])
        assert info["prompt"] == metrics["prompts"][0] and set(info["probe"]) == {"colour", "texture", "shape",
                                                                                   "background"}
    assert len(metrics["mole"]["mean_gates"]) == 3
    assert sorted(p.name for p in (out / "refs").iterdir()) == ["purple", "star", "striped"]


def test_the_demo_trains_the_compose_recipe_with_its_search_on_request() -> None:
    """`make demo` = the benchmark's best recipe (train/recipes.py) at the demo's scale: with its block search and a
    smaller judge by default, without it under `--no-search`."""
    import dataclasses

    from train.config import TrainConfig
    from train.demo import DEMO_SEARCH, SEARCH_ONLY, demo_config
    from train.recipes import recipe_config

    run = dict(steps=10, lr=3e-2, resolution=32, batch_size=8, checkpoint_every=0, seed=0)
    searched = recipe_config("compose", **run, **DEMO_SEARCH)
    assert demo_config(10, 32, search=True) == searched and searched.block_search
    defaults = TrainConfig()
    plain = dataclasses.replace(searched, **{k: getattr(defaults, k) for k in {*SEARCH_ONLY, *DEMO_SEARCH}})
    assert demo_config(10, 32, search=False) == plain and not plain.block_search
    assert plain.gate_input == "trigger" and plain.objective == "compose" and plain.train_text_gates
    from train.cli import build_parser

    assert build_parser().parse_args(["demo"]).search and not build_parser().parse_args(["demo", "--no-search"]).search
