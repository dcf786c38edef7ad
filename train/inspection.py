"""Describe LoRA and gate files: format, targets, ranks, blocks, metadata (``mole-train inspect``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mole_core as mole
from mole_core import MoleError
from mole_core.lora_files import read_safetensors
from mole_core.naming import block_label, scope_of


def _is_gate_file(path: Path) -> bool:
    if path.is_dir():
        return False
    try:
        _, meta = read_safetensors(path)
    except MoleError:
        return False
    return "mole" in meta


def describe(path: str | Path, model: object | None = None) -> dict:
    """JSON-able description of a LoRA (file or PEFT folder) or a MoLE gate file."""
    p = Path(path)
    if _is_gate_file(p):
        gf = mole.read_gate_file(p)
        return {"file": str(p), "kind": "mole-gates", "experts": gf.experts, "gate_config": gf.config.to_dict(),
                "scopes": len(gf.scopes), "blocks": [block_label(s) for s in gf.scopes],
                "family": gf.info.get("family"), "training": gf.info.get("training", {}),
                "metrics": gf.info.get("metrics", {})}
    e = mole.load_expert(p)
    comps = Counter(k.split(":", 1)[0] for k in e.factors)
    blocks = sorted({scope_of(k, "block") for k in e.factors})
    out = {"file": str(p), "kind": "lora", "format": e.format, "sha256": e.sha256, "targets": len(e.factors),
           "targets_by_component": dict(comps), "ranks": e.ranks,
           "scales": sorted({round(f.scale, 6) for f in e.factors.values()}),
           "conv_targets": sum(f.is_conv for f in e.factors.values()),
           "dense_targets": sum(f.dense for f in e.factors.values()),
           "blocks": [block_label(b) for b in blocks], "skipped_keys": len(e.skipped_keys),
           "metadata_keys": sorted(e.metadata)}
    if model is not None:
        index = mole.index_model(model)
        matched = [k for k in e.factors if k in index.modules]
        out["matched"] = f"{len(matched)}/{len(e.factors)}"
    return out


def format_description(d: dict) -> str:
    """Human-readable multi-line text of :func:`describe`."""
    lines = [f"{d['file']}: {d['kind']}"]
    for k, v in d.items():
        if k in ("file", "kind"):
            continue
        if isinstance(v, (dict, list)) and len(json.dumps(v)) > 100:
            v = json.dumps(v)[:300] + ("…" if len(json.dumps(v)) > 300 else "")
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)
