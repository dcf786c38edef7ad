"""Small helpers shared by the MoLE nodes: input parsing, file-name checks, folder registration."""

from __future__ import annotations

import os
import re
from typing import Any

import folder_paths

import mole_core
from mole_core.checks import parse_numbers, parse_switches

GATES_FOLDER = "mole_gates"
_PICKLE_EXTS = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_DRIVE = re.compile(r"^[A-Za-z]:")


def register_gate_folder() -> None:
    """Register ``models/mole_gates`` (``.safetensors`` only), keeping directories that
    ``extra_model_paths.yaml`` (``mole_gates:``) already added. Idempotent."""
    folder_paths.add_model_folder_path(GATES_FOLDER, os.path.join(folder_paths.models_dir, GATES_FOLDER),
                                       is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[GATES_FOLDER]
    folder_paths.folder_names_and_paths[GATES_FOLDER] = (paths, {".safetensors"})


MAX_NAME = 512


def check_relative_name(name: str, what: str, folder: str) -> str:
    """Refuse names that could leave their model folder; returns the name with ``/`` separators.

    Raises:
        MoleError: empty, absolute, drive-letter or ``..`` names, and pickle extensions.
    """
    if "\x00" in (name or ""):
        raise mole_core.MoleError(f"`{what}`: a name without NUL characters is expected")
    if len(name or "") > MAX_NAME:
        raise mole_core.MoleError(f"`{what}`: a name of at most {MAX_NAME} characters is expected, got {len(name)}")
    clean = (name or "").strip().replace("\\", "/")
    parts = clean.split("/")
    if any(len(p.encode()) > 200 for p in parts):
        raise mole_core.MoleError(f"`{what}`: each folder or file name must be at most 200 bytes")
    if not clean or clean.startswith("/") or _DRIVE.match(clean) or ".." in parts or "" in parts:
        raise mole_core.MoleError(f"`{what}` {name!r} must be a file name inside {folder} "
                                  "(no '..', no absolute path)")
    if clean.lower().endswith(_PICKLE_EXTS):
        raise mole_core.MoleError(f"`{what}` {name!r}: only .safetensors files are used (pickle formats can run code)")
    return clean


def parse_floats(text: str, what: str, n: int | None = None, names: list[str] | None = None) -> list[float]:
    """``"0.5, 1, 0.25"`` → floats (the grammar the CLI's ``--weights`` reads too); with ``n``, exactly ``n``
    values are required.

    Raises:
        MoleError: a value that is not a finite number, or the wrong count (names the experts).
    """
    return parse_numbers(text, f"`{what}`", n, names)


def parse_mask(text: str, default: list[bool], names: list[str]) -> list[bool]:
    """``"1, 0, 1"`` (or ``on, off``) → which experts are on (the CLI's ``--mask`` grammar); empty → ``default``."""
    if not (text or "").strip():
        return list(default)
    return parse_switches(text, "`mask`", len(names), names)


def node_id(cls: Any) -> str | None:
    """The executing node's id (None when a node class is called directly, e.g. in tests)."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None
