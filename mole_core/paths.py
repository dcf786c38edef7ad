"""Where a write may go: inside its folder once symlinks are followed (every front end writes through this)."""

from __future__ import annotations

import os

from .errors import MoleError


def inside(base: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` resolves (symlinks followed) to a location inside ``base``."""
    base_r, path_r = os.path.realpath(base), os.path.realpath(path)
    return os.path.commonpath([base_r, path_r]) == base_r


def path_inside(base: str | os.PathLike, relative: str, what: str, folder: str) -> str:
    """The path of ``relative`` (``/``-separated) under ``base``; a one-line MoleError naming ``what`` when it would
    leave ``base`` once symlinks are followed (a symlinked sub-folder or file that points outside)."""
    path = os.path.join(base, *relative.split("/"))
    if not inside(base, path):
        raise MoleError(f"`{what}` must stay inside {folder} (a symlinked folder there points outside)")
    return path
