"""Gate-training jobs of the server: one background worker, its events on the websocket, job control.

A job is a :class:`TrainingSpec` (everything prepared in the prompt thread: a private model copy,
encoded references, normal-mode expert tensors) run by :class:`_Runner` on the single worker thread of
:mod:`train.worker`; other jobs wait in its queue. Events go to every browser tab through
``PromptServer.send_sync``: ``mole.progress`` once per step and ``mole.job`` on queued / started / done /
failed / cancelled.

Files. Checkpoints live in ``models/mole_gates/.checkpoints/<name>.<job>.mole-state`` (not a
``.safetensors`` name, so MoLE Load Gates never lists them). The finished gate file is first written
there (atomically), then renamed into ``models/mole_gates/<name>.safetensors`` unless the job was
cancelled meanwhile, so a cancel never leaves a partial or unwanted file; then the checkpoint is deleted.
A server restart keeps the checkpoints of unfinished jobs: :mod:`.saved_states` lists them as
``interrupted`` jobs and MoLE Train Gates continues one when queued again with the same name, LoRAs and
settings.

Model copies. A running or queued job owns its copy on the load device. A done job drops it; a
cancelled or failed job keeps it on the offload device so it can be resumed, for the
:data:`MAX_PARKED` most recent such jobs (older ones are released and cannot be resumed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management as mm
import folder_paths
import torch
from torch import nn

import mole_core
from mole_core.gate_file import GateFile

from ..train.compose import ComposePrompts
from ..train.config import TrainConfig
from ..train.data import CachedSet, Reference
from ..train.engine import TrainResult, gate_statistics, train
from ..train.worker import Job, JobContext, Worker
from . import saved_states
from .comfy_backend import ComfyBackend, PromptTable, own_weights
from .comfy_text import PrivateTextEncoder
from .common import GATES_FOLDER

log = logging.getLogger(__name__)

MAX_PARKED = 2
STATS_FRACTIONS = (0.9, 0.7, 0.5, 0.3, 0.1)  # bucket 0 = the noisiest, as everywhere
_lock = threading.Lock()
_worker: Worker | None = None
_parked: list[TrainingSpec] = []


@dataclass(repr=False)
class TrainingSpec:
    """One training run, prepared in the prompt thread (tensors are normal-mode clones)."""

    file: str                      # gate file name relative to models/mole_gates (``x.safetensors``)
    path: str                      # its absolute path
    checkpoint: str                # resumable state
    cfg: TrainConfig
    experts: list[mole_core.Expert]
    refs: list[Reference]
    cache: CachedSet | None        # encoded references on the load device; None once released
    model: Any                     # the private BaseModel copy; None once released
    load_device: torch.device
    offload_device: torch.device
    vae_model: nn.Module | None = None
    vae_scale_factor: int = 8
    clip_guide: tuple[str, str] | None = None  # (open_clip .safetensors path, architecture)
    compose_prompts: ComposePrompts | None = None  # objective compose: what the rollouts sample
    prompt_table: PromptTable | None = None  # objective compose: every prompt encoded, on the load device
    text_encoder: PrivateTextEncoder | None = None  # train_text_gates: the CLIP's private copy the job encodes with
    node: str | None = None
    mode: str = "background"
    resume_from: str | None = None  # a checkpoint of an earlier server run this job continues
    shares_weights: bool = False  # the model copy uses the shared model's weights (wait mode) until it is parked
    result: TrainResult | None = None
    finish_early: bool = False
    expert_names: list[str] = field(init=False)
    _guide: Any = field(default=None)

    def __post_init__(self) -> None:
        self.expert_names = [e.name for e in self.experts]

    def __repr__(self) -> str:
        return f"TrainingSpec({self.file}, {self.cfg.steps} steps, {len(self.experts)} experts)"

    def public(self) -> dict:
        """What the browser needs besides the worker's job state."""
        return {"node": self.node, "file": self.file, "mode": self.mode, "steps": self.cfg.steps,
                "experts": self.expert_names, "resumable": self.model is not None}


# ----- the worker singleton and its events -----
def worker() -> Worker:
    """The server-wide worker (created on first use; one training job runs at a time)."""
    global _worker
    with _lock:
        if _worker is None:
            _worker = Worker(on_event=_forward, name="mole-train")
        return _worker


def spec_of(job: Job) -> TrainingSpec | None:
    return getattr(job.fn, "spec", None)


def jsonable(value: Any) -> Any:
    """Replace NaN/inf by None (browsers reject them in JSON) and tuples by lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def view(job: Job, history: bool = False) -> dict:
    """Job state for routes and events: the worker's view plus node id, file, experts, total steps."""
    spec = spec_of(job)
    out = {**job.public(history=history), **(spec.public() if spec else {})}
    if out.get("checkpoint"):  # the browser needs no server paths
        out["checkpoint"] = os.path.basename(out["checkpoint"])
    return jsonable(out)


def _forward(kind: str, payload: dict) -> None:
    job_id = payload.get("job") or payload.get("id")
    job = _find(job_id)
    if kind == "progress":
        spec = spec_of(job) if job else None
        extra = {"node": spec.node, "file": spec.file} if spec else {}
        send("mole.progress", jsonable({**payload, **extra}))
    else:
        send("mole.job", {"event": kind, **(view(job) if job else jsonable(payload))})


def _find(job_id: Any) -> Job | None:
    try:
        return _worker.get(str(job_id)) if _worker is not None else None
    except KeyError:
        return None


def send(event: str, data: dict) -> None:
    """Broadcast to every connected browser (no-op without a running PromptServer, e.g. in tests)."""
    server = sys.modules.get("server")  # imported by main.py; never import it ourselves
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.send_sync(event, data)


# ----- job control (routes call these; KeyError → 404, ValueError → 400) -----
def submit(spec: TrainingSpec) -> Job:
    """Queue a training job; returns at once."""
    name = spec.file.removesuffix(".safetensors")
    return worker().submit(name, _Runner(spec), checkpoint=spec.checkpoint)


def get(job_id: str) -> Job:
    return worker().get(job_id)


def checkpoint_folder() -> str:
    """``models/mole_gates/.checkpoints``: where every job's resumable state lives."""
    return os.path.join(folder_paths.get_folder_paths(GATES_FOLDER)[0], ".checkpoints")


def owned_states() -> list[str]:
    """Checkpoint paths of the jobs this server knows (queued, running, stopped or done)."""
    return [j.checkpoint for j in worker().jobs() if j.checkpoint]


def interrupted_jobs() -> list[saved_states.SavedState]:
    """Unfinished states of earlier server runs (stale ones are deleted first, see :mod:`.saved_states`)."""
    folder, owned = checkpoint_folder(), owned_states()
    saved_states.clean_stale(folder, owned)
    return saved_states.interrupted(folder, owned)


def list_jobs() -> list[dict]:
    """The jobs of this server, oldest first, then the interrupted jobs of earlier runs."""
    live = [view(j) for j in sorted(worker().jobs(), key=lambda j: j.created)]
    return live + [s.view() for s in interrupted_jobs()]


def _interrupted(job_id: str) -> saved_states.SavedState:
    """The interrupted job ``job_id`` (``saved-<key>``); KeyError when there is none."""
    for s in interrupted_jobs():
        if s.job_id == job_id:
            return s
    raise KeyError(job_id)


def state(job_id: str) -> dict:
    """One job with its loss/entropy history (for a panel that (re)attaches)."""
    if job_id.startswith(saved_states.PREFIX):
        return _interrupted(job_id).view()
    return view(get(job_id), history=True)


def cancel(job_id: str) -> dict:
    """Stop a queued or running job at its next step; its checkpoint is kept (resume continues it)."""
    job = get(job_id)
    if job.status not in ("queued", "running"):
        raise ValueError(f"job {job_id} is {job.status}; only queued or running jobs can be cancelled")
    worker().cancel(job_id)
    spec = spec_of(job)
    if job.status == "cancelled" and spec is not None:  # it was still queued: it never ran
        _park(spec)
    return view(job)


def finish(job_id: str) -> dict:
    """Stop a running job at its next step and save the gates as they are (done, not cancelled)."""
    job = get(job_id)
    spec = spec_of(job)
    if job.status != "running" or spec is None:
        raise ValueError(f"job {job_id} is {job.status}; only a running job can be stopped and saved")
    spec.finish_early = True
    worker().cancel(job_id)
    return view(job)


def resume(job_id: str) -> dict:
    """Queue a cancelled or failed job again from its last checkpoint."""
    if job_id.startswith(saved_states.PREFIX):
        raise ValueError(f"job {job_id} was interrupted by a server restart; its model copy is gone: "
                         + _interrupted(job_id).view()["resume"])
    job = get(job_id)
    spec = spec_of(job)
    if job.status not in ("cancelled", "failed"):
        raise ValueError(f"job {job_id} is {job.status}; only cancelled or failed jobs can be resumed")
    if spec is None or spec.model is None:
        raise ValueError(f"job {job_id} can no longer be resumed (its model copy was released; only the "
                         f"{MAX_PARKED} most recent stopped jobs keep theirs): queue MoLE Train Gates again")
    with _lock:
        if spec in _parked:
            _parked.remove(spec)
    spec.finish_early = False
    worker().resume(job_id)
    return view(job)


# ----- running a job (worker thread) -----
class _Runner:
    """The job function: trains on the private copy, then publishes the gate file."""

    def __init__(self, spec: TrainingSpec):
        self.spec = spec

    def __call__(self, ctx: JobContext) -> dict:
        spec = self.spec
        if spec.model is None:
            raise mole_core.MoleError("the model copy of this job was released")
        done = False
        try:
            spec.model.to(spec.load_device)
            if spec.text_encoder is not None:
                spec.text_encoder.to(spec.text_encoder.load_device)
            backend = ComfyBackend(spec.model, spec.vae_model, spec.vae_scale_factor, spec.prompt_table,
                                   spec.text_encoder, spec.cfg.resolution)
            resume_from = ctx.resume_from or spec.resume_from
            resume_from = resume_from if resume_from and os.path.isfile(resume_from) else None
            progress = _progress_after_resume(ctx) if resume_from else ctx.progress
            result = train(spec.cfg, backend, spec.experts, spec.refs, progress=progress,
                           should_stop=ctx.should_stop, checkpoint_path=spec.checkpoint, resume_from=resume_from,
                           clip_guide=self._guide(backend), cache=spec.cache, compose_prompts=spec.compose_prompts)
            spec.result = result
            if result.cancelled and not spec.finish_early:
                return _summary(spec, result, saved=False)
            gates = self._with_statistics(backend, result.gates)
            spec.result = dataclasses.replace(result, gates=gates)
            if not publish(gates, spec, should_stop=lambda: ctx.should_stop() and not spec.finish_early):
                return _summary(spec, result, saved=False)
            ctx.job.stop.clear()  # the file is complete: a stop request that raced the save changes nothing
            done = True
            return _summary(spec, result, saved=True)
        finally:
            if done:
                _release(spec)
                _delete(spec.checkpoint)  # the gate file is in place: the state is no longer needed
            else:
                _park(spec)

    def _guide(self, backend: ComfyBackend) -> Any:
        spec = self.spec
        if not {"clip", "compose"} & set(spec.cfg.objectives) or spec.clip_guide is None:
            return None
        if spec._guide is None:
            from ..train.evaluate import load_clip

            spec._guide = load_clip(spec.clip_guide[0], spec.clip_guide[1], str(backend.device),
                                    names=("`clip_guide`", "`clip_guide_arch`"))
        return spec._guide

    def _with_statistics(self, backend: ComfyBackend, gates: GateFile) -> GateFile:
        """Add the trained gates' mean per block on the references at a few noise levels (``calibration``),
        so MoLE Visualize Gates shows them right away."""
        spec = self.spec
        stats = gate_statistics(backend, spec.experts, gates, spec.cache, fractions=STATS_FRACTIONS,
                                seed=spec.cfg.seed)
        last = len(backend.alphas_cumprod) - 1
        stats["bucket_labels"] = {str(b): f"t {round(f * last)}" for b, f in enumerate(STATS_FRACTIONS)}
        stats["recorded"] = f"on the {len(spec.cache)} references after training"
        return dataclasses.replace(gates, path=spec.path, info={**gates.info, "calibration": stats})


def _progress_after_resume(ctx: JobContext):  # noqa: ANN202
    """Progress callback that first drops history entries the resumed run will report again."""
    first = [True]

    def progress(info: dict) -> None:
        if first[0] and "step" in info:  # (a search's phase records carry no step)
            first[0] = False
            ctx.job.history = [h for h in ctx.job.history if h.get("step", 0) < info.get("step", 0)]
        ctx.progress(info)
    return progress


def publish(gates: GateFile, spec: TrainingSpec, should_stop: Any = None) -> bool:
    """Write the gate file next to the checkpoint, then rename it into place unless ``should_stop()``
    says the job was cancelled meanwhile. Returns whether the file was published."""
    staging = spec.checkpoint + ".gates"
    mole_core.write_gate_file(gates, staging)
    try:
        if should_stop is not None and should_stop():
            return False
        os.makedirs(os.path.dirname(spec.path), exist_ok=True)
        os.replace(staging, spec.path)
        return True
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def _delete(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("MoLE: could not delete the finished job's checkpoint %s: %s", os.path.basename(path), exc)


def _summary(spec: TrainingSpec, result: TrainResult, saved: bool) -> dict:
    return jsonable({"file": spec.file if saved else None, "steps_done": result.steps_done,
                     "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, list))}})


def _release(spec: TrainingSpec) -> None:
    """Drop everything heavy a finished (or no longer resumable) job holds; its state stays listed."""
    spec.model = spec.vae_model = spec._guide = spec.cache = spec.prompt_table = spec.text_encoder = None
    spec.experts, spec.refs = [], []
    mm.soft_empty_cache()


def _park(spec: TrainingSpec) -> None:
    """Keep a stopped job's copy (on the offload device) so it can be resumed; release the oldest. A copy on the
    shared model's weights first gets its own (other prompts may patch the shared ones once the node returns),
    or is released when memory is short for that (its checkpoint stays: running the node again continues it)."""
    if spec.model is None:
        return
    if spec.shares_weights:
        if not own_weights(spec.model, spec.offload_device):
            log.warning("MoLE: %s stopped; no memory to keep its model copy for a resume (run the node again to "
                        "continue from its checkpoint)", spec.file)
            _release(spec)
            return
        spec.shares_weights = False
    spec.model.to(spec.offload_device)
    if spec.text_encoder is not None:
        spec.text_encoder.to(spec.text_encoder.offload_device)
    with _lock:
        if spec not in _parked:
            _parked.append(spec)
        old = _parked[:-MAX_PARKED]
        del _parked[:-MAX_PARKED]
    for s in old:
        _release(s)
    mm.soft_empty_cache()
