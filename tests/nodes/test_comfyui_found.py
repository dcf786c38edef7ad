"""The one line that says why tests/nodes did not run (no ComfyUI checkout) — or which one they use."""

from __future__ import annotations

import pytest

from tests.nodes.conftest import COMFYUI, SKIP_REASON


def test_comfyui_checkout_found():
    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    assert (COMFYUI / "comfy" / "model_patcher.py").is_file()
