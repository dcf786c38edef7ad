"""The built wheel, installed where the repository is not on ``sys.path``: its top-level names, the console
script's ``--help`` and a short ``mole-train demo`` on the toy world it ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_NAMES = {"mole_core", "mole_train", "mole_toy"}
SKIP_DIRS = {".git", ".venv", "node_modules", "demo_out", "build", "dist", ".pytest_cache", ".ruff_cache",
             "__pycache__", "out", "artifacts", "cache"}


def _copy_source(dest: Path) -> Path:
    """The working tree without build outputs, so building never writes into the repository."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")}

    return Path(shutil.copytree(ROOT, dest, ignore=ignore))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp / "src")
    dist, site = tmp / "dist", tmp / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], check=True,
                   capture_output=True, timeout=600)
    wheel = next(dist.glob("*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=600)
    run_dir = tmp / "elsewhere"
    run_dir.mkdir()
    # The venv's own packages (torch, diffusers …) stay importable; the repository does not: not the working
    # directory, not on PYTHONPATH (pytest's pythonpath setting only affects this process).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    return {"wheel": wheel, "site": site, "cwd": run_dir, "env": env}


def _run(inst: dict, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=inst["cwd"], env=inst["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_wheel_installs_only_project_named_packages(installed: dict) -> None:
    with zipfile.ZipFile(installed["wheel"]) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
    tops = {t for t in tops if not t.endswith(".dist-info")}
    assert tops <= PROJECT_NAMES, tops  # no generic top-level "train" or "nodes" in site-packages
    assert {"mole_core", "mole_train"} <= tops


def test_installed_packages_come_from_the_wheel_not_the_repository(installed: dict) -> None:
    code = "import mole_core, mole_train, mole_toy; print(mole_core.__file__); print(mole_train.__file__); " \
           "print(mole_toy.__file__); import importlib.util; print(importlib.util.find_spec('train'))"
    out = _run(installed, sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    core, trainer, toy, train_spec = out.stdout.split()
    for f in (core, trainer, toy):
        assert Path(f).is_relative_to(installed["site"]), f
    assert train_spec == "None"  # the repository's train/ is not reachable from the installed tree


def test_console_script_help(installed: dict) -> None:
    out = _run(installed, str(installed["site"] / "bin" / "mole-train"), "--help")
    assert out.returncode == 0, out.stderr
    for command in ("train", "sample", "demo"):
        assert command in out.stdout


@pytest.mark.slow
def test_installed_demo_runs_on_the_shipped_toy_world(installed: dict) -> None:
    out_dir = installed["cwd"] / "demo"
    out = _run(installed, str(installed["site"] / "bin" / "mole-train"), "demo", "--steps", "2", "--no-search",
               "--out", str(out_dir), timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for method in ("mole", "nla", "stack"):
        assert 0.0 <= metrics[method]["composition_accuracy"] <= 1.0, metrics[method]
    assert (out_dir / "mole_vs_nla.png").is_file()
