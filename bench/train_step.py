"""Gate training: one denoise-objective iteration (batch 2) vs one sampling forward on the same SD1.5-shaped UNet
with MoLE gated attached, with and without gradient checkpointing; peak memory; analytic FLOPs of our iteration
and of the official MoLE recipe (rollout + VAE decode + CLIP) at equal resolution, counted on the meta device.

Iteration: x_t = add_noise(x_0, ε, t ~ U[0, 1000)), L = MSE(ε̂, ε) + 0.5 · balance_loss, backward, AdamW step on the
gate parameters only (UNet and experts frozen). ``python bench/train_step.py --json`` prints one JSON object last.
"""

from __future__ import annotations

import dataclasses
from argparse import Namespace
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F
from baselines import random_experts
from torch import nn

import mole_core as mole

BATCH = 2
BALANCE_ALPHA = 0.5
OFFICIAL_STEPS = 33.5  # E[K]: mean rollout length per iteration of the official recipe (see bench/README)


def parse() -> Namespace:
    p = common.base_parser(__doc__.splitlines()[0], default_repeats=3)
    p.add_argument("--latent", type=int, default=None, help="latent side for timing (default 32; 8 with --quick)")
    p.add_argument("--flop-latent", type=int, default=64, help="latent side of the FLOP comparison (64 = 512² px)")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", choices=("full", "small", "tiny"), default=None, help="UNet width (--quick: tiny)")
    args = common.finish_args(p.parse_args(), default_repeats=3)
    args.latent = args.latent or (8 if args.quick else 32)
    args.size = args.size or ("tiny" if args.quick else "full")
    return args


# ----------------------------------------------------------------------------- the iteration
def scheduler():
    """DDPM with the SD noise schedule (scaled_linear 0.00085–0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class Trainer:
    """Everything one gate-training iteration needs."""

    unet: nn.Module
    mix: mole.Mixture
    opt: torch.optim.Optimizer
    latents: torch.Tensor
    text: torch.Tensor
    sched: object
    gen: torch.Generator

    def noisy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.randint(0, 1000, (self.latents.shape[0],), generator=self.gen).to(self.latents.device)
        noise = torch.randn(self.latents.shape, generator=self.gen).to(self.latents)
        return self.sched.add_noise(self.latents, noise, t), noise, t  # type: ignore[attr-defined]

    def iteration(self) -> float:
        """Denoise loss + balance loss, backward, AdamW step on the gates."""
        x_t, noise, t = self.noisy()
        pred = self.unet(x_t, t, self.text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float()) + BALANCE_ALPHA * self.mix.balance_loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.mix.clear_live_gates()
        return float(loss.detach())

    def sample_forward(self) -> torch.Tensor:
        """One sampling forward (inference mode, gates live)."""
        x_t, _, t = self.noisy()
        with torch.inference_mode():
            out = self.unet(x_t, t, self.text, return_dict=False)[0]
        self.mix.clear_live_gates()
        return out


def build(args: Namespace) -> Trainer:
    unet = common.build_unet(args.size, args.device, args.dtype, args.seed)
    mods = common.target_modules(unet, "attn")
    experts = random_experts(mods, args.experts, args.rank, args.seed)
    mix = mole.attach(unet, experts, mole.GateConfig(granularity="block", gate_input="input", init_std=0.01))
    opt = torch.optim.AdamW(mix.gate_parameters(), lr=1e-3)
    inputs = common.unet_inputs(unet, args.latent, BATCH, args.device, args.dtype, args.seed)
    return Trainer(unet, mix, opt, inputs["sample"], inputs["encoder_hidden_states"], scheduler(),
                   torch.Generator().manual_seed(args.seed))


@contextmanager
def mode(tr: Trainer, train: bool, checkpointing: bool) -> Iterator[None]:
    """Train/eval mode and diffusers gradient checkpointing for one variant.

    Gate statistics are reset on entry: ``GateStats`` accumulates in place, so sums created under
    ``inference_mode`` (sampling) cannot be updated by a later training forward (engine issue, see README).
    """
    tr.mix.stats.reset()
    tr.unet.train(train)
    if checkpointing:
        tr.unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if checkpointing:
            tr.unet.disable_gradient_checkpointing()
        tr.unet.eval()


def variants(tr: Trainer) -> dict[str, common.Variant]:
    def make(train: bool, ckpt: bool, fn: Callable[[], object]) -> common.Variant:
        @contextmanager
        def ctx() -> Iterator[Callable[[], object]]:
            with mode(tr, train, ckpt):
                yield fn
        return ctx
    return {"sample_forward": make(False, False, tr.sample_forward), "train_iter": make(True, False, tr.iteration),
            "train_iter_ckpt": make(True, True, tr.iteration)}


def gate_grads(tr: Trainer, checkpointing: bool) -> tuple[list[torch.Tensor], int]:
    """Gate gradients of one fixed batch (no optimizer step), and how many gate rows the statistics recorded."""
    tr.mix.stats.reset()
    state = tr.gen.get_state()
    with mode(tr, True, checkpointing):
        x_t, noise, t = tr.noisy()
        pred = tr.unet(x_t, t, tr.text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float()) + BALANCE_ALPHA * tr.mix.balance_loss()
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
    tr.gen.set_state(state)
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tr.mix.gate_parameters()]
    tr.opt.zero_grad(set_to_none=True)
    tr.mix.clear_live_gates()
    samples = tr.mix.stats.summary()["samples"]
    tr.mix.stats.reset()
    return grads, samples


def checkpoint_check(tr: Trainer, args: Namespace) -> dict:
    """MoLE hooks under diffusers' (non-reentrant) checkpointing: same gate gradients, and statistics count
    (on an 8² latent: a correctness check, not a timing)."""
    small = common.unet_inputs(tr.unet, 8, BATCH, args.device, args.dtype, args.seed)
    tr = dataclasses.replace(tr, latents=small["sample"], text=small["encoder_hidden_states"])
    g0, s0 = gate_grads(tr, False)
    g1, s1 = gate_grads(tr, True)
    scale = max(float(g.abs().max()) for g in g0) or 1.0
    diff = max(float((a - b).abs().max()) for a, b in zip(g0, g1)) / scale
    return {"ckpt_grad_max_rel_diff": diff, "gate_grad_nonzero": scale > 0, "stats_rows_plain": s0,
            "stats_rows_ckpt": s1, "stats_double_count_under_ckpt": s1 > s0}


# ----------------------------------------------------------------------------- FLOPs (meta device)
def clip_configs():
    """OpenAI CLIP ViT-B/16 towers (the official recipe's loss model) and the SD1.x text encoder (ViT-L/14 text)."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)
    text_b16 = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                              max_position_embeddings=77)
    text_sd = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             max_position_embeddings=77)
    return vision, text_b16, text_sd


def _meta(ctor: Callable[[], nn.Module], trainable: bool = False) -> nn.Module:
    with torch.device("meta"):
        return ctor().eval().requires_grad_(trainable)


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """``(forward FLOPs, forward+backward FLOPs)`` of a scalar-producing function."""
    fwd = common.count_flops(fn)
    both = common.count_flops(lambda: fn().sum().backward())
    return fwd, both


def unet_flops(size: str, latent: int, args: Namespace, experts: bool = True) -> dict[str, float]:
    """UNet forward, and forward+backward (gates trainable; optional checkpoint recompute), MoLE attached."""
    meta = common.meta_unet(size)
    if experts:
        mods = common.target_modules(meta, "attn")  # factors are made on the CPU from the layers' shapes
        experts = random_experts(mods, args.experts, args.rank, args.seed)
        mole.attach(meta, experts, mole.GateConfig(granularity="block"))
    inp = common.unet_inputs(meta, latent, BATCH, torch.device("meta"), torch.float32)
    if not experts:  # no gates: the gradient reaches the input, as it nearly does from the official first gate
        inp["sample"].requires_grad_(True)
    call = lambda: meta(**inp, return_dict=False)[0]  # noqa: E731
    fwd, both = _fwd_bwd(call)
    meta.train()
    meta.enable_gradient_checkpointing()
    _, both_ckpt = _fwd_bwd(call)
    return {"fwd": fwd, "fwd_bwd": both, "fwd_bwd_ckpt": both_ckpt}


def official_flops(args: Namespace, unet_fb_ckpt: float) -> dict[str, float]:
    """FLOPs of one official MoLE training iteration at the UNet latent ``--flop-latent`` (512² px for 64).

    Per denoising step: UNet fwd+bwd (B=2, checkpoint recompute) + 2 VAE decodes + 1 decoder backward (input grads)
    + CLIP ViT-B/16: 3 image + 1 text forwards, 1 image + 1 text backward with weight grads (CLIP is not frozen)
    + SD text encoder fwd+bwd (B=2, 77 tokens; the text gates need it). Per iteration: E[K] = 33.5 steps
    + 2 VAE encodes (instance + class image).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPVisionModel

    px = args.flop_latent * 8
    vae = _meta(lambda: AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=px))
    z = torch.empty(1, 4, args.flop_latent, args.flop_latent, device="meta", requires_grad=True)
    dec_f, dec_fb = _fwd_bwd(lambda: vae.decode(z, return_dict=False)[0])
    enc_f = common.count_flops(lambda: vae.encode(torch.empty(1, 3, px, px, device="meta")))
    vision_cfg, text_cfg, sd_text_cfg = clip_configs()
    vis = _meta(lambda: CLIPVisionModel(vision_cfg), trainable=True)
    img = torch.empty(1, 3, 224, 224, device="meta")
    vis_f, vis_fb = _fwd_bwd(lambda: vis(pixel_values=img).pooler_output)
    txt = _meta(lambda: CLIPTextModel(text_cfg), trainable=True)
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    txt_f, txt_fb = _fwd_bwd(lambda: txt(input_ids=ids).pooler_output)
    sd_txt = _meta(lambda: CLIPTextModel(sd_text_cfg))
    sd_txt.get_input_embeddings().weight.requires_grad_(True)  # gradient reaches the first text-gate layer
    sd_ids = torch.zeros(BATCH, 77, dtype=torch.long, device="meta")
    _, sd_fb = _fwd_bwd(lambda: sd_txt(input_ids=sd_ids).last_hidden_state)
    per_step = {"unet_fwd_bwd_ckpt": unet_fb_ckpt, "vae_decode_2fwd_1bwd": 2 * dec_f + (dec_fb - dec_f),
                "clip": 3 * vis_f + txt_f + (vis_fb - vis_f) + (txt_fb - txt_f), "sd_text_encoder": sd_fb}
    step_total = sum(per_step.values())
    return {**{f"per_step_{k}": v for k, v in per_step.items()}, "per_step_total": step_total,
            "vae_decoder_fwd_per_image": dec_f, "vae_encoder_fwd_per_image": enc_f, "clip_image_fwd": vis_f,
            "clip_text_fwd": txt_f, "per_iteration": OFFICIAL_STEPS * step_total + 2 * enc_f}


# ----------------------------------------------------------------------------- report
def table(res: dict) -> str:
    rows = [[k, res["ms"][k], res["ratio_to_forward"][k], res["peak_mib"][k]] for k in res["ms"]]
    main = common.format_table(["variant", "median ms", "× sampling fwd", "peak MiB"], rows,
                               f"gate training ({res['unet']} UNet, latent {res['latent']}², batch {BATCH}, "
                               f"N={res['N']}, r={res['r']}, {res['dtype']}, {res['threads']} thread(s))")
    f = res["flops"]
    fl = [["ours: fwd+bwd", f["ours_per_iteration"] / 1e12],
          ["ours: fwd+bwd, checkpointed", f["ours_per_iteration_ckpt"] / 1e12],
          ["official: per denoising step", f["official"]["per_step_total"] / 1e12],
          ["official: per iteration (E[K]=33.5)", f["official"]["per_iteration"] / 1e12],
          ["  of which VAE decoder fwd / image", f["official"]["vae_decoder_fwd_per_image"] / 1e12],
          ["official ÷ ours", f["official_over_ours"]],
          ["official ÷ ours (checkpointed)", f["official_over_ours_ckpt"]]]
    ft = common.format_table(["FLOPs at latent " + str(res["flop_latent"]) + "²", "TFLOP (or ratio)"], fl,
                             "analytic FLOPs (torch FlopCounterMode on the meta device; 1 MAC = 2 FLOPs)")
    return main + "\n\n" + ft


def run(args: Namespace) -> dict:
    common.log(f"train_step: building the {args.size} UNet ...")
    tr = build(args)
    common.log("train_step: checkpointing check ...")
    check = checkpoint_check(tr, args)
    var = variants(tr)
    peaks: dict[str, float] = {}

    def warm(name: str, fn: Callable[[], object]) -> None:
        with common.PeakMemory(args.device) as pm:
            fn()
        peaks[name] = pm.peak_mib

    common.log(f"train_step: warm-up + {args.repeats} interleaved rounds ...")
    t = common.interleave(var, args.repeats, args.device, warmup=1, on_warmup=warm)
    common.log("train_step: FLOP counts (meta device) ...")
    ours = unet_flops(args.size, args.flop_latent, args)
    ours_t = unet_flops(args.size, args.latent, args)
    official = official_flops(args, unet_flops(args.size, args.flop_latent, args, experts=False)["fwd_bwd_ckpt"])
    flops = {"ours_per_iteration": ours["fwd_bwd"], "ours_per_iteration_ckpt": ours["fwd_bwd_ckpt"],
             "sampling_forward": ours["fwd"], "official": official,
             "official_over_ours": official["per_iteration"] / ours["fwd_bwd"],
             "official_over_ours_ckpt": official["per_iteration"] / ours["fwd_bwd_ckpt"],
             "at_timing_latent": ours_t}
    return {"bench": "train_step", "unet": args.size, "latent": args.latent, "flop_latent": args.flop_latent,
            "batch": BATCH, "N": args.experts, "r": args.rank, "dtype": common.dtype_name(args.dtype),
            "repeats": args.repeats, "quick": args.quick, "threads": torch.get_num_threads(),
            "threads_reason": args.threads_reason, "torch": torch.__version__, "machine": common.machine(args.device),
            "ms": {k: 1e3 * t.median(k) for k in var}, "samples_ms": {k: [1e3 * s for s in v]
                                                                     for k, v in t.samples.items()},
            "ratio_to_forward": {k: t.ratio(k, "sample_forward") for k in var},
            "ratio_train_vs_forward": t.ratio("train_iter", "sample_forward"),
            "ratio_train_ckpt_vs_forward": t.ratio("train_iter_ckpt", "sample_forward"),
            "flop_ratio_train_vs_forward": ours_t["fwd_bwd"] / ours_t["fwd"],
            "flop_ratio_train_ckpt_vs_forward": ours_t["fwd_bwd_ckpt"] / ours_t["fwd"],
            "peak_mib": peaks, "checkpointing": check, "flops": flops,
            "official_flops_over_ours": flops["official_over_ours"]}


def main() -> None:
    args = parse()
    res = run(args)
    common.emit("train_step", res, table(res), args.json)


if __name__ == "__main__":
    main()
