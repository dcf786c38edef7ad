"""Read LoRA files of every common format into :class:`Expert` objects.

Formats: kohya (``lora_unet_*``/``lora_te*_`` + ``.lora_down/.lora_up/.alpha``), diffusers
(``unet.*``/``text_encoder*.`` with ``.lora.down/up``, ``.lora_A/B`` or the old ``to_q_lora``
processor layout; alphas from ``lora_adapter_metadata``), PEFT (``base_model.model.*`` with
``lora_A/lora_B``; a folder with ``adapter_config.json`` gives r and lora_alpha, also
``unet/``, ``text_encoder/``, ``text_encoder_2/`` sub-folders) and ComfyUI
(``diffusion_model.*.lora_up/down``). LoHa, LoKr (with or without Tucker cores) and full ``diff`` patches
become exact dense experts (with a warning); so do GLoRA, OFT, BOFT and DoRA (kohya / LyCORIS ``dora_scale``),
against each layer's weight when attached (:mod:`mole_core.adapters` has the math, ComfyUI's). Only
``.safetensors`` files are read, never pickles.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from .adapters import WEIGHT_KINDS, WeightDependent, lora_down, module_kind, scaled_delta
from .checks import check_number
from .errors import MoleError, MoleWarning
from .expert import Expert, LoraFactor, factor_from_delta
from .lora_schema import MAX_ALPHA, check_module
from .naming import canonical_from_prefix

_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    ("_lora.down.weight", "down_old"), ("_lora.up.weight", "up_old"),
    (".alpha", "alpha"), (".dora_scale", "dora_scale"), (".lora_magnitude_vector", "dora"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"), (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_t2", "lokr_t2"), (".diff", "diff"), (".diff_b", "diff_b"),
    (".a1.weight", "a1"), (".a2.weight", "a2"), (".b1.weight", "b1"), (".b2.weight", "b2"),
    (".oft_blocks", "oft_blocks"), (".rescale", "rescale"),
)
_PEFT_NAMED = re.compile(r"^(.+)\.lora_([AB])\.([A-Za-z0-9_-]+)\.weight$")
_SUBFOLDERS = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}
def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (or of a folder's safetensors/json files), cached by path, size and mtime."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.suffix in (".safetensors", ".json")) if p.is_dir() else [p]
    digests = [_file_digest(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    if not p.is_dir():
        return digests[0]
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=256)  # bounded: a long-running server hashes many files over its life
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    fh = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            fh.update(chunk)
    return fh.hexdigest()


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a ``.safetensors`` file with one-line errors for missing, pickled or broken files."""
    p = Path(path)
    if not p.exists():
        raise MoleError(f"{p}: file not found")
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise MoleError(f"{p.name}: only .safetensors files are loaded (pickle formats can run code)")
    size = p.stat().st_size
    with open(p, "rb") as fp:
        head = fp.read(9)
    if len(head) < 9:
        raise MoleError(f"{p.name}: not a safetensors file (only {size} bytes)")
    (hlen,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or hlen > size - 8:
        hint = "truncated" if head[8:9] == b"{" else "not a safetensors file"
        raise MoleError(f"{p.name}: {hint} (header says {hlen} bytes, file has {size})")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises its own error types
        raise MoleError(f"{p.name}: unreadable safetensors file ({str(exc).splitlines()[0]})") from exc
    return tensors, meta


def _split_key(key: str) -> tuple[str, str] | None:
    m = _PEFT_NAMED.match(key)
    if m and m[3] != "weight":
        return m[1], "down" if m[2] == "A" else "up"
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            prefix = key[: -len(suffix)]
            if role.endswith("_old"):  # diffusers attn-processor layout: "<...>.to_q_lora.down.weight"
                return prefix + "_lora", role[:-4]
            return prefix, role
    return None


class _PeftConfig:
    """The parts of a PEFT ``LoraConfig`` that decide scales (r, lora_alpha, patterns, rsLoRA)."""

    def __init__(self, cfg: dict | None, source: str = "adapter config"):
        cfg = cfg or {}
        if not isinstance(cfg, dict):
            raise MoleError(f"{source} must be a JSON object, got {type(cfg).__name__}")
        self.alpha = _number_or_none(cfg.get("lora_alpha"), f"{source}: lora_alpha")
        pattern = cfg.get("alpha_pattern") or {}
        if not isinstance(pattern, dict):
            raise MoleError(f"{source}: alpha_pattern must be a JSON object, got {type(pattern).__name__}")
        self.alpha_pattern = {str(k): _number_or_none(v, f"{source}: alpha_pattern[{k!r}]") for k, v in pattern.items()}
        self.rslora = bool(cfg.get("use_rslora", False))
        self.dora = bool(cfg.get("use_dora", False))

    def scale(self, module: str, rank: int) -> float | None:
        alpha = self.alpha
        for pat, val in self.alpha_pattern.items():
            if module == pat or module.endswith("." + pat) or re.fullmatch(rf"(.*\.)?{pat}", module):
                alpha = val
                break
        if alpha is None:
            return None
        return float(alpha) / (rank ** 0.5 if self.rslora else rank)


def _number_or_none(v: object, what: str) -> float | None:
    """A finite JSON number (bounded like a file's alpha), or None; anything else is a one-line error."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > MAX_ALPHA:
        raise MoleError(f"{what} must be a finite number with |x| ≤ {MAX_ALPHA:g}, got {v!r}")
    return float(v)


def _json_object(text: str, what: str) -> dict:
    """Parse a JSON object (a LoRA file's ``lora_adapter_metadata``, a PEFT ``adapter_config.json``)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MoleError(f"{what}: malformed JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise MoleError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def peft_scale(config: dict, module: str, rank: int) -> float | None:
    """``alpha / r`` (``alpha / √r`` with rsLoRA) that a PEFT ``LoraConfig`` dict gives ``module``
    (``alpha_pattern`` honoured); None when the config has no alpha."""
    return _PeftConfig(config).scale(module, rank)


_PARTS = {  # the tensors each kind needs (LoKr: one of each pair)
    "LoRA": ({"down"}, {"up"}), "LoHa": ({"hada_w1_a"}, {"hada_w1_b"}, {"hada_w2_a"}, {"hada_w2_b"}),
    "LoKr": ({"lokr_w1", "lokr_w1_b"}, {"lokr_w2", "lokr_w2_b"}), "GLoRA": ({"a1"}, {"a2"}, {"b1"}, {"b2"}),
    "OFT": ({"oft_blocks"},), "BOFT": ({"oft_blocks"},), "diff": ({"diff"},),
}


def _check_parts(name: str, prefix: str, kind: str | None, roles: dict[str, torch.Tensor]) -> None:
    """One-line MoleError for a module missing a part of its kind, or with a shape its kind cannot have."""
    where = f"expert {name!r}: {prefix}"
    missing = [" or ".join(sorted(alts)) for alts in _PARTS.get(kind, ()) if not alts & roles.keys()]
    missing += [f"{k}_a" for k in ("lokr_w1", "lokr_w2") if f"{k}_b" in roles and f"{k}_a" not in roles]
    if kind is None or (kind == "LoRA" and missing):
        raise MoleError(f"expert {name!r}: incomplete LoRA module {prefix} (has {sorted(roles)}; needs down and up, "
                        "or the parts of a LoHa, LoKr, GLoRA, OFT or BOFT module)")
    if missing:
        raise MoleError(f"expert {name!r}: malformed {kind} module {prefix} (has {sorted(roles)}: missing "
                        f"{', '.join(missing)})")
    if "dora_scale" in roles and kind in ("OFT", "BOFT", "diff"):
        raise MoleError(f"{where}: DoRA on {kind} modules is not supported (only on LoRA, LoHa, LoKr and GLoRA)")
    if kind in ("OFT", "BOFT"):
        blocks = roles["oft_blocks"]
        if blocks.shape[-1] != blocks.shape[-2] or (kind == "BOFT" and blocks.shape[-1] % 2):
            raise MoleError(f"{where}: {kind} blocks must be square{' and of even size' if kind == 'BOFT' else ''}, "
                            f"got {tuple(blocks.shape)}")
        if kind == "BOFT" and "alpha" not in roles:
            raise MoleError(f"{where}: a BOFT module needs its alpha (the rotation's norm constraint)")


def _dense_factor(name: str, prefix: str, kind: str, roles: dict[str, torch.Tensor]) -> LoraFactor:
    """A LoHa / LoKr / diff module as the exact full-rank factors of its strength-1 delta."""
    try:
        delta = scaled_delta(kind, roles, None)
    except (RuntimeError, IndexError, ValueError) as exc:  # mismatched parts
        raise MoleError(f"expert {name!r}: malformed {kind} module {prefix} (has {sorted(roles)}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if delta.dim() not in (2, 4) or not torch.isfinite(delta).all():
        raise MoleError(f"expert {name!r}: {kind} module {prefix} gives a {delta.dim()}-D or non-finite delta")
    return factor_from_delta(delta)


def _lora_factor(roles: dict[str, torch.Tensor], canon: str, cfg: _PeftConfig | None) -> LoraFactor:
    """A plain LoRA module (kohya ``alpha``, else the PEFT config's scale for ``canon``, else 1)."""
    alpha_t = roles.get("alpha")
    alpha = float(alpha_t.float().item()) if alpha_t is not None else None
    f = LoraFactor(down=lora_down(roles), up=roles["up"], alpha=alpha)
    if alpha is None and cfg is not None:
        f.scale_override = cfg.scale(canon.split(":", 1)[1], f.rank)
    return f


def factors_from_state_dict(sd: dict[str, torch.Tensor], name: str, *, peft_config: dict | None = None,
                            adapter_metadata: dict | None = None, component_hint: str | None = None,
                            ) -> tuple[dict[str, LoraFactor], list[str], str]:
    """Parse a LoRA state dict. Returns ``(factors by canonical name, skipped keys, format)``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    skipped: list[str] = []
    for key, t in sd.items():
        split = _split_key(key)
        if split is None:
            skipped.append(key)
            continue
        modules.setdefault(split[0], {})[split[1]] = t
    fmt = _guess_format(modules)
    factors: dict[str, LoraFactor] = {}
    dense_kinds: set[str] = set()
    for prefix, roles in modules.items():
        canon = canonical_from_prefix(prefix, component_hint)
        if canon is None:
            skipped.extend(f"{prefix}.{r}" for r in roles)
            continue
        if "dora" in roles:
            raise MoleError(f"expert {name!r}: {prefix} is a PEFT DoRA module (lora_magnitude_vector); DoRA is read "
                            "in the kohya / LyCORIS layout (dora_scale)")
        check_module(name, prefix, roles)
        kind = module_kind(roles)
        if kind is None and roles.keys() <= {"alpha", "diff_b"}:
            skipped.extend(f"{prefix}.{r}" for r in roles)
            continue
        _check_parts(name, prefix, kind, roles)
        if kind == "LoRA":
            f = _lora_factor(roles, canon, _peft_cfg_for(canon, peft_config, adapter_metadata))
            if "dora_scale" in roles:  # its LoRA part stays as read; the delta is redone against the weight
                f.pending = WeightDependent(kind, roles)
                dense_kinds.add(f.pending.label)
        elif kind in WEIGHT_KINDS:  # resolved against the layer's weight when attached; no factors until then
            f = LoraFactor(down=torch.zeros(0, 0), up=torch.zeros(0, 0), scale_override=1.0, dense=True,
                           pending=WeightDependent(kind, roles))
            dense_kinds.add(f.pending.label)
        else:  # LoHa, LoKr, diff: the exact dense delta now (DoRA on LoRA, LoHa, LoKr: redone against the weight)
            f = _dense_factor(name, prefix, kind, roles)
            if "dora_scale" in roles:
                f.pending = WeightDependent(kind, roles)
            dense_kinds.add(f.pending.label if f.pending else kind)
        if canon in factors:
            raise MoleError(f"expert {name!r}: two keys map to the same target {canon} (e.g. {prefix})")
        factors[canon] = f
    if dense_kinds:
        warnings.warn(f"expert {name!r}: {', '.join(sorted(dense_kinds))} modules are applied through an exact "
                      "dense delta (slower, more memory than LoRA; DoRA's, GLoRA's, OFT's and BOFT's are computed "
                      "against each layer's weight when attached)", MoleWarning, stacklevel=3)
    return factors, skipped, fmt


def _peft_cfg_for(canon: str, peft_config: dict | None, adapter_metadata: dict | None) -> _PeftConfig | None:
    if peft_config is not None:
        return _PeftConfig(peft_config)
    if adapter_metadata:
        comp = canon.split(":", 1)[0]
        prefix = {"unet": "unet.", "te": "text_encoder.", "te2": "text_encoder_2."}[comp]
        sub = {k[len(prefix):]: v for k, v in adapter_metadata.items() if k.startswith(prefix)}
        if sub:
            return _PeftConfig(sub, "lora_adapter_metadata")
    return None


def _guess_format(modules: dict[str, dict]) -> str:
    prefixes = list(modules)
    if any(p.startswith(("lora_unet_", "lora_te", "lycoris_")) for p in prefixes):
        return "kohya"
    if any(p.startswith("diffusion_model.") or p.startswith("text_encoders.") for p in prefixes):
        return "comfyui"
    if any(p.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for p in prefixes):
        return "diffusers"
    if any(p.startswith("base_model.model.") for p in prefixes):
        return "peft"
    return "diffusers-peft" if prefixes else "unknown"


def load_expert(path: str | os.PathLike, *, strength: float = 1.0, name: str | None = None) -> Expert:
    """Read one LoRA (a ``.safetensors`` file or a PEFT folder) into an :class:`Expert`.

    Raises:
        MoleError: missing/pickled/truncated file, no LoRA keys, DoRA, malformed modules.
    """
    p = Path(path)
    label = name or p.name
    factors: dict[str, LoraFactor] = {}
    skipped: list[str] = []
    meta: dict[str, str] = {}
    if p.is_dir():
        parts = [(p / sub, hint) for sub, hint in _SUBFOLDERS.items() if (p / sub).is_dir()] or [(p, None)]
        fmt = "peft"
        for folder, hint in parts:
            weights = folder / "adapter_model.safetensors"
            if not weights.exists():
                pickled = folder / "adapter_model.bin"
                why = "only .safetensors are loaded (found adapter_model.bin)" if pickled.exists() else \
                    "no adapter_model.safetensors"
                raise MoleError(f"{folder}: {why}")
            cfg_path = folder / "adapter_config.json"
            cfg = _json_object(cfg_path.read_text(), str(cfg_path)) if cfg_path.exists() else None
            sd, m = read_safetensors(weights)
            meta.update(m)
            f, s, _ = factors_from_state_dict(sd, label, peft_config=cfg, component_hint=hint)
            factors.update(f)
            skipped += s
    else:
        sd, meta = read_safetensors(p)
        adapter_meta = _json_object(meta["lora_adapter_metadata"], f"{label}: lora_adapter_metadata") \
            if "lora_adapter_metadata" in meta else None
        factors, skipped, fmt = factors_from_state_dict(sd, label, adapter_metadata=adapter_meta)
    if not factors:
        lora_like = sorted({k.rsplit(".", 2)[0] for k in skipped if _split_key(k) is not None})
        if lora_like:
            raise MoleError(f"{label}: 0 of {len(lora_like)} LoRA modules map to a Stable Diffusion UNet or CLIP "
                            f"text encoder (e.g. {lora_like[0]}) — a LoRA for another model family?")
        example = f" (e.g. {skipped[0]})" if skipped else ""
        raise MoleError(f"{label}: no LoRA keys for a Stable Diffusion UNet or CLIP text encoder found{example}")
    if skipped:
        warnings.warn(f"{label}: {len(skipped)} tensors are no LoRA factor of a Stable Diffusion UNet or CLIP text "
                      f"encoder and are ignored (e.g. {skipped[0]})", MoleWarning, stacklevel=2)
    return Expert(name=label, factors=factors, sha256=file_sha256(p), path=str(p), format=fmt,
                  strength=strength, metadata=meta, skipped_keys=skipped)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"path/to/a.safetensors:0.8"`` → ``("path/to/a.safetensors", 0.8)``; strength defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"-?\d+(\.\d*)?([eE]-?\d+)?", tail):
        return head, check_number(tail, f"{Path(head).name}: strength")
    if sep and head and not os.path.exists(spec) and os.path.exists(head):
        raise MoleError(f"{Path(head).name}: strength {tail!r} after ':' is not a number (e.g. a.safetensors:0.8)")
    return spec, 1.0


def load_experts(specs: list[str | os.PathLike], strengths: list[float] | None = None) -> list[Expert]:
    """Load several LoRAs (``path`` or ``path:strength``); warn about duplicate files."""
    if not specs:
        raise MoleError("no LoRAs: give at least one LoRA file")
    experts: list[Expert] = []
    for i, spec in enumerate(specs):
        path, strength = parse_lora_spec(str(spec))
        if strengths is not None:
            strength = strengths[i]
        experts.append(load_expert(path, strength=strength))
    seen: dict[str, str] = {}
    for e in experts:
        if e.sha256 in seen:
            warnings.warn(f"experts {seen[e.sha256]!r} and {e.name!r} are the same file (sha256 {e.sha256[:12]})",
                          MoleWarning, stacklevel=2)
        seen.setdefault(e.sha256, e.name)
    return experts
