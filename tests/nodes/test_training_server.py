"""MoLE Train Gates on a headless ComfyUI server: a background job beside a sampling prompt on the same
model, websocket events, HTTP latency while training, cancel/resume through the routes, ComfyUI's Cancel in
wait mode, two queued jobs, the example graphs on the trained file, and bad inputs."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.nodes._server import install_loras
from tests.ui import example_graphs as eg

pytestmark = [pytest.mark.slow, pytest.mark.comfy]
TRAIN = "6"  # node id of MoLE Train Gates in the example graph


class Events:
    """``mole.*`` websocket messages of the server, collected on a thread."""

    def __init__(self, url: str, client_id: str):
        self.messages: list[dict] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}-events"
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        assert self.connected.wait(20), "websocket did not connect"

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self._url) as ws:
            self.connected.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.3)
                except asyncio.TimeoutError:
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if str(data.get("type", "")).startswith("mole."):
                    self.messages.append(data)

    def of(self, kind: str, job: str) -> list[dict]:
        key = "job" if kind == "mole.progress" else "id"
        return [m["data"] for m in self.messages if m["type"] == kind and m["data"].get(key) == job]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def call(srv, method: str, path: str) -> tuple[int, dict, float]:
    """``(status, JSON body, seconds)`` of one request."""
    req = urllib.request.Request(srv.url + path, method=method, data=b"" if method == "POST" else None)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - t0


def job_state(srv, job_id: str) -> dict:
    status, body, _ = call(srv, "GET", f"/mole/jobs/{job_id}")
    assert status == 200, body
    return body


def wait_status(srv, job_id: str, statuses: tuple[str, ...], timeout: float = 240.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        state = job_state(srv, job_id)
        if state["status"] in statuses:
            return state
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never reached {statuses}: {state['status']}\n{srv.tail()}")


def train_graph(name: str, run: str = "background", steps: int = 30, count: int = 2, **inputs) -> dict:
    g = eg.tiny(eg.train_gates(), steps=steps)
    g[TRAIN]["inputs"].update(name=name, run=run, **inputs)
    for image in ("3", "4"):
        g[image]["inputs"]["count"] = count
    del g["7"], g["8"]  # heatmap and curves: not needed here
    return g


def sampling_graph() -> dict:
    """Plain sampling of the tiny model (the same model the job trains on)."""
    return {"1": {"class_type": "MoLETestTinyModel", "inputs": {"seed": 0}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 0,
                "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "mole_test/base"}}}


def start(srv, graph: dict) -> str:
    """Run a background-training prompt; returns the job id from the node's ui output."""
    entry = srv.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry["outputs"][TRAIN]["mole_job"][0]["id"]


def node_error(srv, graph: dict) -> dict:
    entry = srv.run(graph)
    assert entry["status"]["status_str"] == "error", entry["status"]
    return next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")


@pytest.fixture(scope="module")
def server(comfy_server, files):
    srv, base = comfy_server
    install_loras(base, files)
    srv.wait_ready()
    return srv, base


def test_background_job_beside_sampling_events_latency_cancel_resume(server):
    srv, base = server
    events = Events(srv.url, srv.client_id)
    try:
        t0 = time.perf_counter()
        job = start(srv, train_graph("srv/bg", steps=30))
        returned = time.perf_counter() - t0
        wait_status(srv, job, ("running",))
        sampled = srv.run(sampling_graph())  # a second prompt samples the same model meanwhile
        assert sampled["status"]["status_str"] == "success"
        assert job_state(srv, job)["status"] == "running"
        latencies = {"/system_stats": [], f"/mole/jobs/{job}": [], "/mole/jobs": []}
        for _ in range(15):
            for path in latencies:
                status, _, seconds = call(srv, "GET", path)
                assert status == 200
                latencies[path].append(seconds)
            time.sleep(0.1)
        state = job_state(srv, job)
        assert state["status"] == "running", "the job should still be training while latency is measured"
        t_cancel = time.perf_counter()
        status, body, _ = call(srv, "POST", f"/mole/jobs/{job}/cancel")
        assert status == 200 and body["id"] == job
        cancelled = wait_status(srv, job, ("cancelled",))
        cancel_s = time.perf_counter() - t_cancel
        step = cancelled["progress"]["step"]
        assert 0 < step < 30 and (base / "models" / "mole_gates" / ".checkpoints").is_dir()
        assert not (base / "models" / "mole_gates" / "srv" / "bg.safetensors").exists()
        status, body, _ = call(srv, "POST", f"/mole/jobs/{job}/resume")
        assert status == 200 and body["status"] in ("queued", "running")
        done = wait_status(srv, job, ("done", "failed"))
        assert done["status"] == "done", done["error"]
        assert [h["step"] for h in done["history"]] == list(range(1, 31))
        time.sleep(0.5)
        progress = events.of("mole.progress", job)
        kinds = [m["event"] for m in events.of("mole.job", job)]
    finally:
        events.close()
    stats = {p: f"median {statistics.median(v) * 1000:.0f} ms, max {max(v) * 1000:.0f} ms"
             for p, v in latencies.items()}
    print(f"\nprompt with the background node done in {returned:.2f} s; HTTP while training: {stats}; "
          f"cancel → stopped in {cancel_s:.2f} s at step {step}; {len(progress)} progress events")
    assert all(max(v) < 1.0 for v in latencies.values()), stats
    assert len(progress) >= 30 and {"step", "steps", "loss", "terms", "gate_entropy", "mean_gates", "eta_s",
                                    "node", "file"} <= set(progress[-1])
    assert progress[-1]["node"] == TRAIN and progress[-1]["file"] == "srv/bg.safetensors"
    assert kinds[:2] == ["queued", "started"] and "cancelled" in kinds and kinds[-1] == "done"
    assert (base / "models" / "mole_gates" / "srv" / "bg.safetensors").is_file()


@pytest.mark.parametrize("example, check", [
    (eg.sample_with_gates, "20"), (eg.mole_vs_nla, "14"), (eg.bake, "20")])
def test_example_graphs_run_on_the_trained_file(server, example, check):
    srv, base = server
    if not (base / "models" / "mole_gates" / "srv" / "bg.safetensors").is_file():
        pytest.skip("needs the gate file of the background-training test")
    entry = srv.run(eg.tiny(example(), gates="srv/bg.safetensors"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"][check]


def test_two_jobs_queue_and_run_one_at_a_time(server):
    srv, _ = server
    first = start(srv, train_graph("srv/q1", steps=6))
    second = start(srv, train_graph("srv/q2", steps=6, seed=1))
    listed = {j["id"]: j["status"] for j in call(srv, "GET", "/mole/jobs")[1]["jobs"]}
    assert listed[first] in ("queued", "running", "done") and listed[second] in ("queued", "running")
    a, b = wait_status(srv, first, ("done",)), wait_status(srv, second, ("done",))
    assert a["finished"] <= b["started"]


def test_wait_mode_comfyui_cancel_stops_within_a_step_and_keeps_the_checkpoint(server):
    srv, base = server
    status, body = srv.post(train_graph("srv/wait", run="wait", steps=400))
    assert status == 200, body
    end = time.time() + 240
    job = None
    while time.time() < end:
        running = [j for j in call(srv, "GET", "/mole/jobs")[1]["jobs"]
                   if j["file"] == "srv/wait.safetensors" and j["status"] == "running"]
        if running and running[-1]["progress"].get("step", 0) >= 2:
            job = running[-1]
            break
        time.sleep(0.1)
    assert job is not None, srv.tail()
    step_s = job["progress"]["elapsed_s"] / job["progress"]["step"]
    t0 = time.perf_counter()
    urllib.request.urlopen(urllib.request.Request(srv.url + "/interrupt", data=b"", method="POST"), timeout=30)
    state = wait_status(srv, job["id"], ("cancelled",))
    latency = time.perf_counter() - t0
    history, end = {}, time.time() + 60
    while not history and time.time() < end:  # the prompt ends once the node has seen the job stop
        time.sleep(0.2)
        history = srv.get(f"/history/{body['prompt_id']}")
    messages = [kind for kind, _ in history[body["prompt_id"]]["status"]["messages"]]
    print(f"\nwait mode: ComfyUI Cancel → job stopped in {latency:.2f} s (one step ≈ {step_s:.2f} s) at step "
          f"{state['progress']['step']}")
    assert "execution_interrupted" in messages
    assert latency < 2 * step_s + 1.5 and state["checkpoint"] and state["resumable"]
    assert not (base / "models" / "mole_gates" / "srv" / "wait.safetensors").exists()


def test_bad_inputs_are_clear_errors_and_the_server_keeps_serving(server):
    srv, base = server
    err = node_error(srv, train_graph("srv/bad", count=0))
    assert err["node_id"] == TRAIN and "the reference image batch is empty" in err["exception_message"]
    err = node_error(srv, train_graph("srv/bad", prompts="one\ntwo\nthree"))
    assert "got 3 prompts for 4 images" in err["exception_message"]
    status, body = srv.post(train_graph("srv/bad", steps=0))
    assert status == 400 and body["node_errors"][TRAIN]["errors"][0]["type"] == "value_smaller_than_min"
    status, body = srv.post(train_graph("../escape"))
    assert status == 400 and "no '..'" in body["node_errors"][TRAIN]["errors"][0]["details"]
    assert call(srv, "POST", "/mole/jobs/no-such-job/resume")[:2] == (404, {"error": "no job 'no-such-job'"})
    assert call(srv, "GET", "/mole/jobs/no-such-job")[0] == 404
    assert call(srv, "POST", "/mole/jobs/bad%20id/cancel")[0] == 400
    done = next(j for j in call(srv, "GET", "/mole/jobs")[1]["jobs"] if j["status"] == "done")
    status, body, _ = call(srv, "POST", f"/mole/jobs/{done['id']}/cancel")
    assert status == 400 and "only queued or running jobs" in body["error"]
    assert srv.get("/system_stats")["system"]
    assert not any(p.name == "escape.safetensors" for p in base.rglob("*.safetensors"))


def test_failing_job_reports_its_error_and_the_server_keeps_serving(server):
    srv, base = server
    clip_dir = base / "models" / "mole_clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    (clip_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    events = Events(srv.url, srv.client_id)
    try:
        job = start(srv, train_graph("srv/fail", objective="denoise + clip", clip_guide="broken.safetensors"))
        state = wait_status(srv, job, ("failed", "done"))
        time.sleep(0.5)
        failed = [m for m in events.of("mole.job", job) if m["event"] == "failed"]
    finally:
        events.close()
    assert state["status"] == "failed" and "broken.safetensors" in state["error"]
    assert failed and failed[0]["error"] == state["error"]
    assert srv.run(sampling_graph())["status"]["status_str"] == "success"


def test_a_job_interrupted_by_a_server_restart_is_listed_and_continued_by_queuing_it_again(files, tmp_path):
    """Its own server (the shared one keeps running): train, cancel, stop the server, start a new one on the
    same folder, and queue the same graph again."""
    from tests.nodes._server import Server, prepare_base
    from tests.nodes.conftest import COMFYUI, REPO

    base = tmp_path / "base"
    prepare_base(base, REPO, REPO / "tests" / "nodes" / "testing_pack")
    install_loras(base, files)
    graph = train_graph("restart/r", steps=30)
    first = Server(COMFYUI, base, tmp_path / "first.log")
    try:
        first.wait_ready()
        job = start(first, graph)
        end = time.time() + 120
        while job_state(first, job)["progress"].get("step", 0) < 3 and time.time() < end:
            time.sleep(0.1)
        call(first, "POST", f"/mole/jobs/{job}/cancel")
        step = wait_status(first, job, ("cancelled",))["progress"]["step"]
    finally:
        first.stop()
    second = Server(COMFYUI, base, tmp_path / "second.log")
    try:
        second.wait_ready()
        listed = [j for j in call(second, "GET", "/mole/jobs")[1]["jobs"] if j["file"] == "restart/r.safetensors"]
        assert [(j["status"], j["progress"]["step"]) for j in listed] == [("interrupted", step)], listed
        status, body, _ = call(second, "POST", f"/mole/jobs/{listed[0]['id']}/resume")
        assert status == 400 and "queue MoLE Train Gates again" in body["error"]
        again = start(second, graph)
        done = wait_status(second, again, ("done", "failed"))
        assert done["status"] == "done", done["error"]
        assert [h["step"] for h in done["history"]] == list(range(step + 1, 31))
        assert not [j for j in call(second, "GET", "/mole/jobs")[1]["jobs"] if j["status"] == "interrupted"]
        assert (base / "models" / "mole_gates" / "restart" / "r.safetensors").is_file()
        assert not list((base / "models" / "mole_gates" / ".checkpoints").glob("restart__r.*"))
    finally:
        second.stop()
