"""GPU sampling time (issue #15): SD1.5 and SDXL UNet shapes (random weights) in bf16, a 20-step Euler loop with
CFG (batch 2), CUDA-event timing: base vs MoLE gated vs the same mixture merged into the weights, eager and
``torch.compile``d. Runs unchanged on CPU (``--quick``: tiny widths, a few steps) so the script stays tested;
the numbers that matter come from a GPU: ``python bench/gpu.py --device cuda --json``.
"""

from __future__ import annotations

import time
from argparse import Namespace

import common
import torch
from baselines import random_experts, share_weights_copy
from torch import nn

import mole_core as mole

BATCH = 2


def parse() -> Namespace:
    p = common.base_parser(__doc__.splitlines()[0], default_repeats=3)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; --quick 3)")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--models", default="sd15,sdxl", help="sd15, sdxl")
    p.add_argument("--compile", action=__import__("argparse").BooleanOptionalAction, default=None,
                   help="also time torch.compile (default: on CUDA only)")
    args = common.finish_args(p.parse_args(), default_repeats=3)
    args.steps = args.steps or (3 if args.quick else 20)
    args.models = [m for m in args.models.split(",") if m]
    if args.compile is None:
        args.compile = args.device.type == "cuda"
    return args


def build(model: str, quick: bool, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """The UNet (SD1.5: latent 64² = 512 px; SDXL: 128² = 1024 px) and its latent side; tiny widths with --quick."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "sd15":
        return common.build_unet("tiny" if quick else "full", device, dtype), 8 if quick else 64
    cfg = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816)
    if quick:
        cfg.update(block_out_channels=(32, 64, 64), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    unet = UNet2DConditionModel(**cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return unet, 8 if quick else 128


def inputs_for(unet: nn.Module, side: int, device: torch.device, dtype: torch.dtype) -> dict:
    x = common.unet_inputs(unet, side, BATCH, device, dtype)
    if unet.config.addition_embed_type == "text_time":
        text = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        x["added_cond_kwargs"] = {"text_embeds": torch.randn(BATCH, text, device=device, dtype=dtype),
                                  "time_ids": torch.tensor([[side * 8.0, side * 8, 0, 0, side * 8, side * 8]] * BATCH,
                                                           device=device, dtype=dtype)}
    return x


def sampler(unet: nn.Module, inputs: dict, steps: int):  # noqa: ANN201
    """A 20-step Euler loop with CFG 5 on a fixed batch (the model calls of a real sampler, no scheduler)."""
    sigmas = torch.linspace(14.6, 0.0, steps + 1).tolist()

    def run() -> torch.Tensor:
        x = inputs["sample"][:1] * sigmas[0]
        for i in range(steps):
            t = torch.full((BATCH,), 999.0 * (1 - i / steps), device=x.device)
            eps = unet(**{**inputs, "sample": torch.cat([x, x]) / (sigmas[i] ** 2 + 1) ** 0.5, "timestep": t},
                       return_dict=False)[0]
            eps = eps[:1] + 5.0 * (eps[1:] - eps[:1])
            x = x + (sigmas[i + 1] - sigmas[i]) * eps
        return x
    return run


def variants(unet: nn.Module, args: Namespace) -> dict[str, nn.Module]:
    experts = random_experts(common.target_modules(unet, "attn"), args.experts, args.rank, args.seed)
    gated = share_weights_copy(unet)
    mole.attach(gated, experts, mole.GateConfig(granularity="block"))
    merged = share_weights_copy(unet)
    mix = mole.attach(merged, experts, mode="uniform")
    for name in mix.banks:
        m = merged.get_submodule(name.split(":", 1)[1])
        m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)
    mole.bake_into_model(mix)
    return {"base": unet, "gated": gated, "merged": merged}


def run(args: Namespace) -> dict:
    rows = []
    for model in args.models:
        common.log(f"gpu: building {model} ...")
        unet, side = build(model, args.quick, args.device, args.dtype)
        inputs = inputs_for(unet, side, args.device, args.dtype)
        units = variants(unet, args)
        if args.compile:
            units |= {f"{k}_compiled": torch.compile(u) for k, u in list(units.items())}
        calls = {k: sampler(u, inputs, args.steps) for k, u in units.items()}
        with torch.inference_mode():
            t0 = time.perf_counter()
            for c in calls.values():  # warm-up (and compilation)
                c()
            warm = time.perf_counter() - t0
            t = common.interleave_calls(calls, args.repeats, 1, args.device)
        ms = {k: 1e3 * t.median(k) for k in calls}
        rows.append({"model": model, "latent": side, "steps": args.steps, "ms": ms,
                     "ratio_to_base": {k: t.ratio(k, "base") for k in calls}, "warmup_s": warm})
        del units, calls
    return {"bench": "gpu", "quick": args.quick, "dtype": common.dtype_name(args.dtype), "N": args.experts,
            "r": args.rank, "repeats": args.repeats, "compile": args.compile, "machine": common.machine(args.device),
            "torch": torch.__version__, "rows": rows}


def table(res: dict) -> str:
    out = []
    for r in res["rows"]:
        rows = [[k, v, r["ratio_to_base"][k]] for k, v in r["ms"].items()]
        out.append(common.format_table(["variant", f"ms / {r['steps']} steps", "× base"], rows,
                                       f"{r['model']}, latent {r['latent']}², batch {BATCH}, {res['dtype']}, "
                                       f"N = {res['N']}, r = {res['r']}"))
    return "\n\n".join(out)


def main() -> None:
    args = parse()
    res = run(args)
    common.emit("gpu", res, table(res), args.json)


if __name__ == "__main__":
    main()
