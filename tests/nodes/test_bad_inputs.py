"""The nodes' part of the bad-input table (issue #14; the CLI and API part: ``tests/test_bad_inputs.py``): every
malformed node input is a one-line ``MoleError`` naming the input, and nothing is written."""

from __future__ import annotations

import pytest
import torch

from tests.nodes._nodes import apply, load, load_gates

pytestmark = pytest.mark.comfy


def _apply(**kw):  # noqa: ANN202
    return lambda mole, tiny, experts, gates: apply(mole, tiny[0], experts, **kw)


def _save(name: str):  # noqa: ANN202
    def run(mole, tiny, experts, gates):  # noqa: ANN001, ANN202
        with torch.inference_mode():
            return mole.gates.MoleSaveGates.execute(gates=gates, filename=name, overwrite=False)
    return run


def _bake(**kw):  # noqa: ANN202
    def run(mole, tiny, experts, gates):  # noqa: ANN001, ANN202
        args = dict(model=tiny[0], experts=experts, weights_from="static weights", weights="0.5, 0.5", strength=1.0,
                    save_lora=True, filename_prefix="bad/bake", clip=None, gates=None)
        with torch.inference_mode():
            return mole.bake.MoleBake.execute(**{**args, **kw})
    return run


def _load(*picks):  # noqa: ANN202
    return lambda mole, tiny, experts, gates: load(mole, tiny[0], None, *picks)


NODE_CASES = [  # (what the node is given, words the one-line message must contain)
    (_apply(mode="static weights", weights="0.5"), "`weights` has 1 values"),
    (_apply(mode="static weights", weights="0.5, x"), "'x' is not a number"),
    (_apply(mode="static weights", weights="nan, 1"), "`weights`[1]"),
    (_apply(mode="static weights", weights="1e9, 1"), "`weights`[1]"),
    (_apply(mode="static weights", weights="inf, 1"), "`weights`[1]"),
    (_apply(mode="gated", mask="0, 0"), "switches every expert off"),
    (_apply(mode="gated", mask="1, 0, 1"), "`mask` has 3 values"),
    (_apply(mode="gated", mask="1, maybe"), "'maybe'"),
    (_apply(mode="gated", strength=float("nan")), "`strength`"),
    (_apply(mode="gated", strength=float("inf")), "`strength`"),
    (_apply(mode="gated", strength=100.0), "`strength`"),
    (_save("../escape"), "inside models/mole_gates"),
    (_save("/abs/path"), "inside models/mole_gates"),
    (_save("bad\x00name"), "`filename`"),
    (_save("x" * 300), "`filename`"),
    (_save(""), "`filename`"),
    (_bake(weights="0.5"), "`weights` has 1 values"),
    (_bake(weights="0.5, x"), "'x' is not a number"),
    (_bake(filename_prefix="../escape"), "`filename_prefix`"),
    (_bake(filename_prefix="bad\x00name"), "`filename_prefix`"),
    (_bake(filename_prefix="y" * 300), "`filename_prefix`"),
    (_bake(strength=float("nan")), "`strength`"),
    (_load(), "pick at least one LoRA"),
    (_load(("a.safetensors", float("nan"), True)), "strength"),
    (_load(("no_such.safetensors", 1.0, True)), "no_such.safetensors"),
    (_load(("../a.safetensors", 1.0, True)), "../a.safetensors"),
]


@pytest.mark.parametrize("case, words", NODE_CASES)
def test_node_bad_input_is_a_one_line_error_and_writes_nothing(case, words, mole, tiny, experts, comfy_dirs):
    import mole_core

    _, _, gates = apply(mole, tiny[0], experts, "gated")
    before = sorted(p.relative_to(comfy_dirs["loras"].parent) for p in comfy_dirs["loras"].parent.rglob("*"))
    with pytest.raises(mole_core.MoleError) as err:
        case(mole, tiny, experts, gates)
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert sorted(p.relative_to(comfy_dirs["loras"].parent) for p in comfy_dirs["loras"].parent.rglob("*")) == before


@pytest.mark.parametrize("name, words", [("../x.safetensors", "inside"), ("nope.safetensors", "nope.safetensors")])
def test_load_gates_bad_names(name, words, mole):
    import mole_core

    with pytest.raises(mole_core.MoleError, match=words):
        load_gates(mole, name)
