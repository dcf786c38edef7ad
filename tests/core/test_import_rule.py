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


def test_no_absolute_import_of_the_top_level_name_nodes():
    """ComfyUI owns the module name ``nodes``: our ``nodes/`` package is imported relatively, and ComfyUI's
    ``nodes.py`` is reached through ``tests.nodes._helpers.comfyui_nodes`` — never by an absolute import, and
    not through a ComfyUI module that makes one (``comfy_extras.*`` node modules load the top-level ``nodes``)."""
    from tests.fixtures.comfy_check import find_comfyui_root

    comfy = find_comfyui_root()
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "node_modules"} or "node_modules" in rel.parts:
            continue
        for lineno, name in _absolute_imports(path):
            if name == "nodes" or name.startswith("nodes.") or (comfy is not None and _imports_nodes(comfy, name)):
                offenders.append(f"{rel}:{lineno} {name}")
    assert not offenders, offenders


def _absolute_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in ``path``, ``importlib.import_module("…")`` included."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                 else [_dynamic_import_name(node)] if isinstance(node, ast.Call) else [])
        out += [(node.lineno, n) for n in names if n]
    return out


def _imports_nodes(comfy: Path, module: str) -> bool:
    """Whether ComfyUI's module ``module`` (a file of the checkout at ``comfy``) imports the top-level ``nodes``."""
    if not module.startswith(("comfy_extras.", "comfy_api.", "comfy.")):
        return False
    file = comfy.joinpath(*module.split(".")).with_suffix(".py")
    return file.is_file() and any(n == "nodes" or n.startswith("nodes.") for _, n in _absolute_imports(file))


def _dynamic_import_name(call) -> str | None:  # noqa: ANN001
    """The literal module name of ``importlib.import_module("…")`` / ``__import__("…")``, else None."""
    import ast

    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name in {"import_module", "__import__"} and call.args and isinstance(call.args[0], ast.Constant):
        return str(call.args[0].value)
    return None


def _import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module → the project modules it imports (top level and inside functions alike)."""
    import ast

    mods = {}
    for pkg in packages:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                names = subs if len(subs) == len(node.names) else [target, *subs]  # `from . import sub`: the sub
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def test_no_two_modules_import_each_other():
    """One direction per pair: the CLI calls the commands (not back), ``attach`` loads gate files that read
    mixtures (the mixture module imports neither) — checked on the AST, function-level imports included."""
    graph = _import_graph(("mole_core", "train", "nodes", "mole_toy"))
    assert "train.commands" in graph["train.cli"] and "mole_core.gate_file" in graph["mole_core.attaching"]
    pairs = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph[b]})
    assert pairs == [], pairs
    # the toy world needs only the engine: the trainer's demo uses it, never the other way round
    assert not {(a, b) for a in graph if a.startswith("mole_toy") for b in graph[a] if b.startswith(("train", "nodes"))}
    assert "mole_toy" in graph["train.demo"] or "mole_toy.guide" in graph["train.demo"]


def test_no_module_imports_another_modules_private_name():
    """``from x import _name`` reaches into another module's internals: what is shared is public (a private
    *module* of the same package, e.g. ``from tests.nodes import _loras``, is fine)."""
    import ast

    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "node_modules", "demo_out"} or "node_modules" in rel.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
                continue
            start = path.parent if node.level else ROOT
            for _ in range(max(node.level - 1, 0)):
                start = start.parent
            base = start.joinpath(*(node.module or "").split("."))
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                       and not (base / f"{a.name}.py").exists() and not (base / a.name).is_dir()]
            offenders += [f"{rel}:{node.lineno} {n}" for n in private]
    assert not offenders, offenders
