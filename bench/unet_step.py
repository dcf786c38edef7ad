"""UNet step: SD1.5-shaped UNet (random weights), CFG batch 2, N experts of rank r on attention projections
(and on all attention + FF + proj layers): base vs MoLE gated, MoLE static merged, diffusers/PEFT unmerged
multi-adapter and the official-style per-expert loop.

Every variant is its own UNet object sharing the base weights (static merged gets private copies of its target
weights), so all coexist and each round calls every variant once in a rotating order; ratios are medians of
per-round paired ratios. A replay pass (every target layer called on inputs captured from a real step) measures
the time each variant adds at the target layers with far less noise than whole steps. Gate cost is measured
the same way for several latent sizes. ``python bench/unet_step.py --json`` prints one JSON object last.
"""

from __future__ import annotations

import functools
import time
from argparse import Namespace
from collections.abc import Callable

import common
import torch
from baselines import NaiveLoop, add_peft_adapters, random_experts, share_weights_copy
from torch import nn

import mole_core as mole
from mole_core.gates import pool_input

BATCH = 2
Call = Callable[[], object]


def parse() -> Namespace:
    p = common.base_parser(__doc__.splitlines()[0], default_repeats=3)
    p.add_argument("--latent", type=int, default=None, help="latent side (default 32; 8 with --quick)")
    p.add_argument("--experts", type=int, default=3, help="N")
    p.add_argument("--rank", type=int, default=16, help="r")
    p.add_argument("--size", choices=("full", "small", "tiny"), default=None,
                   help="UNet width: full SD1.5 (default) or the narrower same-topology models (--quick: tiny)")
    p.add_argument("--sets", default="attn,all", help="target sets for the replay: attn (to_q/k/v/out), "
                                                      "all (+ff, proj_in/out)")
    p.add_argument("--step-sets", default="attn", help="target sets also timed as whole steps")
    p.add_argument("--gate-latents", default=None, help="latent sides for the gate-cost check (default 32,64)")
    p.add_argument("--measure-gate-steps", action="store_true",
                   help="time a real base step at every gate latent (default: FLOP-scaled from the measured one)")
    args = common.finish_args(p.parse_args(), default_repeats=3)
    args.latent = args.latent or (8 if args.quick else 32)
    args.size = args.size or ("tiny" if args.quick else "full")
    args.sets = [s for s in args.sets.split(",") if s]
    args.step_sets = [s for s in args.step_sets.split(",") if s]
    args.sets += [s for s in args.step_sets if s not in args.sets]
    gl = args.gate_latents or ("8,16" if args.quick else "32,64")
    args.gate_latents = [int(v) for v in gl.split(",") if v]
    return args


# ----------------------------------------------------------------------------- variants
def clone_target_weights(unet: nn.Module, targets: list[str]) -> None:
    """Give the target layers of a weight-sharing copy private weights (so merging leaves the base intact)."""
    for name in targets:
        m = unet.get_submodule(name.split(":", 1)[1])
        m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)


def build_set(unet: nn.Module, kind: str, args: Namespace, with_static: bool) -> tuple[dict[str, nn.Module], dict]:
    """The variants of one target set, as UNet objects, and facts about the set."""
    mods = common.target_modules(unet, kind)
    experts = random_experts(mods, args.experts, args.rank, args.seed)
    n = args.experts
    units: dict[str, nn.Module] = {}
    gated = share_weights_copy(unet)
    mix = mole.attach(gated, experts, mole.GateConfig(granularity="block", gate_input="input"))
    units[f"mole_gated:{kind}"] = gated
    if with_static:
        static = share_weights_copy(unet)
        clone_target_weights(static, list(mods))
        mole.bake_into_model(mole.attach(static, experts, mode="uniform"))
        units[f"mole_static:{kind}"] = static
    units[f"diffusers:{kind}"] = add_peft_adapters(share_weights_copy(unet), experts, [1.0 / n] * n)
    naive_unet = share_weights_copy(unet)
    naive = NaiveLoop(common.target_modules(naive_unet, kind), experts, args.device, args.dtype).attach()
    units[f"naive:{kind}"] = naive_unet
    info = {"targets": len(mods), "scopes": len(mix.scopes), "mixture": mix, "naive": naive,
            "target_names": list(mods)}
    return units, info


def step(unet: nn.Module, inputs: dict) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


# ----------------------------------------------------------------------------- replay (per-target cost)
def capture(unet: nn.Module, names: list[str], inputs: dict) -> list[tuple[str, torch.Tensor]]:
    """One base step; the first input of every named layer, in execution order."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [unet.get_submodule(n.split(":", 1)[1]).register_forward_hook(
        lambda m, a, o, n=n: order.append((n, a[0].clone()))) for n in names]
    try:
        step(unet, inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def replay_call(unet: nn.Module, order: list[tuple[str, torch.Tensor]]) -> Call:
    """Call every captured target layer of ``unet`` on its captured input, in execution order."""
    layers = [(unet.get_submodule(n.split(":", 1)[1]), x) for n, x in order]

    def run() -> None:
        for m, x in layers:
            m(x)
    return run


def replay(units: dict[str, nn.Module], order: list, args: Namespace) -> dict[str, float]:
    """Milliseconds each variant adds at its target layers (median of interleaved rounds, minus base)."""
    calls = {k: replay_call(u, order) for k, u in units.items()}
    for c in calls.values():
        c()
    t = common.interleave_calls(calls, rounds=max(3, args.repeats), inner=1, device=args.device)
    kind = next(k for k in units if k != "base").split(":")[1]
    return {k: 1e3 * t.added(k, "base") for k in units if k != "base"} | {f"base_layers:{kind}": 1e3 * t.median("base")}


# ----------------------------------------------------------------------------- gate cost
def gate_ms(mix: mole.Mixture, meta: nn.Module, latent: int, args: Namespace) -> float:
    """Time of every scope's gate (pool, RMS-norm, router, softmax, statistics) on inputs shaped like the lead
    layers' inputs at this latent size (shapes from a meta-device forward)."""
    leads = {s.lead: s for s in mix.scopes.values()}
    meta_in = common.unet_inputs(meta, latent, BATCH, torch.device("meta"), args.dtype)
    shapes = common.input_shapes(meta, [n.split(":", 1)[1] for n in leads], lambda: step(meta, meta_in))
    work = [(mix.scope_gate(s.name), s.name, torch.randn(shapes[n.split(":", 1)[1]], device=args.device,
                                                         dtype=args.dtype), mix.banks[n].is_conv)
            for n, s in leads.items()]

    def gates() -> None:
        for gate, scope, x, conv in work:
            mix.stats.record(scope, gate(pool_input(x, conv).to(torch.float32)))

    with torch.inference_mode():
        gates()
        t = common.interleave_calls({"gates": gates}, rounds=5, inner=5, device=args.device)
    mix.stats.reset()
    return 1e3 * t.median("gates")


def gate_cost(unet: nn.Module, meta: nn.Module, mix: mole.Mixture, base_ms: float, args: Namespace) -> dict:
    """Gate time vs base step time per latent size (step times other than ``--latent`` FLOP-scaled unless
    ``--measure-gate-steps``)."""
    flops = {lat: common.count_flops(lambda lat=lat: step(meta, common.unet_inputs(
        meta, lat, BATCH, torch.device("meta"), args.dtype))) for lat in {args.latent, *args.gate_latents}}
    out = {}
    for lat in args.gate_latents:
        g = gate_ms(mix, meta, lat, args)
        if lat == args.latent:
            s, how = base_ms, "measured"
        elif args.measure_gate_steps:
            inputs = common.unet_inputs(unet, lat, BATCH, args.device, args.dtype, args.seed)
            with torch.inference_mode():
                call = functools.partial(step, unet, inputs)
                s, how = 1e3 * common.time_calls(call, 1, args.device), "measured (1 call)"
        else:
            s, how = base_ms * flops[lat] / flops[args.latent], "FLOP-scaled"
        out[str(lat)] = {"gate_ms": g, "step_ms": s, "step_ms_source": how, "fraction": g / s,
                         "unet_gflop": flops[lat] / 1e9}
    return out


# ----------------------------------------------------------------------------- report
def agreement(outs: dict[str, torch.Tensor], sets: list[str]) -> dict[str, float]:
    """Max difference of every LoRA variant from diffusers/PEFT on the same set, relative to its max |output|
    (at uniform gates all variants compute the same mixture)."""
    diffs = {}
    for kind in sets:
        ref = outs.get(f"diffusers:{kind}")
        if ref is None:
            continue
        scale = float(ref.abs().max().clamp_min(1e-12))
        for k, o in outs.items():
            if k.endswith(f":{kind}") and not k.startswith("diffusers"):
                diffs[k] = float((o - ref).abs().max()) / scale
    return diffs


def step_ratios(t: common.Timings, kind: str) -> dict[str, float]:
    """Headline ratios of one target set from whole-step timings."""
    sfx = "" if kind == "attn" else f"_{kind}"
    gated, naive = f"mole_gated:{kind}", f"naive:{kind}"
    out = {f"ratio_gated_vs_base{sfx}": t.ratio(gated, "base"),
           f"ratio_static_vs_base{sfx}": t.ratio(f"mole_static:{kind}", "base"),
           f"ratio_vs_diffusers_unmerged{sfx}": t.ratio(gated, f"diffusers:{kind}"),
           f"ratio_diffusers_vs_base{sfx}": t.ratio(f"diffusers:{kind}", "base"),
           f"ratio_naive_vs_base{sfx}": t.ratio(naive, "base")}
    naive_added = t.added(naive, "base")
    out[f"added_time_vs_naive_loop_step{sfx}"] = (t.added(gated, "base") / naive_added if naive_added > 0
                                                  else float("nan"))
    return out


def replay_ratios(rep: dict[str, float], base_ms: float, kind: str) -> dict[str, float]:
    """Headline ratios of one target set from the replay (base step + time added at the targets)."""
    sfx = "" if kind == "attn" else f"_{kind}"
    g, d, nv = rep[f"mole_gated:{kind}"], rep[f"diffusers:{kind}"], rep[f"naive:{kind}"]
    return {f"replay_ratio_gated_vs_base{sfx}": 1 + g / base_ms,
            f"replay_ratio_vs_diffusers_unmerged{sfx}": (base_ms + g) / (base_ms + d),
            f"replay_ratio_diffusers_vs_base{sfx}": 1 + d / base_ms,
            f"replay_ratio_naive_vs_base{sfx}": 1 + nv / base_ms,
            f"added_time_vs_naive_loop{sfx}": g / nv if nv > 0 else float("nan")}


def table(res: dict) -> str:
    pk = res["peak_mib"]
    rows = [[k, v, res["ratio_to_base"][k], pk[k], 1024 * (pk[k] - pk["base"])] for k, v in res["ms"].items()]
    title = (f"UNet step ({res['unet']}, {res['params_M']:.0f} M params, latent {res['latent']}², batch {BATCH}, "
             f"N={res['N']}, r={res['r']}, {res['dtype']}, {res['threads']} thread(s), {res['repeats']} rounds)")
    main = common.format_table(["variant", "median ms", "× base", "peak MiB", "Δ peak KiB"], rows, title)
    rep = [[k, v, 1 + v / res["ms"]["base"]] for k, v in res["replay_added_ms"].items()
           if not k.startswith("base_layers")]
    rep_t = common.format_table(["variant", "added ms", "≈ × base step"], rep,
                                "replay: time added at the target layers (≈ × base step = 1 + added / base step); "
                                + ", ".join(f"{k} {v:.0f} ms" for k, v in res["replay_added_ms"].items()
                                            if k.startswith("base_layers")))
    gate = [[f"{k}²", v["gate_ms"], v["step_ms"], v["step_ms_source"], 100 * v["fraction"]]
            for k, v in res["gate_cost"].items()]
    gate_t = common.format_table(["latent", "gate ms", "step ms", "step from", "gate %"], gate,
                                 f"gate computation ({res['scopes']['attn' if 'attn' in res['scopes'] else 0]} "
                                 "block scopes)")
    keys = [k for k in res if k.startswith(("ratio_", "added_time", "replay_"))
            and isinstance(res[k], float)]
    summary = common.format_table(["metric", "value"], [[k, res[k]] for k in keys], "headline ratios")
    return "\n\n".join([main, rep_t, gate_t, summary])


def run(args: Namespace) -> dict:
    common.log(f"unet_step: building the {args.size} UNet ...")
    unet = common.build_unet(args.size, args.device, args.dtype, args.seed)
    meta = common.meta_unet(args.size)
    inputs = common.unet_inputs(unet, args.latent, BATCH, args.device, args.dtype, args.seed)
    units: dict[str, nn.Module] = {"base": unet}
    infos = {}
    for kind in args.sets:
        common.log(f"unet_step: variants for target set {kind!r} ...")
        v, infos[kind] = build_set(unet, kind, args, with_static=kind in args.step_sets)
        units |= v
    step_units = {k: u for k, u in units.items() if k == "base" or k.split(":")[1] in args.step_sets}
    calls = {k: functools.partial(step, u, inputs) for k, u in step_units.items()}
    with torch.inference_mode():
        common.log("unet_step: capture + warm-up with peak memory ...")
        order = capture(unet, sorted({t for i in infos.values() for t in i["target_names"]}), inputs)
        peaks, outs = {}, {}
        for k, c in calls.items():
            with common.PeakMemory(args.device) as pm:
                outs[k] = c().float()
            peaks[k] = pm.peak_mib
        diffs = agreement(outs, args.step_sets)
        del outs
        common.log(f"unet_step: {args.repeats} interleaved rounds of {len(calls)} variants ...")
        t0 = time.perf_counter()
        t = common.interleave_calls(calls, args.repeats, 1, args.device)
        common.log(f"unet_step: rounds took {time.perf_counter() - t0:.0f} s; replay of the target layers ...")
        rep: dict[str, float] = {}
        for kind in args.sets:
            sub = {"base": unet} | {k: u for k, u in units.items() if k.endswith(f":{kind}") and "static" not in k}
            names = set(infos[kind]["target_names"])
            rep |= replay(sub, [(n, x) for n, x in order if n in names], args)
    del order
    base_ms = 1e3 * t.median("base")
    common.log("unet_step: gate cost ...")
    first = args.sets[0]
    gc = gate_cost(unet, meta, infos[first]["mixture"], base_ms, args)
    res = {"bench": "unet_step", "unet": args.size, "params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
           "latent": args.latent, "batch": BATCH, "text_tokens": 77, "N": args.experts, "r": args.rank,
           "dtype": common.dtype_name(args.dtype), "repeats": args.repeats, "quick": args.quick,
           "threads": torch.get_num_threads(), "threads_reason": args.threads_reason, "torch": torch.__version__,
           "machine": common.machine(args.device),
           "shapes": {"sample": list(inputs["sample"].shape), "text": list(inputs["encoder_hidden_states"].shape)},
           "targets": {k: i["targets"] for k, i in infos.items()}, "scopes": {k: i["scopes"] for k, i in infos.items()},
           "ms": {k: 1e3 * t.median(k) for k in calls}, "ratio_to_base": {k: t.ratio(k, "base") for k in calls},
           "samples_ms": {k: [1e3 * s for s in v] for k, v in t.samples.items()}, "noise_base": t.spread("base"),
           "peak_mib": peaks, "max_rel_diff_vs_diffusers": diffs, "replay_added_ms": rep, "gate_cost": gc,
           "gate_fraction_max_latent": gc[str(max(args.gate_latents))]["fraction"]}
    for kind in args.step_sets:
        res |= step_ratios(t, kind)
    for kind in args.sets:
        res |= replay_ratios(rep, base_ms, kind)
    return res


def main() -> None:
    args = parse()
    res = run(args)
    common.emit("unet_step", res, table(res), args.json)


if __name__ == "__main__":
    main()
