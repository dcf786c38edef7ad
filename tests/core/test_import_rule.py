"""mole_core must import with ComfyUI, diffusers and transformers unavailable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'comfy', 'comfy_api', 'folder_paths', 'server', 'nodes', 'diffusers',
                                  'transformers', 'peft', 'open_clip'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import mole_core, mole_core.viz, mole_core.bake, mole_core.gate_file
print('ok', len(mole_core.__all__))
"""


def test_mole_core_imports_without_comfy_or_diffusers():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
