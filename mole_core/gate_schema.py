"""The explicit schema of a gate file's metadata and tensors: anything else is a one-line MoleError.

Metadata (``mole`` JSON): an object with ``format``, an integer ``version`` (1 … current), ``gate_config`` (an
object of :class:`GateConfig` fields), ``experts`` (a non-empty list of objects with a string ``name``) and
``scopes`` (a non-empty object of objects with an integer ``feature_dim`` ≥ 1, or exactly 0 with
``gate_input="router"``, whose files also carry ``router``: an object with an integer ``feature_dim`` ≥ 1).
Tensors per scope, floating point, finite, exact shapes (no broadcasting): ``weight (N, d)``, ``bias (N,)``,
``log_tau ()``, sigmoid ``magnitude_logit ()``, optional ``center (d,)``; with a router ``router.weight (N, d)``
and ``router.center (d,)``; ``gate_input="trigger"`` adds ``router.scale (N,)`` and ``router.bias (N,)`` and
makes ``magnitude_logit (N,)`` and allows per-set scales ``sets (K, N)`` and ``set_scale (K, N)`` (version 6,
:func:`check_set_scales`); router values bounded by :data:`MAX_ABS`. Tensors of no scope warn and are
ignored.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .errors import MoleError, MoleWarning
from .gates import GateConfig

MAX_ABS = 1e4  # a router weight, bias or log-temperature beyond this is corrupt, not trained


def check_metadata(name: str, info: object, fmt: str, version: int) -> tuple[GateConfig, list[dict], dict]:
    """``(config, experts, scopes)`` from a gate file's ``mole`` metadata, or a one-line MoleError."""
    if not isinstance(info, dict):
        raise MoleError(f"{name}: gate metadata must be a JSON object, got {type(info).__name__}")
    if info.get("format") != fmt:
        raise MoleError(f"{name}: not a MoLE gate file (format {info.get('format')!r})")
    v = info.get("version", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MoleError(f"{name}: gate file `version` must be an integer ≥ 1, got {v!r}")
    if v > version:
        raise MoleError(f"{name}: gate file version {v} is newer than this MoLE ({version})")
    cfg_dict = info.get("gate_config")
    if not isinstance(cfg_dict, dict):
        raise MoleError(f"{name}: `gate_config` must be a JSON object, got {type(cfg_dict).__name__}")
    known = {f.name for f in dataclasses.fields(GateConfig)}
    unknown = sorted(k for k in cfg_dict if k not in known)
    if unknown:  # repr: a key may hold any character, a newline included, and the message stays one line
        raise MoleError(f"{name}: `gate_config` has unknown key(s) {', '.join(map(repr, unknown[:3]))}"
                        f"{' …' if len(unknown) > 3 else ''}")
    try:
        cfg = GateConfig(**cfg_dict)
    except TypeError as exc:
        raise MoleError(f"{name}: malformed `gate_config` ({' '.join(str(exc).split())})") from None
    except MoleError as exc:
        raise MoleError(f"{name}: {exc}") from None
    experts = info.get("experts")
    if not isinstance(experts, list) or not experts or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in experts):
        raise MoleError(f"{name}: `experts` must be a non-empty list of objects with a string `name`")
    scopes = info.get("scopes")
    if not isinstance(scopes, dict) or not scopes:
        raise MoleError(f"{name}: `scopes` must be a non-empty JSON object")
    routed = cfg.routed
    for s, meta in scopes.items():
        d = meta.get("feature_dim") if isinstance(meta, dict) else None
        if routed and d != 0:
            raise MoleError(f"{name}: scope {s!r} of a router gate file needs `feature_dim` 0, got {d!r}")
        if not routed and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise MoleError(f"{name}: scope {s!r} needs an integer `feature_dim` ≥ 1, got {d!r}")
    if routed:
        router = info.get("router")
        d = router.get("feature_dim") if isinstance(router, dict) else None
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise MoleError(f"{name}: `router` must be an object with an integer `feature_dim` ≥ 1, got {router!r}")
    return cfg, experts, scopes


def router_parts(cfg: GateConfig) -> tuple[str, ...]:
    """Tensor names of the shared router (``router.<part>``) for a routed gate config."""
    return ("weight", "center", "scale", "bias") if cfg.gate_input == "trigger" else ("weight", "center")


SET_PARTS = ("sets", "set_scale")  # optional per-scope tensors of trigger gates (version 6)


def check_set_scales(name: str, scope: str, n_experts: int, tensors: dict[str, torch.Tensor]) -> None:
    """A trigger scope's optional per-set scales: ``sets`` and ``set_scale``, both ``(K, N)`` with K ≥ 1, or
    neither; ``sets`` holds distinct rows of 0/1, ``set_scale`` values ≥ 0."""
    sets, scale = (tensors.get(f"gates.{scope}.{p}") for p in SET_PARTS)
    if sets is None and scale is None:
        return
    if sets is None or scale is None:
        raise MoleError(f"{name}: scope {scope!r} needs both gates.{scope}.sets and gates.{scope}.set_scale, or "
                        f"neither")
    k = sets.shape[0] if sets.dim() == 2 else 0
    for part, t in zip(SET_PARTS, (sets, scale)):
        _check_tensor(name, f"gates.{scope}.{part}", t, (max(k, 1), n_experts))
    if not ((sets == 0) | (sets == 1)).all():
        raise MoleError(f"{name}: tensor gates.{scope}.sets must hold only 0 and 1")
    if len({tuple(r) for r in sets.bool().tolist()}) != k:
        raise MoleError(f"{name}: tensor gates.{scope}.sets repeats an on-pattern")
    if (scale < 0).any():
        raise MoleError(f"{name}: tensor gates.{scope}.set_scale must be ≥ 0")


def _check_tensor(name: str, key: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not t.is_floating_point():
        raise MoleError(f"{name}: tensor {key} must be floating point, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise MoleError(f"{name}: tensor {key} has shape {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all():
        raise MoleError(f"{name}: tensor {key} contains NaN/inf")
    if t.numel() and float(t.abs().max()) > MAX_ABS:
        raise MoleError(f"{name}: tensor {key} has values beyond ±{MAX_ABS:g} (corrupt)")


def check_tensors(name: str, cfg: GateConfig, n_experts: int, scopes: dict, tensors: dict[str, torch.Tensor],
                  parts: tuple[str, ...], router_dim: int = 0) -> None:
    """Exact shapes, floating dtypes, finite and bounded values for every scope's gate tensors (and the
    shared router's, when ``router_dim`` > 0)."""
    for s, meta in scopes.items():
        d = meta["feature_dim"]
        per_expert = (n_experts,) if cfg.gate_input == "trigger" else ()
        shapes = {"weight": (n_experts, d), "bias": (n_experts,), "log_tau": (), "magnitude_logit": per_expert,
                  "center": (d,)}
        for part in (*parts, "center"):
            key = f"gates.{s}.{part}"
            t = tensors.get(key)
            if t is None:
                if part == "center":
                    continue  # version 1: uncentred
                raise MoleError(f"{name}: tensor {key} missing")
            _check_tensor(name, key, t, shapes[part])
        if cfg.gate_input == "trigger":
            check_set_scales(name, s, n_experts, tensors)
    shapes = {"weight": (n_experts, router_dim), "center": (router_dim,), "scale": (n_experts,), "bias": (n_experts,)}
    router = {f"router.{p}": shapes[p] for p in router_parts(cfg)} if router_dim else {}
    for key, shape in router.items():
        if key not in tensors:
            raise MoleError(f"{name}: tensor {key} missing")
        _check_tensor(name, key, tensors[key], shape)
    optional = ("center", *SET_PARTS) if cfg.gate_input == "trigger" else ("center",)
    known = {f"gates.{s}.{p}" for s in scopes for p in (*parts, *optional)} | set(router)
    extra = sorted(set(tensors) - known)
    if extra:
        warnings.warn(f"{name}: {len(extra)} tensors belong to no scope and are ignored (e.g. {extra[0]})",
                      MoleWarning, stacklevel=3)
