"""Fixtures for the ComfyUI node tests: a real ComfyUI checkout, in-process, on CPU.

The checkout is found at ``$COMFYUI_PATH``, else the ComfyUI root above this repository (when it
sits in ``custom_nodes/``), else ``~/ComfyUI``; without one every test here is skipped.
ComfyUI's root goes on ``sys.path`` for these tests only (ComfyUI's own ``nodes``, ``folder_paths``,
``comfy_api``…), and our package is loaded the way ComfyUI loads a custom node.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER_TESTS = {"test_server.py", "test_training_server.py", "test_training_browser.py"}  # share one server


def find_comfyui() -> Path | None:
    candidates = [os.environ.get("COMFYUI_PATH")]
    if REPO.parent.name == "custom_nodes":
        candidates.append(str(REPO.parent.parent))
    candidates.append(str(Path.home() / "ComfyUI"))
    for c in candidates:
        if c and (Path(c) / "comfy" / "model_patcher.py").is_file() and (Path(c) / "folder_paths.py").is_file():
            return Path(c).resolve()
    return None


def comfyui_import_error(root: Path) -> str | None:
    """Why ComfyUI at ``root`` cannot run here (a missing requirement), or None when it imports."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported (no CUDA here)
        import comfy.sample  # noqa: F401  (pulls in samplers, k-diffusion, model management)
    except ImportError as exc:
        sys.path.remove(str(root))  # ComfyUI's own nodes.py must not shadow our nodes/ package
        for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]:
            del sys.modules[name]
        return str(exc)
    return None


COMFYUI = find_comfyui()
SKIP_REASON = ("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (or put this repo in "
               "ComfyUI/custom_nodes) to run tests/nodes")
if COMFYUI is not None and (missing := comfyui_import_error(COMFYUI)):
    SKIP_REASON = f"ComfyUI at {COMFYUI} cannot be imported ({missing}): run `make comfy-deps`"
    COMFYUI = None

if COMFYUI is None:
    # Test modules import ComfyUI at the top: leave them out and let test_comfyui_found.py report
    # the one skip line (pytest.skip in a conftest aborts `pytest tests/nodes` instead of skipping).
    collect_ignore = [p.name for p in Path(__file__).parent.glob("test_*.py") if p.name != "test_comfyui_found.py"]

import torch  # noqa: E402


def load_mole_package() -> tuple[ModuleType, ModuleType]:
    """Import the repository as ComfyUI does (``spec_from_file_location`` of its ``__init__.py``
    under the path-derived module name), run ``comfy_entrypoint`` and return ``(package, nodes)``."""
    name = str(REPO).replace(".", "_x_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    package = sys.modules[name]
    asyncio.run(package.comfy_entrypoint())
    return package, importlib.import_module(f"{name}.nodes")


@pytest.fixture(scope="session")
def comfy_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Temporary ``models/loras``, ``models/mole_gates``, output and temp folders for ComfyUI."""
    import folder_paths

    root = tmp_path_factory.mktemp("comfy_base")
    dirs = {k: root / k for k in ("loras", "mole_gates", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    folder_paths.add_model_folder_path("loras", str(dirs["loras"]), is_default=True)
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    return dirs


@pytest.fixture(scope="session")
def mole(comfy_dirs: dict[str, Path]) -> ModuleType:
    """Our ``nodes`` package (loaded like ComfyUI does) with ``models/mole_gates`` in the temp folder."""
    import folder_paths

    _, nodes = load_mole_package()
    folder_paths.add_model_folder_path("mole_gates", str(comfy_dirs["mole_gates"]), is_default=True)
    return nodes


@pytest.fixture(scope="session")
def tiny():
    """``(model, clip)``: tiny SD1.5-topology ModelPatcher and CLIP, built under inference mode
    like ComfyUI's loaders do (parameters are inference tensors)."""
    from tests.nodes.testing_pack.tiny_comfy import tiny_clip, tiny_model

    with torch.inference_mode():
        return tiny_model(0), tiny_clip(1)


@pytest.fixture(scope="session", autouse=True)
def comfy_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """``(server, base dir)`` of a headless ComfyUI with MoLE in ``custom_nodes``, or None.

    Started at session start when server tests are selected, so its start-up (about 20 s of
    imports) overlaps the in-process tests; stopped with SIGINT at the end.
    """
    if not any(item.path.name in SERVER_TESTS for item in request.session.items):
        yield None
        return
    from tests.nodes._server import Server, prepare_base

    base = tmp_path_factory.mktemp("server_base")
    prepare_base(base, REPO, Path(__file__).parent / "testing_pack")
    server = Server(COMFYUI, base, base / "server.log")
    try:
        yield server, base
    finally:
        server.stop()


@pytest.fixture(scope="session")
def files(tiny, comfy_dirs) -> dict:
    """LoRA files in ``models/loras``: ``a`` (kohya, rank 4, alpha 2; UNet attention + two 3×3 convs +
    text encoder), ``b`` (kohya, rank 8, alpha 4, same targets), ``c`` (ComfyUI format, rank 2, no
    alpha, UNet attention only). Returns their paths and ``lora_a`` (the factors of ``a``)."""
    from tests.nodes import _loras

    model, clip = tiny
    loras = comfy_dirs["loras"]
    a = _loras.random_lora(model, clip, seed=1, rank=4, alpha=2.0)
    b = _loras.random_lora(model, clip, seed=2, rank=8, alpha=4.0)
    c = _loras.random_lora(model, None, seed=3, rank=2, alpha=None, conv=False)
    _loras.write_kohya(a, loras / "a.safetensors")
    _loras.write_kohya(b, loras / "b.safetensors")
    _loras.write_comfy(c, model, loras / "c.safetensors")
    return {"a": loras / "a.safetensors", "b": loras / "b.safetensors", "c": loras / "c.safetensors", "lora_a": a}


@pytest.fixture(scope="session")
def experts(mole, tiny, files):
    """MoLE Load Experts output for ``a`` and ``b`` (with CLIP)."""
    from tests.nodes._nodes import load

    model, clip = tiny
    return load(mole, model, clip, ("a.safetensors", 1.0, True), ("b.safetensors", 1.0, True))


@pytest.fixture(scope="session")
def base_out(tiny, mole):
    """3 euler steps, CFG 5, of the bare tiny model (the reference every MoLE clone must not disturb)."""
    from tests.nodes._helpers import sample

    with torch.inference_mode():
        return sample(tiny[0])


@pytest.fixture(scope="session")
def clip_guide(comfy_dirs) -> dict:
    """A tiny open_clip (random weights) in ``models/mole_clip`` with its architecture as a config JSON."""
    import json

    import folder_paths
    from safetensors.torch import save_file

    from tests.train.test_engine import tiny_clip

    folder = comfy_dirs["mole_gates"].parent / "mole_clip"
    folder.mkdir(exist_ok=True)
    model, _, cfg = tiny_clip()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "tiny_guide.safetensors")
    (folder / "tiny-guide.json").write_text(json.dumps(cfg))
    folder_paths.add_model_folder_path("mole_clip", str(folder))
    return {"clip_guide": "tiny_guide.safetensors", "clip_guide_arch": str(folder / "tiny-guide.json")}


@pytest.fixture(scope="session")
def vae():
    """A tiny real ``comfy.sd.VAE`` (built under inference mode, as ComfyUI loads one)."""
    from tests.nodes.testing_pack.tiny_comfy import tiny_vae

    with torch.inference_mode():
        return tiny_vae(2)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """Four 64² reference images (coloured blobs)."""
    from tests.nodes.testing_pack.tiny_comfy import blob_images

    return blob_images(4, 64, seed=3)
