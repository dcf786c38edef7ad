"""What a wheel installs: no generic top-level names (``train``, ``nodes``) in site-packages."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_packages_have_project_specific_import_names():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    st = cfg["tool"]["setuptools"]
    tops = {p.split(".")[0] for p in st["packages"]}
    assert tops == {"mole_core", "mole_train", "mole_toy"}, tops
    assert st["package-dir"] == {"mole_train": "train"}  # the folder stays train/, the import name does not
    assert cfg["project"]["scripts"]["mole-train"] == "mole_train.cli:main"
    for pkg in st["packages"]:  # every listed package exists where package-dir says
        folder = ROOT / st["package-dir"].get(pkg.split(".")[0], pkg.split(".")[0]) / Path(*pkg.split(".")[1:])
        assert (folder / "__init__.py").is_file(), pkg
    assert (ROOT / "mole_toy" / "assets" / "manifest.json").is_file()  # shipped as mole_toy package data
    assert cfg["tool"]["setuptools"]["package-data"] == {"mole_toy": ["assets/**/*"]}
