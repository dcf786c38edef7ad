"""Fixed per-layer cost of gated MoLE (issue #15): a CPU proxy for a GPU's launch-bound sampling step.

SD1.5 and SDXL UNet topologies at **tiny width** (compute ≈ 0, so what remains is the Python hook, op
dispatch and kernel-launch cost of every hooked layer), every attention q/k/v/out projection a LoRA target,
latent 8², batch 2, N experts of rank 16. Whole forwards are interleaved over ``--repeats`` rounds:

- ``base``: no LoRA;
- ``mole_gated``: MoLE gated (block gates on the block input);
- ``mole_fixed``: MoLE with fixed (uniform) weights through the same hooks;
- ``peft``: diffusers ``set_adapters`` with N PEFT adapters, unmerged;
- ``naive``: the official per-expert Python loop.

Reported per topology and N: added time per forward and per target over ``base``, the ratio of MoLE gated's
added time to PEFT's, and the aten ops per target (``torch.profiler``) of each variant.
``python bench/overhead.py --json`` prints one JSON object as its last line.
"""

from __future__ import annotations

from argparse import Namespace

import common
import torch
from baselines import NaiveLoop, add_peft_adapters, random_experts, share_weights_copy
from torch import nn

import mole_core as mole

BATCH = 2


def parse() -> Namespace:
    p = common.base_parser(__doc__.splitlines()[0], default_repeats=40)
    p.add_argument("--experts", default=None, help="comma list of N (default 1,3,8; --quick: 3)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--topologies", default="sd15,sdxl", help="sd15, sdxl")
    args = common.finish_args(p.parse_args(), default_repeats=40)
    if args.quick:
        args.repeats = min(args.repeats, 4)
    args.experts = [int(n) for n in (args.experts or ("3" if args.quick else "1,3,8")).split(",")]
    args.topologies = [t for t in args.topologies.split(",") if t]
    return args


def build(topology: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The topology at tiny width (random weights)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if topology == "sd15":
        return common.build_unet("tiny", device, dtype)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def inputs_for(unet: nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    x = common.unet_inputs(unet, 8, BATCH, device, dtype)
    if unet.config.addition_embed_type == "text_time":
        x["added_cond_kwargs"] = {"text_embeds": torch.randn(BATCH, 32, device=device, dtype=dtype),
                                  "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * BATCH, device=device, dtype=dtype)}
    return x


def variants(unet: nn.Module, n: int, args: Namespace) -> tuple[dict[str, nn.Module], int]:
    mods = common.target_modules(unet, "attn")
    experts = random_experts(mods, n, args.rank, args.seed)
    out = {"base": unet}
    gated = share_weights_copy(unet)
    mole.attach(gated, experts, mole.GateConfig(granularity="block", gate_input="input"))
    out["mole_gated"] = gated
    fixed = share_weights_copy(unet)
    mole.attach(fixed, experts, mode="uniform")
    out["mole_fixed"] = fixed
    out["peft"] = add_peft_adapters(share_weights_copy(unet), experts, [1.0 / n] * n)
    naive = share_weights_copy(unet)
    NaiveLoop(common.target_modules(naive, "attn"), experts, args.device, args.dtype).attach()
    out["naive"] = naive
    return out, len(mods)


def ops_per_call(fn) -> int:  # noqa: ANN001
    """aten ops run by one call (CPU dispatcher events; kernel launches on CUDA are at most this many)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def run(args: Namespace) -> dict:
    rows = []
    for topology in args.topologies:
        unet = build(topology, args.device, args.dtype)
        inputs = inputs_for(unet, args.device, args.dtype)
        for n in args.experts:
            common.log(f"overhead: {topology}, N = {n} ...")
            units, targets = variants(unet, n, args)
            calls = {k: (lambda u=u, inputs=inputs: u(**inputs, return_dict=False)[0]) for k, u in units.items()}
            with torch.inference_mode():
                for c in calls.values():
                    c()
                ops = {k: ops_per_call(c) for k, c in calls.items()}
                t = common.interleave_calls(calls, args.repeats, 1, args.device)
            base = t.median("base")
            added = {k: 1e3 * (t.median(k) - base) for k in calls if k != "base"}
            rows.append({"topology": topology, "N": n, "targets": targets, "base_ms": 1e3 * base,
                         "added_ms": added, "added_us_per_target": {k: 1e3 * v / targets for k, v in added.items()},
                         "ops_per_target": {k: (ops[k] - ops["base"]) / targets for k in calls if k != "base"},
                         "gated_vs_peft": added["mole_gated"] / added["peft"] if added["peft"] > 0 else float("nan"),
                         "noise_base": t.spread("base")})
            del units
    return {"bench": "overhead", "latent": 8, "batch": BATCH, "r": args.rank, "repeats": args.repeats,
            "quick": args.quick, "dtype": common.dtype_name(args.dtype), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": common.machine(args.device), "rows": rows,
            "gated_vs_peft": {f"{r['topology']}_N{r['N']}": r["gated_vs_peft"] for r in rows}}


def table(res: dict) -> str:
    head = ["topology", "N", "targets", "base ms", "gated +ms", "fixed +ms", "peft +ms", "naive +ms",
            "gated µs/target", "gated/peft", "ops/target gated", "peft", "naive"]
    rows = [[r["topology"], r["N"], r["targets"], r["base_ms"], r["added_ms"]["mole_gated"],
             r["added_ms"]["mole_fixed"], r["added_ms"]["peft"], r["added_ms"]["naive"],
             r["added_us_per_target"]["mole_gated"], r["gated_vs_peft"], r["ops_per_target"]["mole_gated"],
             r["ops_per_target"]["peft"], r["ops_per_target"]["naive"]] for r in res["rows"]]
    return common.format_table(head, rows, f"Per-layer overhead proxy: tiny-width UNets, latent 8², batch {BATCH}, "
                               f"r = {res['r']}, {res['repeats']} interleaved rounds, {res['dtype']}")


def main() -> None:
    args = parse()
    res = run(args)
    common.emit("overhead", res, table(res), args.json)


if __name__ == "__main__":
    main()
