"""A headless ComfyUI server (``main.py --cpu``) for the end-to-end tests, driven over HTTP."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

# the smallest valid prompt (a prompt needs an output node): Server.free waits on it
FLUSH = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}},
         "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "flush/latent"}}}


def install_loras(base: Path, files: dict, names: tuple[str, ...] = ("a", "b")) -> Path:
    """Copy the fixture LoRAs ``names`` into the server's ``models/loras`` as ``<name>.safetensors``."""
    loras = base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(files[name], loras / f"{name}.safetensors")
    return loras


def prepare_base(base: Path, repo: Path, pack: Path) -> None:
    """``custom_nodes/`` with this repository (symlink, as users install it) and the test-only pack."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "comfyui-mole").symlink_to(repo, target_is_directory=True)
    shutil.copytree(pack, base / "custom_nodes" / "mole_testing_pack", ignore=shutil.ignore_patterns("__pycache__"))


class Server:
    """``python main.py --cpu --base-directory <base>`` on a free port; :meth:`stop` sends SIGINT."""

    def __init__(self, comfyui: Path, base: Path, log: Path):
        self.comfyui, self.base, self.log = comfyui, base, log
        self._log_file = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.client_id = str(uuid.uuid4())
        self._start()

    def _start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:"]
        if importlib.util.find_spec("comfyui_frontend_package") is None:
            (self.base / "frontend").mkdir(exist_ok=True)
            cmd += ["--front-end-root", str(self.base / "frontend")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def restart(self) -> None:
        """A fresh server on the same folders (and a new port), ready: the one way to get back the memory a real-size
        model leaves in the server's heap. ``/free`` unloads it, but the process keeps most pages (an SDXL: 12 GB,
        which the next real-size test in the test process would need)."""
        self.free()  # stopped while still holding a real-size model, the server aborted on exit
        self._stop_process()
        self._start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 150.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if self.get("/system_stats") is not None:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not start in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, prompt: dict) -> tuple[int, dict]:
        data = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def free(self) -> None:
        """Drop the cached node outputs and unload the models (``POST /free``); returns once that is done.

        The prompt worker acts on the request at the end of the loop turn it is in, so it has by the time a second
        trivial prompt has run. Stopped while still freeing a real-size model, the server aborted on exit
        (``terminate called without an active exception``).
        """
        data = json.dumps({"unload_models": True, "free_memory": True}).encode()
        req = urllib.request.Request(self.url + "/free", data=data, headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()
        for _ in range(2):
            entry = self.run(FLUSH)
            assert entry["status"]["status_str"] == "success", entry["status"]

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """Queue a prompt and wait for its /history entry."""
        status, body = self.post(prompt)
        assert status == 200, body
        pid, end = body["prompt_id"], time.time() + timeout
        while time.time() < end:
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish:\n{self.tail()}")

    def stop(self) -> None:
        self._stop_process()
        self._log_file.close()

    def _stop_process(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
