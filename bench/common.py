"""Shared helpers for the benchmarks: CLI, device/dtype, interleaved timing, peak memory, models, output.

Importing this module puts the repository root on ``sys.path`` so ``python bench/<script>.py`` finds
``mole_core`` without an install.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "bench" / "out"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ATTN_SUFFIXES = (".to_q", ".to_k", ".to_v", ".to_out.0")
ALL_SUFFIXES = ATTN_SUFFIXES + (".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")
TARGET_SETS = {"attn": ATTN_SUFFIXES, "all": ALL_SUFFIXES}

Variant = Callable[[], AbstractContextManager[Callable[[], object]]]


# ----------------------------------------------------------------------------- CLI, device, dtype
def base_parser(description: str, default_repeats: int) -> argparse.ArgumentParser:
    """Arguments every benchmark shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--quick", action="store_true", help="reduced run (smoke test): small shapes, few repeats")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed A/B rounds (default {default_repeats}; 2 with --quick)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when present)")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, or 1 on a CPU whose load average is at least "
                        "half its cores: OpenMP threads that wait for a descheduled sibling make ops 10× slower)")
    p.add_argument("--seed", type=int, default=0)
    return p


def finish_args(args: argparse.Namespace, default_repeats: int) -> argparse.Namespace:
    """Resolve ``auto`` values, thread count and repeats in place."""
    if args.repeats is None:
        args.repeats = 2 if args.quick else default_repeats
    args.repeats = max(1, args.repeats)
    args.device = pick_device(args.device)
    args.threads_reason = pick_threads(args.threads, args.device)
    args.dtype = pick_dtype(args.dtype, args.device)
    if args.device.type == "cpu":
        torch.set_flush_denormal(True)  # random weights must not hit slow denormal paths
    torch.manual_seed(args.seed)
    return args


def pick_threads(threads: int | None, device: torch.device) -> str:
    """Set torch's intra-op thread count; returns why (reported with the results)."""
    if threads:
        torch.set_num_threads(threads)
        return "--threads"
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if device.type == "cpu" and cores > 1 and load >= cores / 2:
        torch.set_num_threads(1)
        log(f"note: load average {load:.1f} on {cores} cores: using 1 thread (pass --threads to override)")
        return f"busy CPU (load {load:.1f} on {cores} cores)"
    return "torch default"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing
@dataclass
class Timings:
    """Seconds per call, one value per timed round, for every variant (rounds are A/B interleaved)."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of the paired ratio ``a / b`` (both measured in the same round)."""
        return statistics.median(x / y for x, y in zip(self.samples[a], self.samples[b]))

    def added(self, a: str, base: str) -> float:
        """Median over rounds of the paired difference ``a − base`` (seconds)."""
        return statistics.median(x - y for x, y in zip(self.samples[a], self.samples[base]))

    def spread(self, name: str) -> float:
        """Relative spread (max − min) / median of a variant's rounds: the noise level of this run."""
        s = self.samples[name]
        return (max(s) - min(s)) / statistics.median(s)


def time_calls(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Mean seconds per call of ``inner`` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def interleave(variants: dict[str, Variant], rounds: int, device: torch.device, *, inner: int = 1,
               warmup: int = 1, on_warmup: Callable[[str, Callable[[], object]], None] | None = None) -> Timings:
    """Time every variant once per round, rotating the order each round (A/B interleaving).

    Each variant is a context-manager factory: entering sets it up (attach, merge) outside the timed
    region and yields the step function. ``on_warmup(name, fn)`` runs in place of the plain warmup
    calls (e.g. to record peak memory) when given.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            with variants[name]() as fn:
                if on_warmup is not None:
                    on_warmup(name, fn)
                else:
                    fn()
    out = Timings({n: [] for n in names})
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            with variants[name]() as fn:
                out.samples[name].append(time_calls(fn, inner, device))
    return out


def interleave_calls(fns: dict[str, Callable[[], object]], rounds: int, inner: int,
                     device: torch.device) -> Timings:
    """Fine-grained A/B interleaving for callables that coexist (no set-up between them).

    Each round calls every function ``inner`` times in a rotating order ``A B C … A B C …`` and times each
    call on its own (CUDA events on GPU); a round's sample for a function is the median of its calls, so a
    scheduler stall on a shared machine hits one call of one function, not a whole measurement.
    """
    names = list(fns)
    out = Timings({n: [] for n in names})
    for r in range(rounds):
        per: dict[str, list[float]] = {n: [] for n in names}
        for i in range(inner):
            k = (r + i) % len(names)
            for name in names[k:] + names[:k]:
                per[name].append(_one_call(fns[name], device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            per = {n: [ev[0].elapsed_time(ev[1]) / 1e3 for ev in v] for n, v in per.items()}  # type: ignore[index]
        for name in names:
            out.samples[name].append(statistics.median(per[name]))
    return out


def _one_call(fn: Callable[[], object], device: torch.device) -> Any:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak tensor memory allocated inside the block, above the level at entry.

    CUDA: the caching allocator's peak statistics. CPU: the torch profiler's memory events, accumulated in
    time order at operator granularity (allocations and frees of every op), so the peak of the live-tensor
    curve is exact up to transients inside one operator. The profiler slows the block: use it untimed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._prof: Any = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._prof.__exit__(*exc)
        live = peak = 0
        for e in sorted(self._prof.events(), key=lambda e: e.time_range.start):
            live += e.self_cpu_memory_usage
            peak = max(peak, live)
        self.peak_bytes = peak
        self._prof = None

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


# ----------------------------------------------------------------------------- machine, output
def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def finite_json(obj: Any) -> Any:
    """Replace non-finite floats by None so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def emit(name: str, result: dict[str, Any], table: str, as_json: bool) -> None:
    """Print the human table, save ``bench/out/<name>[_quick].json`` and, with ``--json``, print the JSON last."""
    print(table, flush=True)
    clean = finite_json(result)
    suffix = "_quick" if result.get("quick") else ""
    try:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / f"{name}{suffix}.json").write_text(json.dumps(clean, indent=1) + "\n")
    except OSError as e:  # read-only checkout: the stdout copy is enough
        print(f"(could not write {OUT_DIR}: {e})", file=sys.stderr)
    if as_json:
        print(json.dumps(clean), flush=True)


def format_table(headers: list[str], rows: list[list[Any]], title: str = "") -> str:
    """Plain-text table with right-aligned numbers."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def log(msg: str) -> None:
    """Progress line on stderr (stdout is reserved for the table and the JSON)."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models
def sd15_unet_config(size: str) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs: ``full`` = SD1.5 (860 M params); ``small``/``tiny``: same topology, narrower."""
    if size == "full":
        return {"cross_attention_dim": 768, "sample_size": 64}
    widths = {"small": (64, 128, 256, 256), "tiny": (32, 64, 64, 64)}[size]
    return {"block_out_channels": widths, "cross_attention_dim": 64 if size == "small" else 32,
            "attention_head_dim": 8, "norm_num_groups": 16 if size == "tiny" else 32, "sample_size": 8}


def build_unet(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """SD1.5-topology UNet with random weights, frozen, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd15_unet_config(size))
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def meta_unet(size: str) -> nn.Module:
    """The same UNet on the meta device (no memory, no compute): for shapes and FLOP counts."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**sd15_unet_config(size)).eval().requires_grad_(False)


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs (2 × MACs of matmuls/convs/attention) of everything ``fn`` runs, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def input_shapes(model: nn.Module, paths: list[str], call: Callable[[], object]) -> dict[str, tuple[int, ...]]:
    """Shape of the first input of each named submodule during ``call()`` (run it on the meta device)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(path: str, module: nn.Module, args: tuple, out: object) -> None:
        shapes.setdefault(path, tuple(args[0].shape))

    handles = [model.get_submodule(p).register_forward_hook(functools.partial(hook, p)) for p in paths]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return shapes


def unet_inputs(unet: nn.Module, latent: int, batch: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Latents, timestep and text states for one CFG-batched UNet call."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    return {"sample": sample.to(device, dtype), "timestep": torch.full((batch,), 500, device=device),
            "encoder_hidden_states": text.to(device, dtype)}


def target_modules(root: nn.Module, kind: str, component: str = "unet") -> dict[str, nn.Module]:
    """Canonical name → Linear/Conv2d for a target set (``attn`` or ``all``) inside attention blocks."""
    from mole_core import index_model

    suffixes = TARGET_SETS[kind]
    mods = index_model(root, component).modules
    return {k: m for k, m in mods.items() if ".attentions." in k and k.endswith(suffixes)}


@contextmanager
def no_grad_mode(train: bool) -> Iterator[None]:
    """``inference_mode`` for sampling, plain grad mode for training."""
    if train:
        yield
    else:
        with torch.inference_mode():
            yield
