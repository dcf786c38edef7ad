"""The CLI round trip (train → sample → eval → inspect → compare) and its one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import mole_core as mole
from tests.fixtures.oracle import diffusers_lora_pipeline
from tests.train.test_engine import tiny_clip
from train.cli import main

STEPS = ["--steps", "3", "--resolution", "64", "--batch-size", "2", "--checkpoint-every", "2"]


def _loras(lora_set) -> list[str]:
    return [a for p in lora_set.paths for a in ("--lora", str(p))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd15_dir, lora_set, refs_dir):
    out = tmp_path_factory.mktemp("cli") / "gates.safetensors"
    rc = main(["train", "--base", str(tiny_sd15_dir), *_loras(lora_set), "--images", str(refs_dir), "--out",
               str(out), *STEPS])
    assert rc == 0
    return out


def test_train_writes_gates_heatmap_curves_and_checkpoint(trained):
    folder = trained.parent
    names = {p.name for p in folder.iterdir()}
    assert {"gates.safetensors", "gates_heatmap.png", "gates_curves.png", "gates.state.safetensors"} <= names
    assert Image.open(folder / "gates_heatmap.png").size[0] > 200


def test_sample_with_gates_writes_pngs_with_settings_and_gates(trained, tiny_sd15_dir, lora_set, tmp_path, capsys):
    rc = main(["sample", "--base", str(tiny_sd15_dir), *_loras(lora_set), "--gates", str(trained), "--prompt",
               "a photo of a red ball", "--steps", "3", "--size", "64", "--num", "2", "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 2
    info = json.loads(Image.open(files[0]).text["mole"])
    assert info["mode"] == "gated" and info["seed"] == 0 and info["gates"] == "gates.safetensors"
    assert info["mean_gates"] and all(abs(sum(v) - 1) < 1e-4 for v in info["mean_gates"].values())
    assert info["mean_gates_by_bucket"]


def test_prompt_gates_train_and_sample_through_the_pipeline(tiny_sd15_dir, lora_set, refs_dir, tmp_path):
    """`--gate-input prompt`: the pipeline's own UNet calls feed the prompt to the gates, so two prompts
    sampled with the same seed get different per-block gates (block-input gates would see the same latents)."""
    out = tmp_path / "prompt_gates.safetensors"
    assert main(["train", "--base", str(tiny_sd15_dir), *_loras(lora_set), "--images", str(refs_dir), "--out",
                 str(out), "--gate-input", "prompt", "--lr", "0.5", "--prompt", "a photo of a red ball",
                 *STEPS]) == 0
    gates = {}
    for i, prompt in enumerate(["a photo of a red ball", "an oil painting of a lighthouse at night"]):
        folder = tmp_path / f"s{i}"
        assert main(["sample", "--base", str(tiny_sd15_dir), *_loras(lora_set), "--gates", str(out), "--prompt",
                     prompt, "--steps", "2", "--size", "64", "--cfg", "1", "--out", str(folder)]) == 0
        info = json.loads(Image.open(next(folder.glob("*.png"))).text["mole"])
        gates[prompt] = np.array(list(info["mean_gates"].values()))
    a, b = gates.values()
    assert a.shape == b.shape and np.abs(a - b).max() > 1e-3


def test_sample_weights_equals_diffusers_set_adapters(tiny_sd15_dir, lora_set, tmp_path):
    weights = [0.5, 1.0, 0.25]
    rc = main(["sample", "--base", str(tiny_sd15_dir), *_loras(lora_set), "--weights", ",".join(map(str, weights)),
               "--prompt", "a photo of a cat", "--negative", "blurry", "--seed", "7", "--steps", "3", "--size", "64",
               "--cfg", "5", "--out", str(tmp_path)])
    assert rc == 0
    ours = np.asarray(Image.open(tmp_path / "static_000007.png"), dtype=np.int16)
    pipe = diffusers_lora_pipeline(tiny_sd15_dir, lora_set.paths, weights)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5, height=64,
                  width=64, generator=torch.Generator().manual_seed(7)).images[0]
    diff = np.abs(ours - np.asarray(theirs, dtype=np.int16))
    assert diff.max() <= 1, diff.max()  # identical up to 8-bit rounding of ~1e-6 float differences


def test_eval_and_inspect(trained, tmp_path, refs_dir, lora_set, capsys):
    model, _, cfg = tiny_clip()
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    arch = tmp_path / "mole-test-tiny.json"
    arch.write_text(json.dumps(cfg))
    out = tmp_path / "metrics.json"
    rc = main(["eval", "--images", str(refs_dir / "red"), "--prompt", "a red ball", "--references", str(refs_dir),
               "--clip-model", str(ckpt), "--clip-arch", str(arch), "--out", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["images"] == 2 and set(m["image_alignment"]) == {"red", "green", "blue"}
    for v in (m["text_alignment"], *m["image_alignment"].values()):
        assert -1 <= v["cosine"] <= 1 and 0 <= v["clipscore"] <= 2.5
    ia = {k: v["cosine"] for k, v in m["image_alignment"].items()}
    assert max(ia, key=ia.get) == "red"  # red images are closest to the red references
    capsys.readouterr()
    assert main(["inspect", "--json", str(trained), str(lora_set.paths[0]), str(lora_set.paths[1])]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc[0]["kind"] == "mole-gates" and len(desc[0]["experts"]) == 3
    assert desc[1]["format"] == "kohya" and desc[1]["conv_targets"] > 0 and desc[2]["format"] == "peft"


def test_compare_runs_every_method_with_the_same_seeds(trained, tiny_sd15_dir, lora_set, tmp_path):
    rc = main(["compare", "--base", str(tiny_sd15_dir), *_loras(lora_set), "--gates", str(trained), "--prompt",
               "a photo of a ball", "--steps", "2", "--size", "64", "--num", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"mole", "nla", "only_expert0_kohya", "grid.png", "compare.json"}


def _bad(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("error: ") and "\n" not in err, (rc, err)
    return err


def test_bad_input_one_line_errors_and_nothing_overwritten(capsys, trained, tiny_sd15_dir, lora_set, refs_dir,
                                                          tmp_path):
    keep = tmp_path / "keep.safetensors"
    shutil.copy(trained, keep)
    before = keep.read_bytes()
    base = ["train", "--base", str(tiny_sd15_dir), *_loras(lora_set), "--out", str(keep), *STEPS]
    (tmp_path / "empty").mkdir()
    assert "no images" in _bad(capsys, [*base, "--images", str(tmp_path / "empty")])
    assert "not a directory" in _bad(capsys, [*base, "--images", str(tmp_path / "nope")])
    broken = tmp_path / "broken"
    shutil.copytree(refs_dir, broken)
    (broken / "red" / "0.png").write_bytes(b"not a png")
    assert "0.png: unreadable image" in _bad(capsys, [*base, "--images", str(broken)])
    assert "no LoRAs" in _bad(capsys, ["train", "--base", str(tiny_sd15_dir), "--images", str(refs_dir), "--out",
                                       str(keep), *STEPS])
    assert "does not exist" in _bad(capsys, [*base[:-len(STEPS) - 2], "--out", str(tmp_path / "no" / "g.safetensors"),
                                             "--images", str(refs_dir), *STEPS])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    assert "corrupt.safetensors" in _bad(capsys, [*base, "--images", str(refs_dir), "--resume", str(corrupt)])
    assert "`steps` must be > 0" in _bad(capsys, [*base, "--images", str(refs_dir), "--steps", "0"])
    other = ["sample", "--base", str(tiny_sd15_dir), "--lora", str(lora_set.paths[1]), "--lora",
             str(lora_set.paths[0]), "--lora", str(lora_set.paths[2]), "--gates", str(trained), "--prompt", "x",
             "--steps", "2", "--size", "64", "--out", str(tmp_path / "s")]
    assert "expert 1 should be" in _bad(capsys, other)
    assert keep.read_bytes() == before


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys, tmp_path):
    """A fault that is no MoleError (here: the disk refuses a write inside a command) prints one line and
    exits 1; ``--debug`` shows the traceback."""
    from train import commands

    def broken(args):  # noqa: ANN001, ANN202
        (tmp_path / "ro").mkdir(mode=0o500, exist_ok=True)
        raise OSError(28, "No space left on device", str(tmp_path / "ro" / "g.safetensors"))

    monkeypatch.setitem(commands.COMMANDS, "inspect", broken)
    assert main(["inspect", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OSError" in err and "No space left" in err and "--debug" in err
    with pytest.raises(OSError):
        main(["--debug", "inspect", "x"])


@pytest.mark.parametrize("fields, named", [
    (dict(uniform=True, steps=0), "`steps`"), (dict(uniform=True, size=(64, 60)), "`size`"),
    (dict(uniform=True, cfg=float("nan")), "`cfg`"), (dict(weights=[1.0, float("inf")]), "`weights`[2]"),
    (dict(uniform=True, strength=float("nan")), "`strength`"), (dict(), "`gates`"),
    (dict(method="switch", switch_every=0), "`switch_every`"), (dict(method="switch", uniform=True), "`method`"),
])
def test_sample_spec_errors_name_the_python_fields_not_cli_flags(fields, named):
    from train.sampling import SampleSpec

    with pytest.raises(mole.MoleError) as err:
        SampleSpec(prompt="x", **fields)
    assert named in str(err.value) and "--" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_an_interrupted_or_killed_run_leaves_the_saved_gate_file_byte_identical(how, trained, tiny_sd15_dir, lora_set,
                                                                               refs_dir, tmp_path):
    """Ctrl-C stops at the next step and writes its gates beside --out (``.partial``); a crash (SIGKILL) mid-run
    leaves the saved file and the last checkpoint whole (every write is a temp file + rename)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from train.checkpoint import read_checkpoint

    out = tmp_path / "g.safetensors"
    shutil.copy(trained, out)
    before = out.read_bytes()
    state = tmp_path / "g.state.safetensors"
    cmd = [sys.executable, "-m", "train", "train", "--base", str(tiny_sd15_dir), *_loras(lora_set), "--images",
           str(refs_dir), "--out", str(out), "--steps", "5000", "--resolution", "64", "--batch-size", "2",
           "--checkpoint-every", "1"]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 180
    while not state.exists() and time.time() < end and proc.poll() is None:
        time.sleep(0.1)
    assert state.exists(), proc.communicate(timeout=30)
    time.sleep(0.5)  # a few more steps: the state is rewritten under the signal
    proc.send_signal(getattr(signal, how))
    stdout, stderr = proc.communicate(timeout=120)
    assert out.read_bytes() == before  # never replaced
    assert 0 < read_checkpoint(state).step < 5000  # whole and resumable
    if how == "SIGINT":
        assert proc.returncode == 0 and "cancelled" in stdout, stderr
        partial = mole.read_gate_file(tmp_path / "g.partial.safetensors")
        assert 0 < partial.info["training"]["steps_done"] < 5000
    else:
        assert proc.returncode == -signal.SIGKILL  # (a temp file of a write it killed may stay behind)
