"""One target layer: MoLE's stacked bank vs the base layer, the rank-R single-LoRA floor, the official-style
per-expert loop and a PEFT multi-adapter layer (same adapters, all active and weighted).

Shapes follow SD1.5 attention projections (Linear, batch 2 = CFG) and a 3×3 resnet conv with LoCon experts.
Every method runs on its own module object sharing the same weight tensors; methods are A/B interleaved
per round and each number is a median over rounds. Run ``python bench/layer.py --help``.
"""

from __future__ import annotations

import functools
import itertools
from argparse import Namespace
from collections.abc import Callable
from dataclasses import asdict, dataclass

import common
import torch
from baselines import NaiveLoop, add_peft_adapters, lora_floor, random_experts, share_weights_copy, stacked_factors
from torch import nn

import mole_core as mole
from mole_core.model_index import ModelIndex

LINEAR_TARGET = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV_TARGET = "unet:down_blocks.0.resnets.0.conv1"
BATCH = 2
METHODS = ("base", "floor", "mole", "naive", "peft")


@dataclass(frozen=True)
class Case:
    """One layer shape and expert set: ``tokens`` per sample (a square H×W for convs)."""

    kind: str  # linear | conv
    width: int
    tokens: int
    n: int
    r: int

    @property
    def label(self) -> str:
        side = int(self.tokens**0.5)
        where = f"{self.tokens}tok" if self.kind == "linear" else f"{side}x{side}"
        return f"{self.kind}{self.width}@{where}"


def cases(quick: bool) -> list[Case]:
    """The grid: shapes × N × r (reduced with ``--quick``)."""
    if quick:
        shapes = [("linear", 320, 1024), ("conv", 64, 256)]
        return [Case(k, w, t, n, r) for (k, w, t), n, r in itertools.product(shapes, (1, 3), (8, 16))]
    shapes = [("linear", 320, 4096), ("linear", 640, 1024), ("linear", 1280, 1024), ("conv", 320, 1024)]
    return [Case(k, w, t, n, r) for (k, w, t), n, r in itertools.product(shapes, (1, 3, 6, 8), (8, 16, 64))]


class _Root(nn.Module):
    """A one-layer model for ``mole.attach`` (the root pre-hook runs as in a UNet)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def build_layer(case: Case, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """The base layer (random weights) and one CFG-batched input."""
    torch.manual_seed(seed)
    if case.kind == "linear":
        layer: nn.Module = nn.Linear(case.width, case.width)
        x = torch.randn(BATCH, case.tokens, case.width)
    else:
        side = int(case.tokens**0.5)
        layer = nn.Conv2d(case.width, case.width, 3, padding=1)
        x = torch.randn(BATCH, case.width, side, side)
    return layer.to(device, dtype).eval().requires_grad_(False), x.to(device, dtype)


def flops(case: Case) -> tuple[float, float]:
    """Analytic FLOPs (2 × MACs) of the base layer and of one rank-R LoRA (R = N·r), per call."""
    rows, rank = BATCH * case.tokens, case.n * case.r
    k = 9 if case.kind == "conv" else 1
    base = 2.0 * rows * case.width * case.width * k
    lora = 2.0 * rows * rank * (case.width * k + case.width)
    return base, lora


def methods(case: Case, layer: nn.Module, seed: int, device: torch.device,
            dtype: torch.dtype) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], list]:
    """Callables for every method (each on its own weight-sharing module) and objects to keep alive."""
    target = LINEAR_TARGET if case.kind == "linear" else CONV_TARGET
    experts = random_experts({target: layer}, case.n, case.r, seed)
    weights = [1.0 / case.n] * case.n

    mole_root = _Root(share_weights_copy(layer))
    index = ModelIndex(modules={target: mole_root.layer}, roots={"unet": mole_root})
    mix = mole.attach(index, experts, mole.GateConfig(granularity="block", gate_input="input"))

    naive_layer = share_weights_copy(layer)
    naive = NaiveLoop({target: naive_layer}, experts, device, dtype).attach()

    peft_root = add_peft_adapters(_Root(share_weights_copy(layer)), experts, weights, use_diffusers=False,
                                  paths={target: "layer"})

    a, b = stacked_factors(experts, target)
    fns = {"base": layer, "floor": lora_floor(layer, a.to(device, dtype), b.to(device, dtype)),
           "mole": mole_root, "naive": naive_layer, "peft": peft_root}
    return fns, [mix, naive]


def agreement(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> float:
    """Max relative difference between MoLE, the loop and PEFT (uniform gates = PEFT weights 1/N)."""
    ref = fns["mole"](x).float()
    scale = ref.abs().max().clamp_min(1e-12)
    return max(float((fns[m](x).float() - ref).abs().max() / scale) for m in ("naive", "peft"))


def inner_calls(fn: Callable[[], object], device: torch.device, budget_s: float) -> int:
    """How many back-to-back calls make one measurement of about ``budget_s`` seconds."""
    t = min(common.time_calls(fn, 1, device) for _ in range(2))
    return max(1, min(200, round(budget_s / max(t, 1e-6))))


def run_case(case: Case, args: Namespace) -> dict:
    """Time every method on one case; ratios are medians of per-round paired ratios."""
    layer, x = build_layer(case, args.device, args.dtype, args.seed)
    with torch.inference_mode():
        fns, keep = methods(case, layer, args.seed, args.device, args.dtype)
        diff = agreement(fns, x)
        calls = {m: functools.partial(fns[m], x) for m in METHODS}
        for fn in calls.values():  # warm-up (first-call caches, allocator)
            fn()
        inner = inner_calls(calls["base"], args.device, 0.02 if args.quick else 0.05)
        t = common.interleave_calls(calls, args.repeats, inner, args.device)
    del keep
    f_base, f_lora = flops(case)
    flop_floor = t.median("base") * (f_base + f_lora) / f_base
    row = {**asdict(case), "label": case.label, "R": case.n * case.r, "inner": inner, "max_rel_diff": diff,
           "ms": {m: 1e3 * t.median(m) for m in METHODS}, "gflop_base": f_base / 1e9, "gflop_lora": f_lora / 1e9,
           "mole_vs_base": t.ratio("mole", "base"), "mole_vs_floor": t.ratio("mole", "floor"),
           "mole_vs_flop_floor": t.median("mole") / flop_floor, "naive_vs_base": t.ratio("naive", "base"),
           "peft_vs_base": t.ratio("peft", "base"), "floor_vs_base": t.ratio("floor", "base"),
           "mole_added_vs_naive": _added_ratio(t, "mole", "naive"), "noise_base": t.spread("base")}
    return row


def _added_ratio(t: common.Timings, a: str, b: str) -> float:
    added_b = t.added(b, "base")
    return t.added(a, "base") / added_b if added_b > 0 else float("nan")


def table(rows: list[dict]) -> str:
    headers = ["layer", "N", "r", "base ms", "floor×", "MoLE×", "MoLE/floor", "MoLE/FLOPfloor", "loop×", "PEFT×",
               "added vs loop"]
    body = [[r["label"], r["n"], r["r"], r["ms"]["base"], r["floor_vs_base"], r["mole_vs_base"], r["mole_vs_floor"],
             r["mole_vs_flop_floor"], r["naive_vs_base"], r["peft_vs_base"], r["mole_added_vs_naive"]]
            for r in rows]
    return common.format_table(headers, body, "layer bench: times as ratios to the base layer (× = ratio), "
                                              "medians of A/B-interleaved rounds")


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0], default_repeats=5)
    args = common.finish_args(p.parse_args(), default_repeats=5)
    rows = []
    for case in cases(args.quick):
        common.log(f"layer: {case.label} N={case.n} r={case.r}")
        rows.append(run_case(case, args))
    worst = max(rows, key=lambda r: r["mole_vs_floor"])
    result = {"bench": "layer", "dtype": common.dtype_name(args.dtype), "batch": BATCH, "repeats": args.repeats,
              "quick": args.quick, "machine": common.machine(args.device), "rows": rows,
              "max_mole_vs_floor": worst["mole_vs_floor"], "worst_case": f"{worst['label']} N={worst['n']} "
              f"r={worst['r']}", "target_mole_vs_floor": 1.3,
              "max_rel_diff": max(r["max_rel_diff"] for r in rows)}
    common.emit("layer", result, table(rows), args.json)


if __name__ == "__main__":
    main()
