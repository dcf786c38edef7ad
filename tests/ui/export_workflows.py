"""Regenerate ``workflows/*.json`` from :mod:`tests.ui.example_graphs` through the real frontend.

    python -m tests.ui.export_workflows [--url http://127.0.0.1:8188]

Without ``--url`` a headless ComfyUI with this repository in ``custom_nodes`` is started for the
occasion (needs a ComfyUI checkout, ``comfyui-frontend-package``, node, chromium and
``npm install`` in tests/ui).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def export(url: str, out: Path) -> list[Path]:
    from tests.ui.example_graphs import EXAMPLES, NOTES

    graphs = {name: {"api": make(), "note": NOTES[name]} for name, make in EXAMPLES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "graphs.json"
        spec.write_text(json.dumps(graphs))
        subprocess.run(["node", str(HERE / "browser.mjs"), "export", url, str(spec), str(out)], check=True,
                       cwd=HERE, timeout=600)
    return [out / f"{name}.json" for name in EXAMPLES]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running ComfyUI with MoLE loaded (default: start one)")
    parser.add_argument("--out", default=str(REPO / "workflows"), help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.url:
        files = export(args.url, out)
    else:
        from tests.nodes._server import Server, prepare_base
        from tests.nodes.conftest import find_comfyui

        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            prepare_base(base, REPO, REPO / "tests" / "nodes" / "testing_pack")
            server = Server(find_comfyui(), base, base / "server.log")
            try:
                server.wait_ready()
                files = export(server.url, out)
            finally:
                server.stop()
    for f in files:
        print(f"wrote {f.relative_to(REPO) if f.is_relative_to(REPO) else f}")


if __name__ == "__main__":
    sys.exit(main())
