"""Cost of the training-free methods (issue #13): SD1.5-shaped UNet (random weights), one CFG-batched step
(batch 2), N experts of rank r on the attention projections.

Variants, all coexisting UNet objects over the same base weights, timed in interleaved rounds:

- ``base``: no LoRA;  ``merged``: expert 0 merged into private copies of the target weights (a single LoRA
  as LoraLoader applies it: free at sampling time);
- ``switch``: LoRA Switch through the hooks (one-hot row gates; every expert's shrink still runs);
- ``gated``: MoLE gated (block gates on the block input);
- ``composite``: LoRA Composite, **one** UNet call on N·2 rows (one-hot rows per block, blocks averaged);
- ``composite_separate``: the same average as N separate calls of merged single-LoRA UNets (how the paper's
  reference implementation runs it: one forward per LoRA).

``python bench/methods.py --json`` prints one JSON object as its last line (``--quick``: tiny width, latent 8).
"""

from __future__ import annotations

import functools
import time
from argparse import Namespace

import common
import torch
from baselines import random_experts, share_weights_copy
from torch import nn

import mole_core as mole
from train.method_hooks import MethodHooks

BATCH = 2


def parse() -> Namespace:
    p = common.base_parser(__doc__.splitlines()[0], default_repeats=3)
    p.add_argument("--latent", type=int, default=None, help="latent side (default 32; 8 with --quick)")
    p.add_argument("--experts", type=int, default=3, help="N")
    p.add_argument("--rank", type=int, default=16, help="r")
    p.add_argument("--size", choices=("full", "small", "tiny"), default=None, help="UNet width (default full; "
                   "--quick: tiny)")
    args = common.finish_args(p.parse_args(), default_repeats=3)
    args.latent = args.latent or (8 if args.quick else 32)
    args.size = args.size or ("tiny" if args.quick else "full")
    return args


def merged_copy(unet: nn.Module, experts: list[mole.Expert], expert: int) -> nn.Module:
    """A weight-sharing copy with one expert merged into private copies of its target weights."""
    copy_ = share_weights_copy(unet)
    weights = [1.0 if i == expert else 0.0 for i in range(len(experts))]
    mix = mole.attach(copy_, experts, mode="static", weights=weights)
    for name in mix.banks:
        m = copy_.get_submodule(name.split(":", 1)[1])
        m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)
    mole.bake_into_model(mix)
    return copy_


def hooked_copy(unet: nn.Module, experts: list[mole.Expert], method: str | None) -> nn.Module:
    copy_ = share_weights_copy(unet)
    if method is None:
        mole.attach(copy_, experts, mole.GateConfig(granularity="block", gate_input="input"))
    else:
        MethodHooks(copy_, mole.attach(copy_, experts, mode="uniform"), method, timesteps=[500])
    return copy_


def run(args: Namespace) -> dict:
    common.log(f"methods: building the {args.size} UNet ...")
    unet = common.build_unet(args.size, args.device, args.dtype, args.seed)
    experts = random_experts(common.target_modules(unet, "attn"), args.experts, args.rank, args.seed)
    inputs = common.unet_inputs(unet, args.latent, BATCH, args.device, args.dtype, args.seed)
    singles = [merged_copy(unet, experts, i) for i in range(args.experts)]
    units = {"base": unet, "merged": singles[0], "switch": hooked_copy(unet, experts, "switch"),
             "gated": hooked_copy(unet, experts, None), "composite": hooked_copy(unet, experts, "composite")}

    def step(u: nn.Module) -> torch.Tensor:
        return u(**inputs, return_dict=False)[0]

    def separate() -> torch.Tensor:
        return torch.stack([step(u) for u in singles]).mean(0)

    calls = {k: functools.partial(step, u) for k, u in units.items()} | {"composite_separate": separate}
    with torch.inference_mode():
        common.log("methods: warm-up and agreement ...")
        agree = float((calls["composite"]().float() - separate().float()).abs().max()
                      / separate().float().abs().max())
        common.log(f"methods: {args.repeats} interleaved rounds of {len(calls)} variants ...")
        t0 = time.perf_counter()
        t = common.interleave_calls(calls, args.repeats, 1, args.device)
        common.log(f"methods: rounds took {time.perf_counter() - t0:.0f} s")
    ms = {k: 1e3 * t.median(k) for k in calls}
    return {"bench": "methods", "unet": args.size, "latent": args.latent, "batch": BATCH, "N": args.experts,
            "r": args.rank, "dtype": common.dtype_name(args.dtype), "repeats": args.repeats, "quick": args.quick,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": common.machine(args.device),
            "ms": ms, "ratio_to_base": {k: t.ratio(k, "base") for k in calls},
            "composite_vs_separate": t.ratio("composite", "composite_separate"),
            "composite_vs_gated": t.ratio("composite", "gated"), "switch_vs_merged": t.ratio("switch", "merged"),
            "composite_max_rel_diff_vs_separate": agree, "noise_base": t.spread("base")}


def table(res: dict) -> str:
    rows = [[k, v, res["ratio_to_base"][k]] for k, v in res["ms"].items()]
    head = (f"LoRA Switch / Composite cost: {res['unet']} UNet, latent {res['latent']}, batch {res['batch']}, "
            f"N = {res['N']}, r = {res['r']}, {res['dtype']}, {res['repeats']} rounds")
    tail = (f"\ncomposite (one batched call) / N separate calls: {res['composite_vs_separate']:.2f}×; composite / "
            f"gated: {res['composite_vs_gated']:.2f}×; switch / merged single LoRA: {res['switch_vs_merged']:.2f}×; "
            f"composite vs separate max rel. diff {res['composite_max_rel_diff_vs_separate']:.1e}")
    return common.format_table(["variant", "ms / step", "× base"], rows, head) + tail


def main() -> None:
    args = parse()
    res = run(args)
    common.emit("methods", res, table(res), args.json)


if __name__ == "__main__":
    main()
