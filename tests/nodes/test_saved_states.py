"""Training states on disk (``nodes/saved_states.py``): which ones a restarted server offers to continue, and
which ones its policy deletes. The restart itself: ``tests/nodes/test_training.py``."""

from __future__ import annotations

import json
import os
import time

import torch
from safetensors.torch import save_file

DAY = 86400.0


def _state(folder, name: str, step: int, steps: int = 10, sha=("s1", "s2"), config=None, age_days: float = 0.0):
    """A state file in the trainer's format (header ``mole_state``: step, experts, config)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    info = {"format": "mole-train-state", "step": step, "n_params": 0, "shapes": [],
            "experts": [{"name": f"e{i}.safetensors", "sha256": s} for i, s in enumerate(sha)],
            "config": config or {"steps": steps, "lr": 0.05}}
    save_file({"rng": torch.zeros(4, dtype=torch.uint8)}, str(path), {"format": "pt", "mole_state": json.dumps(info)})
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return str(path)


def test_find_resumable_matches_name_loras_and_settings_newest_first(mole, tmp_path):
    S = mole.saved_states
    cfg = {"steps": 10, "lr": 0.05}
    old = _state(tmp_path, "sub__x.aaaa1111.mole-state", 3, config=cfg, age_days=1)
    new = _state(tmp_path, "sub__x.bbbb2222.mole-state", 5, config=cfg)
    _state(tmp_path, "sub__x.cccc3333.mole-state", 10, config=cfg)  # complete: nothing to continue
    _state(tmp_path, "other.dddd4444.mole-state", 4, config=cfg)
    found = S.find_resumable(str(tmp_path), "sub/x.safetensors", ["s1", "s2"], {"lr": 0.05, "steps": 10}, [])
    assert found.path == new and found.step == 5 and found.file == "sub/x.safetensors"
    assert S.find_resumable(str(tmp_path), "sub/x.safetensors", ["s1", "s2"], cfg, [new]).path == old  # owned
    assert S.find_resumable(str(tmp_path), "sub/x.safetensors", ["s2", "s1"], cfg, []) is None  # LoRA order
    assert S.find_resumable(str(tmp_path), "sub/x.safetensors", ["s1", "s2"], {**cfg, "lr": 0.1}, []) is None
    assert S.find_resumable(str(tmp_path), "y.safetensors", ["s1", "s2"], cfg, []) is None
    listed = S.interrupted(str(tmp_path), [])
    assert [s.job_id for s in listed] == ["saved-aaaa1111", "saved-bbbb2222", "saved-dddd4444"]  # oldest first
    view = listed[1].view()
    assert view["status"] == "interrupted" and view["progress"] == {"step": 5, "steps": 10}
    assert "continues from step 5 of 10" in view["resume"] and view["checkpoint"] == "sub__x.bbbb2222.mole-state"


def test_stale_policy_deletes_complete_and_old_states_and_keeps_owned_ones(mole, tmp_path):
    S = mole.saved_states
    keep = _state(tmp_path, "a.k0000001.mole-state", 3, age_days=S.MAX_AGE_DAYS - 1)
    done = _state(tmp_path, "a.k0000002.mole-state", 10)
    old = _state(tmp_path, "a.k0000003.mole-state", 3, age_days=S.MAX_AGE_DAYS + 1)
    owned_old = _state(tmp_path, "a.k0000004.mole-state", 3, age_days=S.MAX_AGE_DAYS + 1)
    junk_old, junk_new = tmp_path / "a.k0000005.mole-state.gates", tmp_path / "corrupt.k0000006.mole-state"
    junk_old.write_bytes(b"partial")
    junk_new.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    when = time.time() - (S.MAX_AGE_DAYS + 1) * DAY
    os.utime(junk_old, (when, when))
    gone = S.clean_stale(str(tmp_path), [owned_old])
    assert sorted(gone) == sorted(os.path.basename(p) for p in (done, old, junk_old))
    assert all(os.path.exists(p) for p in (keep, owned_old, junk_new))
    assert [s.path for s in S.interrupted(str(tmp_path), [owned_old])] == [keep]  # the corrupt file is not offered


def test_each_header_is_read_once_per_file_version(mole, tmp_path, monkeypatch):
    """``GET /mole/jobs`` (polled by the panel) cleans, then lists: one header read per state file, again only
    when the file changed."""
    S = mole.saved_states
    a = _state(tmp_path, "a.k0000001.mole-state", 3)
    _state(tmp_path, "b.k0000002.mole-state", 4)
    opened = []
    real = S.safe_open
    monkeypatch.setattr(S, "safe_open", lambda path, *args, **kw: opened.append(path) or real(path, *args, **kw))
    for _ in range(3):
        S.clean_stale(str(tmp_path), [])
        assert [s.step for s in S.interrupted(str(tmp_path), [])] == [3, 4]
    assert sorted(opened) == sorted(str(p) for p in tmp_path.glob("*.mole-state"))  # once each
    opened.clear()
    _state(tmp_path, "a.k0000001.mole-state", 6)  # the run saved a later step: a new version of the file
    os.utime(a, (time.time() + 5, time.time() + 5))
    assert [s.step for s in S.interrupted(str(tmp_path), [])] == [4, 6]  # oldest first
    assert opened == [a]
