"""Build the toy world's assets: tokenizer, pixel VAE, base model, concept LoRAs, shape probe, toy CLIP,
manifest.

``python -m mole_toy build [--quick] [--out DIR]``; ``python -m mole_toy build-clip [--out DIR]`` (re)trains
only the toy CLIP of an existing world (other files untouched). Everything is seeded and runs on one CPU thread
by default, so a rebuild gives the same files. Layout of ``DIR`` (default ``mole_toy/assets``)::

    pipeline/        StableDiffusionPipeline folder (fp16 safetensors, loadable offline)
    loras/<c>.safetensors   one concept LoRA per novel value (kohya or diffusers layout)
    probes/shape_net.safetensors
    clip/toy_clip.safetensors   contrastive image–text guide (see ``mole_toy.clip``)
    manifest.json    attributes, concepts, triggers, files, seeds, build time, all measurements
"""

from __future__ import annotations

import copy
import datetime
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import evaluate as E
from . import lora as L
from . import models as M
from . import training as T
from . import world as W
from .clip import evaluate_toy_clip, load_toy_clip, save_toy_clip, train_toy_clip
from .probes import Probe, ShapeNet
from .tokenizer import write_tokenizer

Log = Callable[[str], None]
DEFAULT_OUT = Path(__file__).resolve().parent / "assets"
LORA_FORMATS = {"purple": "kohya", "striped": "diffusers", "star": "kohya", "pink": "diffusers"}
MANIFEST_VERSION = 1
CLIP_FILE = "clip/toy_clip.safetensors"


@dataclass(frozen=True)
class BuildConfig:
    """Step counts and sizes of every stage (``quick`` shrinks them for a smoke test)."""

    seed: int = 0
    threads: int = 1
    base_images: int = 1536
    base_steps: int = 2000
    base_batch: int = 16
    base_lr: float = 2e-3
    ema_decay: float = 0.99
    caption_dropout: float = 0.15
    lora_images: int = 384
    lora_steps: int = 300
    lora_batch: int = 16
    lora_lr: float = 3e-3
    lora_rank: int = 4
    shape_images: int = 2000
    shape_steps: int = 300
    shape_batch: int = 64
    probe_images: int = 500
    eval_base: int = 64
    eval_concept: int = 16
    clip_images: int = 6000
    clip_steps: int = 800
    clip_batch: int = 128
    clip_lr: float = 2e-3
    clip_eval: int = 640
    clip_hard_negatives: int = 0  # per step; 0 = the committed toy CLIP (see mole_toy.clip.train_toy_clip)

    @classmethod
    def quick(cls) -> BuildConfig:
        return cls(base_images=96, base_steps=4, base_batch=8, lora_images=48, lora_steps=3, lora_batch=8,
                   shape_images=200, shape_steps=5, probe_images=50, eval_base=4, eval_concept=4,
                   clip_images=128, clip_steps=4, clip_batch=32, clip_eval=64)


class Stages:
    """Times each build stage and prints progress."""

    def __init__(self, log: Log) -> None:
        self.log, self.t0, self.seconds = log, time.time(), {}

    def run(self, name: str, fn: Callable, *args: object, **kwargs: object) -> object:
        self.log(f"[{time.time() - self.t0:6.1f} s] {name} …")
        t = time.time()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.time() - t, 1)
        return out


def _caption_set(tokenizer: object, specs: list[W.Spec], vae: torch.nn.Module) -> T.LatentSet:
    images = W.render_batch(specs)
    mean, std = T.encode(vae, images)
    scale = float(vae.config.scaling_factor)
    return T.LatentSet(mean * scale, std * scale, T.tokenize(tokenizer, [W.caption(s) for s in specs]))


def train_probe(cfg: BuildConfig, out: Path, vae: torch.nn.Module, log: Log) -> tuple[Probe, dict]:
    """Train the shape classifier on all attribute values; measure every probe on fresh images."""
    specs = W.sample_specs(cfg.shape_images, cfg.seed + 10, W.ALL_VALUES)
    torch.manual_seed(cfg.seed + 11)
    net = ShapeNet()
    info = T.train_shape_net(net, specs, W.render_batch(specs), steps=cfg.shape_steps, batch=cfg.shape_batch,
                             lr=3e-3, seed=cfg.seed + 12, log=log)
    path = out / "probes" / "shape_net.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"classes": json.dumps(list(W.SHAPES)), "input": "soft foreground mask (N,1,32,32)"})
    probe = Probe(path)  # measure what is saved (fp16)
    acc = E.probe_accuracy(probe, vae, cfg.probe_images, cfg.seed + 13)
    log(f"  probe accuracy clean: {E.fmt_acc(acc['clean'])}")
    log(f"  probe accuracy through the VAE: {E.fmt_acc(acc['vae'])}  (max |error| {acc['vae_max_abs_error_255']}/255)")
    return probe, {"train": info, "accuracy": acc, "params": sum(p.numel() for p in net.parameters())}


def train_clip(cfg: BuildConfig, out: Path, log: Log) -> dict:
    """Train the toy CLIP on generator renders only, save it (fp16) and measure the saved file on held-out
    renders; returns its manifest entry."""
    model, info = train_toy_clip(seed=cfg.seed + 700, steps=cfg.clip_steps, images=cfg.clip_images,
                                 batch=cfg.clip_batch, lr=cfg.clip_lr, hard_negatives=cfg.clip_hard_negatives,
                                 log=log)
    path = save_toy_clip(model, out / CLIP_FILE)
    metrics = evaluate_toy_clip(load_toy_clip(path), n=cfg.clip_eval, seed=cfg.seed + 800)
    for name in ("clean", "noisy"):
        r, z = metrics[name]["retrieval"], metrics[name]["zero_shot"]
        log(f"  toy clip {name}: retrieval t→i {r['text_to_image']:.3f} i→t {r['image_to_text']:.3f} "
            f"(chance {r['chance']:.3f}); zero-shot " + ", ".join(f"{a} {z[a]['accuracy']:.3f}" for a in W.ATTRIBUTES))
    return {"file": CLIP_FILE, "bytes": path.stat().st_size, "params": sum(p.numel() for p in model.parameters()),
            "dim": model.config.dim, "training": info, "held_out": metrics}


def _with_clip(manifest: dict, entry: dict) -> dict:
    """``manifest`` with ``"clip"`` set to ``entry`` (placed right after ``"probe"``, other keys untouched)."""
    out = {}
    for key, value in manifest.items():
        if key != "clip":
            out[key] = value
        if key == "probe":
            out["clip"] = entry
    if "clip" not in out:
        out["clip"] = entry
    return out


def build_clip(out: str | Path | None = None, config: BuildConfig | None = None, log: Log = print) -> dict:
    """(Re)train only the toy CLIP of the world built in ``out`` (seed from its manifest); writes the model
    and the manifest's ``"clip"`` entry, leaves every other file and manifest entry as it was."""
    out = Path(out) if out is not None else DEFAULT_OUT
    path = out / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no toy world built there; run `python -m mole_toy build --out {out}`")
    manifest = json.loads(path.read_text())
    cfg = replace(config or BuildConfig(), seed=manifest["build"]["config"]["seed"])
    torch.set_num_threads(cfg.threads)
    entry = Stages(log).run("toy clip", train_clip, cfg, out, log)
    manifest = _with_clip(manifest, entry)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def train_base(cfg: BuildConfig, tokenizer: object, vae: torch.nn.Module, log: Log) -> tuple:
    unet, text_encoder = M.make_unet(cfg.seed + 1), M.make_text_encoder(cfg.seed + 2)
    scheduler = M.make_scheduler()
    data = _caption_set(tokenizer, W.sample_specs(cfg.base_images, cfg.seed + 3), vae)
    params = [*unet.parameters(), *text_encoder.parameters()]
    info = T.train_diffusion(unet, text_encoder, scheduler, data, params, steps=cfg.base_steps,
                             batch=cfg.base_batch, lr=cfg.base_lr, seed=cfg.seed + 4,
                             empty_ids=T.tokenize(tokenizer, [""])[0], drop=cfg.caption_dropout,
                             ema_decay=cfg.ema_decay, label="base", log=log)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return unet, text_encoder, scheduler, {**info, "images": cfg.base_images}


def save_pipeline(out: Path, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                  tokenizer: object, scheduler: object) -> Path:
    """fp16 weights, fp32 compute on load (the text encoder's config names float32 for ``dtype="auto"``)."""
    folder = out / "pipeline"
    if folder.exists():
        shutil.rmtree(folder)
    parts = [copy.deepcopy(m).half() for m in (unet, vae, text_encoder)]
    pipe = M.assemble_pipeline(*parts[:1], parts[1], parts[2], tokenizer, scheduler)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    cfg_path = folder / "text_encoder" / "config.json"
    te_cfg = json.loads(cfg_path.read_text())
    te_cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(te_cfg, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer")
    return folder


def load_pipeline(folder: Path):  # noqa: ANN201
    """The saved pipeline, offline, fp32, no progress bars."""
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_concept(cfg: BuildConfig, c: W.Concept, base: tuple, tokenizer: object, vae: torch.nn.Module,
                  out: Path, log: Log) -> tuple[Path, dict, tuple]:
    """Train and save one concept LoRA; returns its path, info and the trained (unet, text encoder)."""
    unet, text_encoder, scheduler = base
    k = W.CONCEPTS.index(c)
    specs = W.sample_specs(cfg.lora_images, cfg.seed + 100 + k, W.concept_values([c]))
    data = _caption_set(tokenizer, specs, vae)
    lunet, lte, params = L.with_adapters(unet, text_encoder, cfg.lora_rank, cfg.seed + 200 + k)
    info = T.train_diffusion(lunet, lte, scheduler, data, params, steps=cfg.lora_steps, batch=cfg.lora_batch,
                             lr=cfg.lora_lr, seed=cfg.seed + 300 + k, empty_ids=T.tokenize(tokenizer, [""])[0],
                             drop=cfg.caption_dropout, label=f"lora {c.name}", log=log)
    fmt = LORA_FORMATS[c.name]
    meta = {"mole_toy_concept": c.name, "mole_toy_attribute": c.attribute, "mole_toy_trigger": c.trigger,
            "ss_network_dim": str(cfg.lora_rank), "ss_network_alpha": str(cfg.lora_rank)}
    path = L.save_lora(out / "loras" / f"{c.name}.safetensors", fmt, lunet, lte, cfg.lora_rank, meta)
    info = {**info, "images": cfg.lora_images, "format": fmt, "rank": cfg.lora_rank, "alpha": cfg.lora_rank,
            "file": f"loras/{path.name}", "trainable_params": sum(p.numel() for p in params)}
    return path, info, (lunet, lte)


@torch.no_grad()
def check_reproduction(pipe: object, paths: list[Path], trained: list[tuple], tokenizer: object) -> dict:
    """For each LoRA, compare its in-memory PEFT model with the saved file applied by ``mole_core``.

    All experts are attached at once in static mode with a one-hot weight vector; reported: the
    LoRA's mean effect on the UNet output and the largest mismatch (fp16 files: expect ~1e-3 of it).
    """
    import mole_core

    ids = T.tokenize(tokenizer, [W.caption(W.sample_specs(1, 5, W.ALL_VALUES)[0])] * 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, M.LATENT_CHANNELS, M.LATENT_SIZE, M.LATENT_SIZE, generator=gen)
    t = torch.tensor([200, 700])
    base_out = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
    experts = [mole_core.load_expert(p) for p in paths]
    report = {}
    for i, (path, (lunet, lte)) in enumerate(zip(paths, trained)):
        ref = lunet(x, t, lte(ids)[0]).sample
        weights = [1.0 if j == i else 0.0 for j in range(len(paths))]
        mix = mole_core.attach(pipe, experts, mode="static", weights=weights)
        try:
            got = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
        finally:
            mix.detach()
        effect = float((ref - base_out).abs().mean())
        report[path.stem] = {"format": experts[i].format, "factors": len(experts[i].factors),
                             "effect_mean_abs": round(effect, 5),
                             "mismatch_max_abs": round(float((got - ref).abs().max()), 6)}
    return report


def _sizes(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in files}
    return {"files": sizes, "total_bytes": sum(sizes.values())}


def _attributes() -> dict:
    return {a: {"values": list(W.ALL_VALUES[a]), "base": list(W.BASE_VALUES[a]), "novel": [W.NOVEL[a]]}
            for a in W.ATTRIBUTES}


def build(out: str | Path | None = None, quick: bool = False, config: BuildConfig | None = None,
          preview: str | Path | None = None, log: Log = print) -> dict:
    """Build every asset into ``out``; returns the manifest (also written to ``out/manifest.json``)."""
    cfg = config or (BuildConfig.quick() if quick else BuildConfig())
    out = Path(out) if out is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    from transformers import CLIPTokenizer

    st = Stages(log)
    tok_dir = st.run("tokenizer", write_tokenizer, out / "pipeline" / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    vae = M.make_pixel_vae()
    probe, probe_info = st.run("shape probe", train_probe, cfg, out, vae, log)
    unet, text_encoder, scheduler, base_info = st.run("base model", train_base, cfg, tokenizer, vae, log)
    folder = st.run("save pipeline", save_pipeline, out, unet, vae, text_encoder, tokenizer, scheduler)
    concepts, paths, trained = {}, [], []
    for c in W.CONCEPTS:
        path, info, models = st.run(f"lora {c.name}", train_concept, cfg, c, (unet, text_encoder, scheduler),
                                    tokenizer, vae, out, log)
        concepts[c.name] = {"attribute": c.attribute, "value": c.value, "trigger": c.trigger, **info}
        paths.append(path)
        trained.append(models)
    pipe = load_pipeline(folder)
    repro = st.run("mole_core reproduction check", check_reproduction, pipe, paths, trained, tokenizer)
    del trained
    metrics, images = st.run("evaluation", E.evaluate_world, pipe, probe, {p.stem: str(p) for p in paths},
                             cfg.eval_base, cfg.eval_concept, cfg.seed + 500, log)
    if preview is not None:
        _write_previews(Path(preview), images, log)
    clip = st.run("toy clip", train_clip, cfg, out, log)
    manifest = {
        "version": MANIFEST_VERSION, "image_size": W.SIZE, "caption_template": "a {colour} [{texture}] {shape} on "
        "{background}  (the texture word is omitted for plain)", "attributes": _attributes(),
        "concepts": concepts, "pipeline": "pipeline", "probe": {"shape_net": "probes/shape_net.safetensors"},
        "clip": clip,
        "sampling": metrics["sampler"],
        "models": {"unet_params": M.n_params(unet), "text_encoder_params": M.n_params(text_encoder),
                   "vae_params": M.n_params(vae), "shape_net_params": probe_info["params"],
                   "vae": "hand-set pixel-space AutoencoderKL (identity, scale factor 1, latent = RGB in [-1, 1])",
                   "unet_config": _jsonable(M.UNET_CONFIG), "scheduler_config": _jsonable(M.SCHEDULER_CONFIG)},
        "metrics": {"probe": probe_info["accuracy"], "generation": metrics, "lora_reproduction": repro},
        "training": {"base": base_info, "shape_net": probe_info["train"]},
        "build": {"config": asdict(cfg), "quick": quick, "stage_seconds": st.seconds,
                  "total_seconds": round(time.time() - st.t0, 1),
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "versions": _versions()},
    }
    manifest["sizes"] = _sizes(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"[{time.time() - st.t0:6.1f} s] done: {out} ({manifest['sizes']['total_bytes'] / 1e6:.2f} MB)")
    return manifest


def _write_previews(folder: Path, images: dict[str, np.ndarray], log: Log) -> None:
    for name, imgs in images.items():
        W.save_grid(imgs, folder / f"{name}.png", cols=8, scale=4)
    log(f"  previews: {folder}/")


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def with_overrides(cfg: BuildConfig, **kw: object) -> BuildConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
