"""The bad-input table (issue #14): every malformed flag, file or value a user or a script can hand the CLI or the
Python API is a one-line error naming the input — and the CLI finds it **before** it loads the model (a
sentinel in place of the model loader fails the case otherwise). The nodes' table is
``tests/nodes/test_bad_inputs.py``; malformed LoRA and gate files are fuzzed in ``tests/core``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mole_core as mole
from mole_core.checks import check_number, parse_numbers, parse_switches
from train.cli import main
from train.config import TrainConfig
from train.sampling import SampleSpec

pytestmark = pytest.mark.slow  # builds the tiny SD1.5 fixtures once (session-scoped), then each case is fast


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd15_dir, lora_set) -> dict[str, Path]:
    """Files the cases point at: the tiny model, two LoRAs, references, and assorted broken files."""
    from tests.train.conftest import write_refs

    root = tmp_path_factory.mktemp("bad_inputs")
    refs = write_refs(root / "refs")
    (root / "empty").mkdir()
    (root / "text.safetensors").write_text("not a safetensors file")
    (root / "pickle.pt").write_bytes(b"\x80\x04\x95")
    (root / "truncated.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    save_file({"x": torch.ones(2)}, str(root / "nolora.safetensors"))
    save_file({"x": torch.ones(2)}, str(root / "notgates.safetensors"), {"mole": "{}"})
    (root / "afile").write_text("a file where a folder is expected")
    return {"base": tiny_sd15_dir, "a": lora_set.paths[0], "b": lora_set.paths[1], "refs": refs, "root": root}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading the model fails the case: the bad input must be found before it."""
    import train.diffusers_backend as backend

    def sentinel(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(backend, "load_pipeline", sentinel)


def _fill(argv: list[str], w: dict[str, Path], tmp: Path) -> list[str]:
    return [a.format(base=w["base"], a=w["a"], b=w["b"], refs=w["refs"], root=w["root"], tmp=tmp) for a in argv]


TRAIN = ["train", "--base", "{base}", "--lora", "{a}", "--lora", "{b}", "--images", "{refs}",
         "--out", "{tmp}/g.safetensors", "--steps", "2", "--resolution", "64"]
SAMPLE = ["sample", "--base", "{base}", "--lora", "{a}", "--lora", "{b}", "--prompt", "a ball", "--steps", "2",
          "--size", "64", "--out", "{tmp}/s", "--uniform"]


def _with(argv: list[str], *pairs: str) -> list[str]:
    """``argv`` with each ``--flag value`` of ``pairs`` replaced (or added)."""
    out = list(argv)
    for flag, value in zip(pairs[::2], pairs[1::2]):
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def _without(argv: list[str], flag: str, values: int = 1) -> list[str]:
    out = list(argv)
    i = out.index(flag)
    del out[i:i + 1 + values]
    return out


SAMPLE_NO_MODE = _without(SAMPLE, "--uniform", 0)
CLI_CASES = [  # (argv, words the one-line message must contain)
    # train: numbers
    (_with(TRAIN, "--steps", "0"), "`steps`"), (_with(TRAIN, "--steps", "-3"), "`steps`"),
    (_with(TRAIN, "--steps", "abc"), "--steps"), (_with(TRAIN, "--steps", "1e9"), "--steps"),
    (_with(TRAIN, "--steps", "1000000000"), "`steps`"),
    (_with(TRAIN, "--lr", "0"), "`lr`"), (_with(TRAIN, "--lr", "nan"), "`lr`"), (_with(TRAIN, "--lr", "inf"), "`lr`"),
    (_with(TRAIN, "--lr", "-1"), "`lr`"), (_with(TRAIN, "--batch-size", "0"), "`batch_size`"),
    (_with(TRAIN, "--resolution", "0"), "`resolution`"), (_with(TRAIN, "--resolution", "60"), "`resolution`"),
    (_with(TRAIN, "--resolution", "100000"), "`resolution`"), (_with(TRAIN, "--alpha", "nan"), "`alpha`"),
    (_with(TRAIN, "--alpha", "-1"), "`alpha`"), (_with(TRAIN, "--strength", "nan"), "`strength`"),
    (_with(TRAIN, "--strength", "inf"), "`strength`"), (_with(TRAIN, "--m-max", "0"), "m_max"),
    (_with(TRAIN, "--grad-accum", "0"), "`grad_accum`"), (_with(TRAIN, "--checkpoint-every", "-1"),
                                                          "`checkpoint_every`"),
    # train: choices
    (_with(TRAIN, "--granularity", "pixel"), "--granularity"), (_with(TRAIN, "--gate-family", "relu"),
                                                                "--gate-family"),
    (_with(TRAIN, "--gate-input", "eyes"), "--gate-input"), (_with(TRAIN, "--objective", "vibes"), "objective"),
    (_with(TRAIN, "--dtype", "fp8"), "--dtype"),
    # train: files and folders
    (_with(TRAIN, "--images", "{root}/empty"), "no images"), (_with(TRAIN, "--images", "{root}/nope"),
                                                              "not a directory"),
    (_with(TRAIN, "--images", "{root}/afile"), "not a directory"),
    (_with(TRAIN, "--out", "{root}/nope/g.safetensors"), "does not exist"),
    (_with(TRAIN, "--out", "{root}/afile/g.safetensors"), "--out"), (_with(TRAIN, "--out", "{tmp}/g.txt"),
                                                                      ".safetensors"),
    (_with(TRAIN, "--resume", "{root}/text.safetensors"), "text.safetensors"),
    (_with(TRAIN, "--resume", "{root}/nope.safetensors"), "nope.safetensors"),
    (_with(TRAIN, "--resume", "{root}/nolora.safetensors"), "not a MoLE training checkpoint"),
    (_without(_without(TRAIN, "--lora"), "--lora"), "no LoRAs"),
    (_with(_without(_without(TRAIN, "--lora"), "--lora"), "--lora", "{root}/nope.safetensors"), "nope.safetensors"),
    (_with(_without(_without(TRAIN, "--lora"), "--lora"), "--lora", "{root}/text.safetensors"), "text.safetensors"),
    (_with(_without(_without(TRAIN, "--lora"), "--lora"), "--lora", "{root}/pickle.pt"), "pickle.pt"),
    (_with(_without(_without(TRAIN, "--lora"), "--lora"), "--lora", "{root}/truncated.safetensors"),
     "truncated.safetensors"),
    (_with(_without(_without(TRAIN, "--lora"), "--lora"), "--lora", "{root}/nolora.safetensors"), "nolora"),
    (_with(_without(_without(TRAIN, "--lora"), "--lora"), "--lora", "{a}:abc"), "abc"),
    (_with(_without(_without(TRAIN, "--lora"), "--lora"), "--lora", "{a}:nan"), "strength"),
    (_with(TRAIN, "--objective", "compose"), "--compose-prompt"),
    (_with(TRAIN, "--objective", "compose", "--compose-prompt", "a red and blue ball"), "--clip-model"),
    (_with(TRAIN, "--objective", "compose", "--compose-prompt", "a red and blue ball", "--clip-model",
           "{root}/nope.safetensors"), "nope.safetensors"),
    (_with(TRAIN, "--objective", "compose", "--compose-prompt", "a purple ball"), "purple"),
    (_with(TRAIN, "--objective", "denoise,clip", "--clip-model", "{root}/pickle.pt"), "pickle.pt"),
    # sample
    (_with(SAMPLE, "--size", "0"), "--size"), (_with(SAMPLE, "--size", "60"), "--size"),
    (_with(SAMPLE, "--size", "100000"), "--size"), (_with(SAMPLE, "--size", "64x"), "--size"),
    (_with(SAMPLE, "--size", "axb"), "--size"), (_with(SAMPLE, "--size", "-64"), "--size"),
    (_with(SAMPLE, "--size", "64x60"), "--size"), (_with(SAMPLE, "--steps", "0"), "--steps"),
    (_with(SAMPLE, "--num", "0"), "--num"), (_with(SAMPLE, "--cfg", "nan"), "--cfg"),
    (_with(SAMPLE, "--cfg", "-1"), "--cfg"), (_with(SAMPLE, "--cfg", "1000"), "--cfg"),
    (_with(SAMPLE, "--strength", "nan"), "--strength"), (_with(SAMPLE, "--strength", "inf"), "--strength"),
    (_with(SAMPLE_NO_MODE, "--weights", "nan,1"), "--weights"), (_with(SAMPLE_NO_MODE, "--weights", "1,x"), "'x'"),
    (_with(SAMPLE_NO_MODE, "--weights", "1e9,1"), "--weights"), (_with(SAMPLE, "--mask", "2,1"), "--mask"),
    (_with(SAMPLE, "--mask", "0,0"), "switches every expert off"), (SAMPLE_NO_MODE, "--gates"),
    (_with(SAMPLE_NO_MODE, "--gates", "{root}/nope.safetensors"), "nope.safetensors"),
    (_with(SAMPLE_NO_MODE, "--gates", "{root}/text.safetensors"), "text.safetensors"),
    (_with(SAMPLE_NO_MODE, "--gates", "{root}/notgates.safetensors"), "notgates.safetensors"),
    (_with(SAMPLE, "--method", "mash"), "--method"), (_with(SAMPLE_NO_MODE, "--method", "switch",
                                                            "--switch-every", "0"), "--switch-every"),
    (_with(SAMPLE, "--weights", "1,1"), "not allowed with argument"),
    (_with(SAMPLE, "--out", "{root}/afile"), "--out"),
    (_with(SAMPLE, "--seed", "x"), "--seed"),
    # inspect / eval / compare
    (["inspect", "{root}/nope.safetensors"], "nope.safetensors"), (["inspect", "{root}/text.safetensors"],
                                                                   "text.safetensors"),
    (["inspect", "{root}/pickle.pt"], "pickle.pt"),
    (["eval", "--images", "{root}/nope", "--prompt", "x", "--clip-model", "{root}/nope.safetensors"], "nope"),
    (["eval", "--images", "{refs}/red", "--prompt", "x", "--clip-model", "{root}/pickle.pt"], "pickle.pt"),
    (["compare", "--base", "{base}", "--lora", "{a}", "--gates", "{root}/text.safetensors", "--prompt", "x",
      "--out", "{tmp}/c"], "text.safetensors"),
    (["nonsense"], "invalid choice"), ([], "required"),
]


@pytest.mark.parametrize("argv, words", CLI_CASES, ids=lambda v: " ".join(v[:1] + v[-2:]) if isinstance(v, list)
                         else None)
def test_cli_bad_input_is_one_line_before_the_model_loads(argv, words, world, tmp_path, capsys, no_model_loads):
    try:
        rc = main(_fill(argv, world, tmp_path))
    except SystemExit as exit_:  # argparse: usage, then one "error:" line
        rc = exit_.code
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert rc == 2, (rc, err)
    assert words in last, err
    assert err.count("\n") == 0 or err.startswith("usage:"), err  # one line (argparse adds its usage line)
    assert not any(tmp_path.iterdir())  # nothing written


API_CASES = [  # (callable, words the one-line MoleError must contain)
    (lambda w: mole.load_experts([]), "at least one"),
    (lambda w: mole.load_experts([w["root"] / "nope.safetensors"]), "nope.safetensors"),
    (lambda w: mole.load_experts([w["root"] / "text.safetensors"]), "text.safetensors"),
    (lambda w: mole.load_experts([w["root"] / "pickle.pt"]), "pickle.pt"),
    (lambda w: mole.load_experts([w["root"] / "truncated.safetensors"]), "truncated.safetensors"),
    (lambda w: mole.load_experts([w["root"] / "nolora.safetensors"]), "nolora.safetensors"),
    (lambda w: mole.load_experts([w["root"] / "empty"]), "empty"),
    (lambda w: mole.read_gate_file(w["root"] / "nope.safetensors"), "nope.safetensors"),
    (lambda w: mole.read_gate_file(w["root"] / "text.safetensors"), "text.safetensors"),
    (lambda w: mole.read_gate_file(w["root"] / "notgates.safetensors"), "notgates.safetensors"),
    (lambda w: mole.read_gate_file(w["a"]), "not a MoLE gate file"),
    (lambda w: TrainConfig(steps=0), "`steps`"), (lambda w: TrainConfig(lr=float("nan")), "`lr`"),
    (lambda w: TrainConfig(batch_size=0), "`batch_size`"), (lambda w: TrainConfig(granularity="pixel"), "granularity"),
    (lambda w: TrainConfig(gate_family="relu"), "relu"), (lambda w: TrainConfig(gate_input="eyes"), "eyes"),
    (lambda w: TrainConfig(objective="vibes"), "vibes"), (lambda w: TrainConfig(m_max=0.0), "m_max"),
    (lambda w: TrainConfig(alpha=float("inf")), "`alpha`"), (lambda w: TrainConfig(strength=float("nan")),
                                                             "`strength`"),
    (lambda w: TrainConfig(resolution=60), "`resolution`"), (lambda w: TrainConfig(resolution=10**6), "`resolution`"),
    (lambda w: TrainConfig.from_dict({"steps": "ten"}), "`steps`"), (lambda w: TrainConfig(steps=2.5), "`steps`"),
    (lambda w: TrainConfig(random_crop="yes"), "`random_crop`"), (lambda w: TrainConfig(granularity=3),
                                                                  "`granularity`"),
    (lambda w: TrainConfig(checkpoint_every=-1), "`checkpoint_every`"),
    (lambda w: mole.GateConfig(family="relu"), "relu"), (lambda w: mole.GateConfig(granularity="pixel"), "pixel"),
    (lambda w: mole.GateConfig(gate_input="eyes"), "eyes"),
    (lambda w: SampleSpec(prompt="x", uniform=True, num=0), "`num`"),
    (lambda w: SampleSpec(prompt="x", uniform=True, steps=float("nan")), "`steps`"),
    (lambda w: SampleSpec(prompt="x", weights=[1.0], uniform=True), "exactly one"),
    (lambda w: SampleSpec(prompt="x", uniform=True, method="mash"), "`method`"),
    (lambda w: mole.load_experts([f"{w['a']}:nan"]), "strength"),
    (lambda w: mole.load_experts([f"{w['a']}:x"]), "'x'"),
    (lambda w: parse_numbers("1, two", "`w`"), "'two'"),
    (lambda w: parse_numbers("1, 2", "`w`", 3, ["a", "b", "c"]), "3 experts"),
    (lambda w: parse_switches("1, maybe", "`m`"), "'maybe'"),
    (lambda w: check_number("1e999", "`x`"), "finite"),
    (lambda w: check_number(None, "`x`"), "a number is expected"),
]


@pytest.mark.parametrize("case, words", API_CASES)
def test_api_bad_input_is_a_one_line_mole_error(case, words, world):
    with pytest.raises(mole.MoleError) as err:
        case(world)
    message = str(err.value)
    assert words in message and "\n" not in message, message


def test_the_table_has_at_least_a_hundred_cases():
    assert len(CLI_CASES) + len(API_CASES) >= 100  # plus the nodes' table in tests/nodes/test_bad_inputs.py


def test_a_failed_cli_run_leaves_an_existing_output_byte_identical(world, tmp_path, capsys, no_model_loads):
    out = tmp_path / "g.safetensors"
    shutil.copy(world["a"], out)
    before = out.read_bytes()
    for argv in (_with(TRAIN, "--steps", "0"), _with(TRAIN, "--images", "{root}/empty")):
        assert main(_fill(argv, world, tmp_path)) == 2
    assert out.read_bytes() == before and json.loads(json.dumps(sorted(p.name for p in tmp_path.iterdir()))) == [
        "g.safetensors"]


def test_sample_refuses_an_output_name_that_a_symlink_takes_outside_out(world, tmp_path, capsys, no_model_loads):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside / "stolen.png", out / "uniform_000000.png")
    assert main(_fill(_with(SAMPLE, "--out", str(out)), world, tmp_path)) == 2
    assert "--out" in capsys.readouterr().err and not any(outside.iterdir())
