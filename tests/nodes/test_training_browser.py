"""Real browser (headless Debian chromium + comfyui-frontend-package) against the headless server:
every example workflow loads, the training workflow runs on the tiny model, the live panel and the
gate heatmap render, and the panel reattaches to a running job after a page reload.

Screenshots land in ``tests/ui/artifacts/`` (git-ignored). Needs ``node``, ``/usr/bin/chromium``
(``apt-get install chromium``) and ``npm install`` in ``tests/ui``; skipped with one line otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.nodes._server import install_loras
from tests.nodes.conftest import REPO
from tests.ui.example_graphs import EXAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.comfy]
UI = REPO / "tests" / "ui"
ARTIFACTS = UI / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")


def missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not CHROMIUM.is_file():
        return "chromium is not installed (apt-get install -y chromium)"
    if not (UI / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (cd tests/ui && npm install)"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "comfyui-frontend-package is not installed"
    return None


@pytest.fixture(scope="module")
def results(comfy_server, files) -> dict:
    reason = missing()
    if reason:
        pytest.skip(f"browser check skipped: {reason}")
    srv, base = comfy_server
    install_loras(base, files)
    srv.wait_ready()
    workflows = {name: json.loads((REPO / "workflows" / f"{name}.json").read_text()) for name in EXAMPLES}
    trainer = {"MoLE_LoadExperts": {"lora_1": "a.safetensors", "lora_2": "b.safetensors"},
               "MoLE_TrainGates": {"steps": 4, "resolution": 64, "batch_size": 2, "run": "wait",
                                   "name": "browser/tiny"}}
    spec = {
        "workflows": workflows,
        "train": {"workflow": workflows["mole_train_gates"], "widgets": trainer,
                  "replace": {"CheckpointLoaderSimple": {"type": "MoLETestTinyModel", "widgets": {}},
                              "LoadImage": {"type": "MoLETestBlobs", "widgets": {"count": 2, "size": 64}}}},
        "reattach": {"widgets": {"MoLE_TrainGates": {"steps": 2000, "run": "background",
                                                     "name": "browser/reattach"}}},
    }
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    (ARTIFACTS / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(["node", "browser.mjs", "check", srv.url, str(ARTIFACTS / "spec.json"), str(ARTIFACTS)],
                          cwd=UI, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{srv.tail()}"
    out = json.loads((ARTIFACTS / "results.json").read_text())
    print(f"\nbrowser: tiny training workflow ran in {out['trainSeconds']:.1f} s; screenshots in {ARTIFACTS}")
    return out


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_each_example_workflow_loads_without_errors(results, name):
    r = results["workflows"][name]
    assert r["nodes"] == r["expected"] and r["links"] == r["expectedLinks"], r
    assert r["missing"] == [] and r["errors"] == [], r
    assert all(r["panels"]) and all(r["heatmaps"]), r


def test_training_panel_renders_curves_gates_and_status(results):
    panel = results["panel"]
    assert panel["status"] == "done" and panel["step"] == 4 and panel["history"] == 4, panel
    assert panel["gateLabels"] == ["a.safetensors", "b.safetensors"]
    assert panel["canvas"]["inked"] > 1000 and "step 4/4" in panel["text"] and "browser/tiny" in panel["text"]
    assert " · denoise " in panel["text"], panel["text"]  # the loss terms are shown beside the total
    assert (ARTIFACTS / "panel.png").stat().st_size > 2000


def test_heatmap_renders_labels_and_hover_values(results):
    heat = results["heatmap"]
    assert heat["experts"] == ["a.safetensors", "b.safetensors"] and heat["canvas"]["inked"] > 1000
    assert "down0.attn0" in heat["aria"] and "mid.attn0" in heat["aria"], heat["aria"]
    assert heat["tooltip"].startswith("a.safetensors · down0.res0") and ":" in heat["tooltip"], heat["tooltip"]
    assert "MoLE Train Gates" in heat["title"]


def test_panel_reattaches_after_reload_and_its_buttons_control_the_job(results):
    r = results["reattach"]
    assert r["beforeReload"]["status"] == "running" and r["afterReload"]["job"] == r["beforeReload"]["job"]
    after = r["afterReload"]
    assert after["step"] > r["beforeReload"]["step"] and after["history"] >= after["step"] - 1  # history refetched
    search = r["search"]  # a block-search record: shown after the step's figures, not a point of the curves
    assert "· block search 3/10" in search["text"] and search["text"].startswith("step ") and search["historyKept"]
    assert r["cancelled"]["status"] == "cancelled" and r["finished"]["status"] == "done"
    stale = r["staleIgnored"]  # an older reply/event arriving late does not undo "cancelled"
    assert stale["before"] > 0 and stale["status"] == "cancelled" and stale["revision"] == stale["before"]
    assert r["finished"]["step"] > r["cancelled"]["step"]
    assert results["errors"] == []
