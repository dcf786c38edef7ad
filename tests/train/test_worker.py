"""Background worker: queue, one job at a time, events, cancel, resume, failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import mole_core as mole
from train.config import TrainConfig
from train.data import scan_folder
from train.engine import train
from train.worker import Worker


def _counting_job(steps: int, delay: float = 0.01, started: threading.Event | None = None):
    """Counts to ``steps``; on stop writes its position to ``ctx.job.checkpoint`` (a file)."""
    def fn(ctx):
        start = int(Path(ctx.resume_from).read_text()) if ctx.resume_from else 0
        for i in range(start, steps):
            if started is not None:
                started.set()
            if ctx.should_stop():
                if ctx.job.checkpoint:
                    Path(ctx.job.checkpoint).write_text(str(i))
                return i
            ctx.progress({"step": i + 1, "loss": 1.0 / (i + 1)})
            time.sleep(delay)
        return steps
    return fn


def test_jobs_queue_and_run_one_at_a_time():
    events = []
    w = Worker(on_event=lambda kind, p: events.append((kind, p.get("id") or p.get("job"))))
    a = w.submit("a", _counting_job(5))
    b = w.submit("b", _counting_job(3))
    assert w.wait(b.id, timeout=10).status == "done"
    assert a.status == "done" and a.result == 5 and b.result == 3
    assert a.finished <= b.started  # b waited for a
    kinds = [k for k, j in events if j == a.id]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done" and kinds.count("progress") == 5
    assert [h["step"] for h in a.history] == [1, 2, 3, 4, 5]
    assert a.public()["status"] == "done"


def test_revision_orders_every_view_of_a_job(tmp_path):
    """Each event carries a higher revision than the one before; the reply to cancel (a view taken while
    the job still runs) is older than the "cancelled" event, so a client keeping the newest view ends cancelled."""
    events = []
    started, replied = threading.Event(), threading.Event()

    def job_fn(ctx):
        for i in range(3):
            ctx.progress({"step": i + 1})
        started.set()
        while not (ctx.resume_from or replied.is_set()):  # stop only once the cancel reply was taken
            time.sleep(0.005)
        return "stopped" if ctx.should_stop() else "done"

    w = Worker(on_event=lambda kind, p: events.append((kind, p["revision"], p.get("status"))))
    job = w.submit("long", job_fn, checkpoint=str(tmp_path / "ck"))
    assert started.wait(5)
    reply = w.cancel(job.id).public()
    replied.set()
    assert w.wait(job.id, timeout=10).status == "cancelled"
    w.resume(job.id)
    assert w.wait(job.id, timeout=20).status == "done"
    revisions = [r for _, r, _ in events]
    assert revisions == sorted(set(revisions)) and revisions[0] == 1  # strictly increasing
    cancelled = next(r for kind, r, _ in events if kind == "cancelled")
    assert reply["status"] == "running" and reply["revision"] < cancelled
    newest = max([(reply["revision"], reply["status"])] + [(r, st) for kind, r, st in events
                                                            if kind != "progress" and r <= cancelled])
    assert newest == (cancelled, "cancelled")
    assert job.public()["revision"] == revisions[-1]


def test_cancel_then_resume_continues_from_checkpoint(tmp_path):
    started = threading.Event()
    w = Worker()
    job = w.submit("long", _counting_job(200, delay=0.01, started=started), checkpoint=str(tmp_path / "ck"))
    assert started.wait(5)
    w.cancel(job.id)
    assert w.wait(job.id, timeout=10).status == "cancelled"
    stopped_at = job.result
    assert 0 <= stopped_at < 200 and (tmp_path / "ck").read_text() == str(stopped_at)
    w.resume(job.id)
    assert job.resume_from == str(tmp_path / "ck")
    assert w.wait(job.id, timeout=20).status == "done" and job.result == 200
    steps = [h["step"] for h in job.history]
    assert steps == list(range(1, 201))  # resumed where it stopped: no step twice, none missing


def test_resume_without_checkpoint_file_starts_fresh(tmp_path):
    w = Worker()
    job = w.submit("x", _counting_job(3), checkpoint=str(tmp_path / "never-written"))
    w.wait(job.id, timeout=10)
    job.status = "failed"  # pretend it failed before writing a checkpoint
    w.resume(job.id)
    assert job.resume_from is None
    assert w.wait(job.id, timeout=10).status == "done"


def test_failing_job_reports_error_and_worker_keeps_going():
    w = Worker()

    def boom(ctx):
        raise mole.MoleError("bad input: x.safetensors")

    bad = w.submit("bad", boom)
    good = w.submit("good", _counting_job(2))
    assert w.wait(good.id, timeout=10).status == "done"
    assert bad.status == "failed" and bad.error == "MoleError: bad input: x.safetensors"
    with pytest.raises(ValueError, match="only cancelled or failed"):
        w.resume(good.id)
    with pytest.raises(KeyError):
        w.get("missing")


def test_cancelling_a_queued_job_drops_it():
    w = Worker()
    first = w.submit("first", _counting_job(30, delay=0.01))
    queued = w.submit("queued", _counting_job(3))
    w.cancel(queued.id)
    assert queued.status == "cancelled"
    assert w.wait(first.id, timeout=10).status == "done"
    time.sleep(0.05)
    assert queued.status == "cancelled" and queued.result is None


def test_real_training_job_cancel_and_resume(backend, lora_set, refs_dir, tmp_path):
    experts = mole.load_experts(lora_set.paths)
    cfg = TrainConfig(steps=5, resolution=64, batch_size=2, lr=2e-2, checkpoint_every=1, seed=1)
    ckpt = str(tmp_path / "state.safetensors")
    refs = scan_folder(refs_dir)
    reference = train(cfg, backend, experts, refs)
    w = Worker()

    def job(ctx):
        def progress(p):
            ctx.progress(p)
            if p["step"] == 2 and ctx.resume_from is None:
                w.cancel(ctx.job.id)
        return train(cfg, backend, experts, refs, progress=progress, should_stop=ctx.should_stop,
                     checkpoint_path=ckpt, resume_from=ctx.resume_from)

    handle = w.submit("train", job, checkpoint=ckpt)
    assert w.wait(handle.id, timeout=300).status == "cancelled" and handle.result.steps_done == 2
    w.resume(handle.id)
    assert w.wait(handle.id, timeout=300).status == "done" and handle.result.steps_done == 5
    for k, v in reference.gates.tensors.items():
        assert (v == handle.result.gates.tensors[k]).all(), k
