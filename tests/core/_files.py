"""File helpers shared by the gate-file and LoRA-file tests."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mole_core as mole


def damage_header(path: Path, data) -> None:  # noqa: ANN001
    """Overwrite 1–4 bytes of a safetensors file's length field or JSON header, maybe truncate it (hypothesis
    ``data`` draws where and what)."""
    raw = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    from hypothesis import strategies as st

    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, min(len(raw), hlen + 8) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path.write_bytes(bytes(raw))


def reloads_exactly(pipe, experts: list, mix: mole.Mixture, path: Path) -> tuple[dict, dict]:  # noqa: ANN001
    """Attach the saved gate file ``path`` to ``pipe`` and check every gate tensor equals ``mix``'s; returns
    the file's tensors and metadata (for tests that break it)."""
    mix2 = mole.attach(pipe, experts, gates=path)
    for (k, p), (_, q) in zip(mix.gates.state_dict().items(), mix2.gates.state_dict().items()):
        assert torch.equal(p, q), k
    mix2.detach()
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return load_file(path), meta


def refusal(tensors: dict, meta: dict, edit, out: Path) -> str:  # noqa: ANN001
    """Write ``tensors`` changed by ``edit`` (in place on a copy) with ``meta`` to ``out``; reading it must be a
    one-line MoleError, whose message is returned."""
    t = dict(tensors)
    edit(t)
    save_file(t, out, metadata=meta)
    with pytest.raises(mole.MoleError) as exc:
        mole.read_gate_file(out)
    assert "\n" not in str(exc.value)
    return str(exc.value)
