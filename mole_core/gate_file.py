"""Gate files: ``.safetensors`` with the gate tensors and JSON metadata that names the experts.

Tensors: ``gates.<scope>.weight (N, d)``, ``gates.<scope>.bias (N,)``, ``gates.<scope>.log_tau ()``, for
the sigmoid family ``gates.<scope>.magnitude_logit ()``, and ``gates.<scope>.center (d,)`` (the feature centre;
format version 2 — version-1 files are uncentred softmax gates and load unchanged). ``gate_input="router"``
(version 3): every scope's feature size is 0 and ``router.weight (N, d)``, ``router.center (d,)`` hold the
shared router on the first text-encoder layer (metadata ``router``: its lead target and ``feature_dim``).
``gate_input="trigger"`` (version 4): ``router.weight`` holds the unit trigger keys, ``router.scale (N,)`` and
``router.bias (N,)`` the thresholds, and every scope's ``magnitude_logit`` is ``(N,)``, one per expert.
Version 5: a routed file whose gate config says ``negative_routing: positive`` (older readers would route the
negative prompt's rows by themselves and sample something else); every other file keeps its version.
Version 6: a trigger file whose scopes carry per-set scales ``gates.<scope>.sets (K, N)`` (on-patterns of 0/1) and
``gates.<scope>.set_scale (K, N)`` (each expert's factor under that pattern; the block search by set writes them):
older readers would ignore them and run every LoRA in every stage.
Metadata key ``mole`` (JSON): format version, experts (name, sha256, ranks, order), gate
config, scopes (lead target, feature size), base-model family, training config, metrics.
Loading refuses a different expert set/order/hash with one line naming the difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import MoleError, MoleWarning
from .gate_schema import SET_PARTS, check_metadata, check_tensors, router_parts
from .gates import GateConfig, prior_gates
from .lora_files import read_safetensors
from .mixture import Mixture

FORMAT = "mole-gates"
VERSION = 6  # the newest format read; files say the oldest that reads them (2 unless they carry a router)


def _parts(cfg: GateConfig) -> tuple[str, ...]:
    """Tensor names stored per scope for a gate family."""
    base = ("weight", "bias", "log_tau")
    return (*base, "magnitude_logit") if cfg.family == "sigmoid" else base


@dataclass
class GateFile:
    """A gate file read from disk (not yet bound to a model)."""

    path: str
    config: GateConfig
    experts: list[dict]
    scopes: dict[str, dict]
    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def components(self) -> list[str]:
        """Components (``unet``, ``te``, ``te2``) the gates cover, sorted."""
        return sorted({s.split(":", 1)[0] for s in self.scopes})

    def prior_gates(self) -> dict[str, list[float]]:
        """Gate of each scope for a neutral (zero) feature, from the routers' biases."""
        return prior_gates(self.tensors, list(self.scopes), self.config)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it: a race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file via a temp file + rename, so a crash never leaves half a file."""
    p = Path(path)
    if not p.parent.is_dir():
        raise MoleError(f"{p}: directory {p.parent} does not exist")
    tmp = str(p.parent / f".{p.name}.{secrets.token_hex(8)}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; every other output is 0666 minus the umask
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def snapshot(mix: Mixture, *, training: dict | None = None, metrics: dict | None = None,
             extra: dict | None = None) -> GateFile:
    """The mixture's gates as an in-memory :class:`GateFile` (CPU copies; nothing written)."""
    tensors: dict[str, torch.Tensor] = {}
    scopes: dict[str, dict] = {}
    has_sets = False
    for i, (name, scope) in enumerate(mix.scopes.items()):
        g = mix.gates[f"s{i}"]
        for part in (*_parts(mix.config), "center"):
            tensors[f"gates.{name}.{part}"] = getattr(g, part).float()
        if g.has_set_scales:
            has_sets = True
            for part in SET_PARTS:
                tensors[f"gates.{name}.{part}"] = getattr(g, part).float()
        scopes[name] = {"lead": scope.lead, "feature_dim": scope.feature_dim, "targets": len(scope.targets)}
    extra = dict(extra or {})
    if mix.router_lead is not None:
        router = mix.gates["router"]
        for part in router_parts(mix.config):
            tensors[f"router.{part}"] = getattr(router, part).float()
        extra["router"] = {"lead": mix.router_lead, "feature_dim": int(router.weight.shape[1])}
    version = (4 if mix.config.gate_input == "trigger" else 3) if mix.routed else 2  # the oldest reader
    if mix.config.negative_routing != "own":
        version = 5
    if has_sets:
        version = 6
    info = {"format": FORMAT, "version": version, "experts": [dict(e.summary(), order=i)
                                                              for i, e in enumerate(mix.experts)],
            "gate_config": mix.config.to_dict(), "scopes": scopes, "family": mix.index.family,
            "training": training or {}, "metrics": metrics or {}, **(extra or {})}
    tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
    return GateFile("<memory>", mix.config, info["experts"], scopes, tensors, info)


def write_gate_file(gf: GateFile, path: str | os.PathLike) -> Path:
    """Write an in-memory gate file atomically (temp file + rename)."""
    atomic_save(gf.tensors, path, {"format": "pt", "mole": json.dumps(gf.info)})
    return Path(path)


def save_gates(mix: Mixture, path: str | os.PathLike, *, training: dict | None = None,
               metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Save a mixture's gates with the metadata that identifies its experts."""
    return write_gate_file(snapshot(mix, training=training, metrics=metrics, extra=extra), path)


def read_gate_file(path: str | os.PathLike) -> GateFile:
    """Read and validate the structure of a gate file (one-line MoleError on anything wrong)."""
    tensors, meta = read_safetensors(path)
    name = Path(path).name
    try:
        info = json.loads(meta["mole"])
    except (KeyError, json.JSONDecodeError):
        raise MoleError(f"{name}: not a MoLE gate file (no 'mole' metadata)") from None
    cfg, experts, scopes = check_metadata(name, info, FORMAT, VERSION)
    router_dim = info["router"]["feature_dim"] if cfg.routed else 0
    check_tensors(name, cfg, len(experts), scopes, tensors, _parts(cfg), router_dim)
    return GateFile(str(path), cfg, experts, scopes, tensors, info)


def check_experts_match(gf: GateFile, mix: Mixture, match: str = "hash") -> None:
    """Raise MoleError naming the first difference between the file's experts and the mixture's."""
    name = Path(gf.path).name
    want = [(e["name"], e.get("sha256", "")) for e in gf.experts]
    have = [(e.name, e.sha256) for e in mix.experts]
    if len(want) != len(have):
        raise MoleError(f"{name}: gates are for {len(want)} experts {[w[0] for w in want]}, "
                        f"got {len(have)} {[h[0] for h in have]}")
    for i, ((wn, wh), (hn, hh)) in enumerate(zip(want, have)):
        if match == "name":
            if wn != hn:
                raise MoleError(f"{name}: expert {i + 1} should be {wn!r}, got {hn!r}")
        elif wh != hh:
            moved = [j for j, (_, h) in enumerate(have) if h == wh]
            where = f" (it is expert {moved[0] + 1} here: order differs)" if moved else ""
            raise MoleError(f"{name}: expert {i + 1} should be {wn!r} sha256 {wh[:12]}, got {hn!r} "
                            f"sha256 {hh[:12]}{where}")


def load_gates(mix: Mixture, path: str | os.PathLike, *, match: str = "hash") -> GateFile:
    """Load gate tensors into an attached mixture after checking experts, config and scopes."""
    return apply_gate_file(mix, read_gate_file(path), match=match)


def apply_gate_file(mix: Mixture, gf: GateFile, *, match: str = "hash") -> GateFile:
    """Copy a gate file's tensors into a mixture after checking experts, config and scopes.

    Returns a copy of ``gf`` whose ``info["ignored_scopes"]`` lists scopes of components the mixture
    does not cover (``gf`` itself is not modified: hosts share it)."""
    name = Path(gf.path).name
    check_experts_match(gf, mix, match)
    for attr in ("granularity", "gate_input", "family", "text_pool", "token_routing"):
        if getattr(gf.config, attr) != getattr(mix.config, attr):
            raise MoleError(f"{name}: {attr} is {getattr(gf.config, attr)!r}, the mixture uses "
                            f"{getattr(mix.config, attr)!r}")
    comps = {s.split(':', 1)[0] for s in mix.scopes}
    for s in mix.scopes:
        if s not in gf.scopes:
            raise MoleError(f"{name}: no gate for scope {s} (the file has {len(gf.scopes)} scopes)")
    with torch.no_grad():
        for i, (s, scope) in enumerate(mix.scopes.items()):
            dim = int(gf.scopes[s]["feature_dim"])
            if dim != scope.feature_dim:
                raise MoleError(f"{name}: scope {s} has feature size {dim}, the model gives {scope.feature_dim}")
            g = mix.gates[f"s{i}"]
            for part in _parts(gf.config):
                getattr(g, part).copy_(gf.tensors[f"gates.{s}.{part}"])
            center = gf.tensors.get(f"gates.{s}.center")  # format 1: none (no centering)
            g.center.copy_(center if center is not None else torch.zeros_like(g.center))
            if gf.config.gate_input == "trigger":  # per-set scales, or none (versions 4 and 5)
                sets = gf.tensors.get(f"gates.{s}.sets", torch.zeros(0, mix.n))
                g.set_set_scales(sets, gf.tensors.get(f"gates.{s}.set_scale", torch.ones(0, mix.n)))
        if mix.router_lead is not None:
            router = mix.gates["router"]
            dim = int(gf.info["router"]["feature_dim"])
            if dim != router.weight.shape[1]:
                raise MoleError(f"{name}: the router reads {dim} features, the model's first text-encoder layer "
                                f"gives {router.weight.shape[1]}")
            for part in router_parts(gf.config):
                getattr(router, part).copy_(gf.tensors[f"router.{part}"])
    extra = [s for s in gf.scopes if s.split(":", 1)[0] in comps and s not in mix.scopes]
    if extra:
        warnings.warn(f"{name}: {len(extra)} gate scopes match no block of this model and are ignored "
                      f"(e.g. {extra[0]})", MoleWarning, stacklevel=2)
    ignored = [s for s in gf.scopes if s.split(":", 1)[0] not in comps]
    return dataclasses.replace(gf, info={**gf.info, "ignored_scopes": ignored})
