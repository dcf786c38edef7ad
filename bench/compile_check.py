"""torch.compile and device-copy checks for a UNet with MoLE gated attached (small SD1.5-topology UNet).

1. ``torch._dynamo.explain`` of the UNet with MoLE attached and of the bare UNet: graph and graph-break counts,
   and where each break comes from (mole_core or not).
2. ``torch.compile(mode="default")`` time-to-first-call, then compiled vs eager step time (A/B interleaved).
3. Expert-tensor copies per call: a profiled second call must not copy any ``A_cat``/``B_cat`` (host↔device or dtype
   cast), since banks cache them per device/dtype; checked in the run's dtype and, on CPU, in bf16 too.
``python bench/compile_check.py --json`` prints one JSON object last.
"""

from __future__ import annotations

import functools
import time
from argparse import Namespace

import common
import torch
from baselines import random_experts
from torch import nn

import mole_core as mole

BATCH = 2


def parse() -> Namespace:
    p = common.base_parser(__doc__.splitlines()[0], default_repeats=5)
    p.add_argument("--latent", type=int, default=None, help="latent side (default 16; 8 with --quick)")
    p.add_argument("--gate-input", default="input", choices=mole.gates.GATE_INPUTS,
                   help="what the gates read (prompt: the root pre-hook captures the context; default input)")
    p.add_argument("--no-compile", action="store_true", help="skip the inductor compile (explain, recompiles, copies)")
    p.add_argument("--force-compile", action="store_true",
                   help="time the inductor compile even when the dynamo run recompiles every call (minutes)")
    args = common.finish_args(p.parse_args(), default_repeats=5)
    args.latent = args.latent or (8 if args.quick else 16)
    return args


def micro_unet_config(quick: bool) -> dict:
    """SD1.5 block types and names at reduced depth: compile time grows with the graph, not the width."""
    if quick:
        return {"block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1,
                "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 16, "sample_size": 8}
    return {**common.sd15_unet_config("tiny"), "layers_per_block": 1}


def build(args: Namespace, dtype: torch.dtype) -> tuple[nn.Module, mole.Mixture, dict]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**micro_unet_config(args.quick)).to(args.device, dtype).eval().requires_grad_(False)
    mods = common.target_modules(unet, "attn")
    mix = mole.attach(unet, random_experts(mods, 3, 16, args.seed),
                      mole.GateConfig(granularity="block", gate_input=args.gate_input, init_std=0.01))
    return unet, mix, common.unet_inputs(unet, args.latent, BATCH, args.device, dtype, args.seed)


def step(unet: nn.Module, inputs: dict) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


# ----------------------------------------------------------------------------- dynamo explain
def explain(unet: nn.Module, inputs: dict) -> dict:
    """Graph and break counts; each break's reason and whether its user frames include mole_core."""
    torch._dynamo.reset()
    with torch.inference_mode():
        ex = torch._dynamo.explain(unet)(**inputs)
    breaks = []
    for r in ex.break_reasons:
        frames = [f"{f.filename.rsplit('/site-packages/', 1)[-1]}:{f.lineno} {f.name}" for f in r.user_stack]
        breaks.append({"reason": r.reason.splitlines()[0][:200], "in_mole_core": any("mole_core" in f for f in frames),
                       "frames": frames[-4:]})
    return {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count, "op_count": ex.op_count,
            "breaks_in_mole_core": sum(b["in_mole_core"] for b in breaks), "breaks": breaks}


# ----------------------------------------------------------------------------- recompiles
def recompiles(unet: nn.Module, inputs: dict, calls: int = 5) -> dict:
    """Dynamo-only (``backend="eager"``) run of several identical calls: graphs compiled after the second call
    (the first two fill caches) mean guards on state that changes every call. Reasons are attributed to files."""
    from torch._dynamo.utils import counters, guard_failures

    torch._dynamo.reset()
    guard_failures.clear()
    compiled = torch.compile(unet, backend="eager")
    start = int(counters["stats"]["unique_graphs"])
    graphs = []
    with torch.inference_mode():
        for _ in range(calls):
            step(compiled, inputs)
            graphs.append(int(counters["stats"]["unique_graphs"]) - start)
    reasons = [r for rs in guard_failures.values() for r in rs]
    where = sorted({_source(r) for r in reasons})
    torch._dynamo.reset()
    return {"graphs_per_call": graphs, "recompiles_after_second_call": graphs[-1] - graphs[1],
            "recompiles_every_call": graphs[-1] - graphs[1] >= calls - 2, "guard_failure_sources": where}


def _source(reason: str) -> str:
    """The ``file:line in fn`` comment dynamo appends to a failed guard (or the guard's tail)."""
    tail = reason.rsplit("#", 1)[-1].strip()
    if "mole_core" in reason and "mole_core" not in tail:
        tail = next((p.strip() for p in reason.split("#") if "mole_core/" in p), tail)
    tail = tail.split("(HINT")[0].strip()
    return (tail[tail.index("mole_core/"):] if "mole_core/" in tail else tail)[:160]


# ----------------------------------------------------------------------------- compile timing
def compile_timing(unet: nn.Module, inputs: dict, args: Namespace) -> dict:
    """First-call (compile) seconds, then compiled vs eager step time and output agreement."""
    torch._dynamo.reset()
    compiled = torch.compile(unet, mode="default")
    with torch.inference_mode():
        t0 = time.perf_counter()
        out_c = step(compiled, inputs)
        first = time.perf_counter() - t0
        out_e = step(unet, inputs)
        calls = {"eager": functools.partial(step, unet, inputs), "compiled": functools.partial(step, compiled, inputs)}
        for c in calls.values():
            c()
        t = common.interleave_calls(calls, args.repeats, 3, args.device)
    diff = float((out_c.float() - out_e.float()).abs().max() / out_e.float().abs().max())
    return {"compile_first_call_s": first, "eager_ms": 1e3 * t.median("eager"),
            "compiled_ms": 1e3 * t.median("compiled"), "ratio_compiled_vs_eager": t.ratio("compiled", "eager"),
            "max_rel_diff": diff}


# ----------------------------------------------------------------------------- copies
def expert_copies(unet: nn.Module, mix: mole.Mixture, inputs: dict, device: torch.device) -> dict:
    """Profile a second gated call: copies/casts whose source has an expert-bank shape, and host↔device memcpys."""
    from torch.profiler import ProfilerActivity, profile

    shapes = {tuple(b.a_cat.shape) for b in mix.banks.values()} | {tuple(b.b_cat.shape) for b in mix.banks.values()}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        step(unet, inputs)
        with profile(activities=acts, record_shapes=True) as prof:
            step(unet, inputs)
    copies = [e for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]
    expert = [e for e in copies if e.input_shapes and tuple(e.input_shapes[0]) in shapes]
    memcpy = [e for e in prof.events() if "Memcpy HtoD" in e.name or "Memcpy DtoH" in e.name]
    return {"copy_ops_per_call": len(copies), "expert_tensor_copies_per_call": len(expert),
            "memcpy_host_device_per_call": len(memcpy),
            "largest_copied_numel": max((_numel(e.input_shapes[0]) for e in copies if e.input_shapes), default=0)}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def table(res: dict) -> str:
    ex, bare = res["explain_mole"], res["explain_bare"]
    rows = [["graphs (MoLE attached / bare UNet)", f"{ex['graph_count']} / {bare['graph_count']}"],
            ["graph breaks (MoLE attached / bare UNet)", f"{ex['graph_break_count']} / {bare['graph_break_count']}"],
            ["graph breaks in mole_core", ex["breaks_in_mole_core"]],
            ["dynamo graphs after each of 5 calls", str(res["recompiles"]["graphs_per_call"])],
            ["recompiles after the 2nd call", res["recompiles"]["recompiles_after_second_call"]]]
    rows += [["guard failure at", s] for s in res["recompiles"]["guard_failure_sources"]]
    rows.append(["inductor compile", res["compile_status"]])
    if "compile" in res:
        c = res["compile"]
        rows += [["compile: first call s", c["compile_first_call_s"]], ["eager ms", c["eager_ms"]],
                 ["compiled ms", c["compiled_ms"]], ["compiled ÷ eager", c["ratio_compiled_vs_eager"]]]
    for k, v in res["copies"].items():
        rows += [[f"copies [{k}]: expert-tensor copies per call", v["expert_tensor_copies_per_call"]],
                 [f"copies [{k}]: host↔device memcpys per call", v["memcpy_host_device_per_call"]],
                 [f"copies [{k}]: all copy ops per call (activations)", v["copy_ops_per_call"]]]
    return common.format_table(["check", "value"], rows, f"torch.compile / copies (latent {res['latent']}², "
                                                         f"{res['dtype']}, {res['threads']} thread(s))")


def main() -> None:
    args = parse()
    unet, mix, inputs = build(args, args.dtype)
    common.log("compile_check: dynamo explain ...")
    res = {"bench": "compile_check", "latent": args.latent, "batch": BATCH, "dtype": common.dtype_name(args.dtype),
           "repeats": args.repeats, "quick": args.quick, "threads": torch.get_num_threads(),
           "threads_reason": args.threads_reason, "torch": torch.__version__, "machine": common.machine(args.device),
           "targets": len(mix.banks), "scopes": len(mix.scopes), "explain_mole": explain(unet, inputs)}
    mix.detach()
    res["explain_bare"] = explain(unet, inputs)
    unet, mix, inputs = build(args, args.dtype)
    common.log("compile_check: recompiles (dynamo, backend=eager) ...")
    res["recompiles"] = recompiles(unet, inputs)
    if args.no_compile or (args.quick and not args.force_compile):
        res["compile_status"] = "skipped (--no-compile / --quick)"
    elif res["recompiles"]["recompiles_every_call"] and not args.force_compile:
        res["compile_status"] = "skipped: recompiles every call (--force-compile to time it)"
    else:
        common.log("compile_check: torch.compile (inductor) ...")
        res["compile"] = compile_timing(unet, inputs, args)
        res["compile_status"] = "timed"
    common.log("compile_check: expert copies ...")
    res["copies"] = {common.dtype_name(args.dtype): expert_copies(unet, mix, inputs, args.device)}
    if args.dtype != torch.bfloat16:
        u16, m16, i16 = build(args, torch.bfloat16)
        res["copies"]["bf16"] = expert_copies(u16, m16, i16, args.device)
    res["graph_breaks_in_mole_core"] = res["explain_mole"]["breaks_in_mole_core"]
    res["graph_break_count"] = res["explain_mole"]["graph_break_count"]
    res["recompiles_after_second_call"] = res["recompiles"]["recompiles_after_second_call"]
    res["expert_tensor_copies_per_call"] = max(v["expert_tensor_copies_per_call"] for v in res["copies"].values())
    common.emit("compile_check", res, table(res), args.json)


if __name__ == "__main__":
    main()
