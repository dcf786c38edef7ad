"""Training states that outlive the server: found again after a restart, deleted by a stated policy.

A job's resumable state is ``models/mole_gates/.checkpoints/<name>.<key>.mole-state`` (gates, optimizer, RNG,
step, the LoRAs' sha256 and the training settings). A server restart loses the job — its private model copy
lives in memory — but not that file. So:

- :func:`interrupted` lists the states no job of this server owns, as jobs with status ``interrupted``
  (``GET /mole/jobs``);
- :func:`find_resumable` is what MoLE Train Gates asks before it starts a job: a state of the same gate-file
  name, the same LoRAs (sha256, in order) and the same settings that stopped before its last step. The job
  then continues from it, in the same file, instead of starting over.

Policy (:func:`clean_stale`, run whenever the job list is read): a job's state is deleted once its gate file is
published; a state that no job owns is deleted when it is complete (its gate file was published before the
state could be deleted) or older than :data:`MAX_AGE_DAYS` days, as is any other file left in the folder
that long (a staging file of a crash mid-save).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from safetensors import safe_open

log = logging.getLogger(__name__)

SUFFIX = ".mole-state"
MAX_AGE_DAYS = 14
PREFIX = "saved-"  # job ids of interrupted states: ``saved-<key>``


@dataclass(frozen=True)
class SavedState:
    """What a state file says about its run (read from the header only)."""

    path: str
    file: str  # the gate file it trains, relative to models/mole_gates
    key: str  # the random part of its name: the job id is ``saved-<key>``
    step: int
    steps: int
    experts: tuple[str, ...]
    sha256: tuple[str, ...]
    config: str  # the training settings, canonical JSON
    mtime: float

    @property
    def job_id(self) -> str:
        return PREFIX + self.key

    def view(self) -> dict:
        """The state as ``GET /mole/jobs`` shows a job (status ``interrupted``; resumed by queuing again)."""
        return {"id": self.job_id, "name": self.file.removesuffix(".safetensors"), "status": "interrupted",
                "revision": 0, "progress": {"step": self.step, "steps": self.steps}, "error": None,
                "checkpoint": os.path.basename(self.path), "created": self.mtime, "started": None,
                "finished": self.mtime, "result": None, "node": None, "file": self.file, "mode": None,
                "steps": self.steps, "experts": list(self.experts), "resumable": True,
                "resume": f"queue MoLE Train Gates again with the name {self.file.removesuffix('.safetensors')!r}, "
                          f"the same LoRAs and settings: it continues from step {self.step} of {self.steps}"}


def stem(file: str) -> str:
    """The state-file prefix of a gate file name (``sub/x.safetensors`` → ``sub__x``)."""
    return file.removesuffix(".safetensors").replace("/", "__")


def canonical_config(config: dict) -> str:
    """Training settings as the state stores them, comparable as a string."""
    return json.dumps(json.loads(json.dumps(config)), sort_keys=True)


_HEADERS: dict[str, tuple[tuple[int, int], SavedState | None]] = {}  # path → ((mtime_ns, size), what it said)
_HEADERS_MAX = 1024


def read_state(path: str) -> SavedState | None:
    """The state at ``path``, or None when it is not a readable MoLE training state. A file's header is read
    once per version (modification time and size): ``GET /mole/jobs``, which the panel polls, cleans and lists
    the folder without reopening every state."""
    name = os.path.basename(path)
    if not name.endswith(SUFFIX) or name.count(".") < 2:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    version = (st.st_mtime_ns, st.st_size)
    hit = _HEADERS.get(path)
    if hit is not None and hit[0] == version:
        return hit[1]
    if len(_HEADERS) >= _HEADERS_MAX:
        _HEADERS.clear()
    state = _read_header(path, name, st.st_mtime)
    _HEADERS[path] = (version, state)
    return state


def _read_header(path: str, name: str, mtime: float) -> SavedState | None:
    prefix, key = name.removesuffix(SUFFIX).rsplit(".", 1)
    try:
        with safe_open(path, "pt") as f:
            info = json.loads((f.metadata() or {})["mole_state"])
        experts = info["experts"]
        return SavedState(path=path, file=prefix.replace("__", "/") + ".safetensors", key=key,
                          step=int(info["step"]), steps=int(info["config"]["steps"]),
                          experts=tuple(str(e["name"]) for e in experts),
                          sha256=tuple(str(e["sha256"]) for e in experts),
                          config=canonical_config(info["config"]), mtime=mtime)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is simply not a state to offer
        log.debug("MoLE: %s is not a readable training state (%s)", name, exc)
        return None


def scan(folder: str) -> list[SavedState]:
    """Every readable state in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = (read_state(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n.endswith(SUFFIX))
    return sorted((s for s in found if s is not None), key=lambda s: s.mtime)


def interrupted(folder: str, owned: Iterable[str]) -> list[SavedState]:
    """States no job of this server owns and that stopped before their last step."""
    mine = {os.path.abspath(p) for p in owned if p}
    return [s for s in scan(folder) if os.path.abspath(s.path) not in mine and s.step < s.steps]


def find_resumable(folder: str, file: str, sha256: list[str], config: dict, owned: Iterable[str]
                   ) -> SavedState | None:
    """The newest interrupted state of ``file`` made with these LoRAs and settings, if any."""
    want = canonical_config(config)
    hits = [s for s in interrupted(folder, owned)
            if s.file == file and list(s.sha256) == list(sha256) and s.config == want]
    return hits[-1] if hits else None


def clean_stale(folder: str, owned: Iterable[str], now: float | None = None,
                max_age_days: float = MAX_AGE_DAYS) -> list[str]:
    """Delete what the policy above says is stale; returns the deleted file names."""
    if not os.path.isdir(folder):
        return []
    mine = {os.path.abspath(p) for p in owned if p}
    limit = (time.time() if now is None else now) - max_age_days * 86400
    gone = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.abspath(path) in mine or not os.path.isfile(path) or os.path.islink(path):
            continue
        state = read_state(path) if name.endswith(SUFFIX) else None
        if os.path.getmtime(path) < limit or (state is not None and state.step >= state.steps):
            try:
                os.unlink(path)
                gone.append(name)
            except OSError as exc:
                log.warning("MoLE: could not delete the stale training state %s: %s", name, exc)
    if gone:
        log.info("MoLE: deleted %d stale training state(s): %s", len(gone), ", ".join(gone))
    return gone
