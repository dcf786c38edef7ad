"""``mole_core.paths``: a write stays inside its folder once symlinks are followed."""

from __future__ import annotations

import os

import pytest

from mole_core import MoleError
from mole_core.paths import inside, path_inside


def test_path_inside_follows_symlinks_out_of_the_folder(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    (base / "sub").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, base / "link")
    os.symlink(outside / "f.png", base / "file_link.png")
    assert path_inside(base, "sub/a.png", "--out", "out") == os.path.join(base, "sub", "a.png")
    for name in ("link/a.png", "file_link.png", "../outside/a.png"):
        with pytest.raises(MoleError, match="`--out` must stay inside out"):
            path_inside(base, name, "--out", "out")
    assert inside(base, base / "sub") and not inside(base, outside)
