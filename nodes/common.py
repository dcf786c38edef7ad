"""Small helpers shared by the MoLE nodes: input parsing, file-name checks, folder registration."""

from __future__ import annotations

import os
import re
from typing import Any

import folder_paths

import mole_core
from mole_core.checks import check_numbers

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
    if "\x00" in (name or "") or len(name or "") > MAX_NAME:
        raise mole_core.MoleError(f"`{what}`: a name without NUL characters and at most {MAX_NAME} characters "
                                  f"is expected, got {len(name or '')} characters")
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


def inside(base: str, path: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) to a location inside ``base``."""
    base_r, path_r = os.path.realpath(base), os.path.realpath(path)
    return os.path.commonpath([base_r, path_r]) == base_r


def path_inside(base: str, relative: str, what: str, folder: str) -> str:
    """The absolute path of ``relative`` under ``base``, refused (one-line MoleError naming ``what``) when it
    would leave ``base`` once symlinks are followed: every write of the nodes goes through this."""
    path = os.path.join(base, *relative.split("/"))
    if not inside(base, path):
        raise mole_core.MoleError(f"`{what}` must stay inside {folder} (a symlinked folder there points outside)")
    return path


def parse_floats(text: str, what: str, n: int | None = None, names: list[str] | None = None) -> list[float]:
    """``"0.5, 1, 0.25"`` → floats; with ``n``, exactly ``n`` values are required.

    Raises:
        MoleError: a value that is not a number, or the wrong count (names the experts).
    """
    items = [t for t in re.split(r"[,\s;]+", (text or "").strip()) if t]
    try:
        values = [float(t) for t in items]
    except ValueError:
        bad = next(t for t in items if not _is_float(t))
        raise mole_core.MoleError(f"`{what}`: {bad!r} is not a number (write e.g. \"0.5, 1, 0.25\")") from None
    if n is not None and len(values) != n:
        listed = f" ({', '.join(names)})" if names else ""
        raise mole_core.MoleError(f"`{what}` has {len(values)} values but there are {n} experts{listed}")
    return check_numbers(values, f"`{what}`")


def _is_float(t: str) -> bool:
    try:
        float(t)
    except ValueError:
        return False
    return True


def parse_mask(text: str, default: list[bool], names: list[str]) -> list[bool]:
    """``"1, 0, 1"`` (or ``on, off``) → which experts are on; empty text → ``default``."""
    if not (text or "").strip():
        return list(default)
    words = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}
    items = [t.lower() for t in re.split(r"[,\s;]+", text.strip()) if t]
    bad = [t for t in items if t not in words]
    if bad:
        raise mole_core.MoleError(f"`mask`: {bad[0]!r} is not 1/0 or on/off")
    if len(items) != len(names):
        raise mole_core.MoleError(f"`mask` has {len(items)} values but there are {len(names)} experts "
                                  f"({', '.join(names)})")
    mask = [words[t] for t in items]
    if not any(mask):
        raise mole_core.MoleError("`mask` switches every expert off; keep at least one on")
    return mask


def node_id(cls: Any) -> str | None:
    """The executing node's id (None when a node class is called directly, e.g. in tests)."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None
