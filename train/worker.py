"""Background job runner: one worker thread, a queue, status, events, cancel and resume.

Independent of ComfyUI: the nodes forward events to the websocket, the CLI to tqdm.
A job is a function ``fn(ctx: JobContext) -> object``; it reports progress through
``ctx.progress(dict)``, polls ``ctx.should_stop()`` once per step, and resumes from
``ctx.resume_from`` (a checkpoint path) when the job is resumed.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
EventFn = Callable[[str, dict], None]


@dataclass
class Job:
    """A unit of background work and its observable state."""

    id: str
    name: str
    fn: Callable[[JobContext], Any]
    checkpoint: str | None = None
    status: str = "queued"
    progress: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    error: str | None = None
    result: Any = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    resume_from: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    # +1 on every change of state or progress: a client that gets an HTTP reply and events out of order
    # keeps the newest view (a cancel reply saying "running" must not undo the "cancelled" event before it)
    revision: int = 0

    def touch(self) -> int:
        self.revision += 1
        return self.revision

    def public(self, history: bool = False) -> dict:
        """JSON-able view (what routes and events send)."""
        out = {"id": self.id, "name": self.name, "status": self.status, "revision": self.revision,
               "progress": self.progress,
               "error": self.error, "checkpoint": self.checkpoint, "created": self.created,
               "started": self.started, "finished": self.finished,
               "result": self.result if isinstance(self.result, (str, int, float, dict, list)) else None}
        if history:
            out["history"] = self.history
        return out


class JobContext:
    """Handed to a job function: progress, cancel polling and resume point."""

    def __init__(self, worker: Worker, job: Job):
        self._worker, self.job = worker, job

    @property
    def resume_from(self) -> str | None:
        return self.job.resume_from

    def should_stop(self) -> bool:
        return self.job.stop.is_set()

    def progress(self, info: dict) -> None:
        self.job.progress = info
        keep = {k: v for k, v in info.items() if k in ("step", "loss", "terms", "gate_entropy", "mean_gates",
                                                       "mean_gate_entropy", "lr")}
        if "step" in info:  # phase records (the block search) are progress, not training history
            self.job.history.append(keep)
        self._worker.emit("progress", {"job": self.job.id, "name": self.job.name, "revision": self.job.touch(), **info})


class Worker:
    """Runs jobs one at a time on a daemon thread; other jobs wait in the queue."""

    def __init__(self, on_event: EventFn | None = None, name: str = "mole-worker"):
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._listeners: list[EventFn] = [on_event] if on_event else []
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ----- events -----
    def subscribe(self, fn: EventFn) -> None:
        self._listeners.append(fn)

    def emit(self, kind: str, payload: dict) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind, payload)
            except Exception:  # a broken listener must not kill training
                log.exception("MoLE worker: event listener failed")

    # ----- API -----
    def submit(self, name: str, fn: Callable[[JobContext], Any], checkpoint: str | None = None) -> Job:
        """Queue a job; returns at once."""
        job = Job(id=f"{int(time.time())}-{next(self._ids)}", name=name, fn=fn, checkpoint=checkpoint)
        with self._lock:
            self._jobs[job.id] = job
        self._publish(job, "queued")  # before the worker thread can see it: "started" must come after
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise KeyError(f"no job {job_id!r}")
            return self._jobs[job_id]

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop at its next step (a queued job is dropped)."""
        job = self.get(job_id)
        job.stop.set()
        if job.status == "queued":
            self._finish(job, "cancelled")
        return job

    def resume(self, job_id: str) -> Job:
        """Requeue a cancelled or failed job from its last checkpoint (from scratch if none was written)."""
        job = self.get(job_id)
        if job.status not in ("cancelled", "failed"):
            raise ValueError(f"job {job_id!r} is {job.status}; only cancelled or failed jobs can be resumed")
        job.resume_from = job.checkpoint if job.checkpoint and os.path.exists(job.checkpoint) else None
        job.stop = threading.Event()
        job.status, job.error, job.finished = "queued", None, None
        self._publish(job, "queued")  # before the worker thread can see it: "started" must come after
        self._queue.put(job)
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job leaves queued/running (or the timeout passes)."""
        end = None if timeout is None else time.time() + timeout
        job = self.get(job_id)
        while job.status in ("queued", "running"):
            if end is not None and time.time() > end:
                break
            time.sleep(0.02)
        return job

    def _publish(self, job: Job, event: str) -> None:
        """Every change of a job's state goes out through here: new revision, then the event."""
        job.touch()
        self.emit(event, job.public())

    # ----- thread -----
    def _finish(self, job: Job, status: str) -> None:
        job.status, job.finished = status, time.time()
        self._publish(job, status)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job.status != "queued":
                continue
            job.status, job.started = "running", time.time()
            self._publish(job, "started")
            try:
                job.result = job.fn(JobContext(self, job))
                self._finish(job, "cancelled" if job.stop.is_set() else "done")
            except Exception as exc:
                job.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log.error("MoLE job %s failed: %s\n%s", job.name, job.error, traceback.format_exc())
                self._finish(job, "failed")
