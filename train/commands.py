"""Implementations of the CLI sub-commands (argument parsing lives in :mod:`train.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import mole_core as mole
from mole_core import MoleError
from mole_core.paths import path_inside

from .compose import ComposePrompts
from .config import TrainConfig, config_fields

CLI_NAMES = ("--clip-model", "--clip-arch")  # how this CLI names the guide's two inputs in messages
SAMPLE_FLAGS = {f: "--" + f.replace("_", "-") for f in ("steps", "num", "size", "cfg", "strength", "weights", "gates",
                                                         "uniform", "method", "switch_every")}  # SampleSpec's names


def _load(args: argparse.Namespace):  # noqa: ANN202
    """Pipeline and experts for --base/--lora (validated before any heavy work)."""
    from .diffusers_backend import load_pipeline

    if not args.lora:
        raise MoleError("no LoRAs: give at least one --lora FILE")
    experts = mole.load_experts(args.lora)
    pipe = load_pipeline(args.base, device_of(args.device), name="--base")
    return pipe, experts


def _check_out_file(path: str) -> Path:
    p = Path(path)
    if not p.parent.exists():
        raise MoleError(f"--out {p}: directory {p.parent} does not exist")
    if not p.parent.is_dir():
        raise MoleError(f"--out {p}: {p.parent} is not a directory")
    if p.suffix != ".safetensors":
        raise MoleError(f"--out {p}: gate files are .safetensors")
    return p


def _check_guide_file(path: str | None, objective: str) -> None:
    """``--clip-model`` is given and is a ``.safetensors`` file (checked again, fully, when it is loaded)."""
    if not path:
        raise MoleError(f"objective {objective!r} needs --clip-model FILE (a local open_clip .safetensors)")
    p = Path(path)
    if not p.is_file():
        raise MoleError(f"--clip-model {p}: file not found")
    if p.suffix != ".safetensors":
        raise MoleError(f"--clip-model {p.name}: only .safetensors checkpoints are loaded")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``mole-train train`` arguments (every option flag, recipe defaults included)."""
    return TrainConfig.from_dict({name: getattr(args, name) for name, *_ in config_fields()})


def cmd_train(args: argparse.Namespace) -> int:
    from mole_core.viz import heatmap_payload, save_heatmap

    from .data import scan_folder
    from .diffusers_backend import DiffusersBackend
    from .engine import gate_statistics, reference_cache, train
    from .plots import training_curves
    from .worker import Worker

    cfg = train_config(args)
    out = _check_out_file(args.out)
    ckpt = args.checkpoint or str(out.with_name(out.stem + ".state.safetensors"))
    if args.resume:
        from .checkpoint import read_checkpoint

        read_checkpoint(args.resume)  # fail fast on a corrupt checkpoint, before loading the model
    refs = scan_folder(args.images, cfg.prompt, name="--images", prompt_name="--prompt")
    prompts = _compose_prompts(args, refs) if "compose" in cfg.objectives else None
    needs_guide = "clip" in cfg.objectives or "compose" in cfg.objectives
    if needs_guide:
        _check_guide_file(args.clip_model, cfg.objective)
    rank, size = world()
    pipe, experts = _load(args)
    if size > 1:
        _init_distributed(pipe.device.type)
    guide = None
    if needs_guide:
        from .evaluate import load_guide

        guide = load_guide(args.clip_model, args.clip_arch, str(pipe.device), CLI_NAMES)
    backend = DiffusersBackend(pipe, cfg.resolution)
    cache = reference_cache(backend, experts, refs, cfg)
    bar = _progress_bar(cfg.steps) if rank == 0 else None

    def job(ctx):  # noqa: ANN001, ANN202
        return train(cfg, backend, experts, refs, progress=ctx.progress, should_stop=ctx.should_stop,
                     checkpoint_path=ckpt, resume_from=args.resume, out_path=str(out), clip_guide=guide, cache=cache,
                     compose_prompts=prompts)

    worker = Worker(on_event=lambda kind, p: _on_event(bar, kind, p))
    handle = worker.submit("train", job, checkpoint=ckpt)
    previous = signal.signal(signal.SIGINT, lambda *_: worker.cancel(handle.id))
    try:
        worker.wait(handle.id)
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
    if handle.status == "failed":
        raise MoleError(handle.error or "training failed")
    result = handle.result
    if rank == 0:
        written = Path(result.path or out)  # a cancelled run writes beside --out, never over it
        stats = gate_statistics(backend, experts, result.gates, cache)
        payload = heatmap_payload(stats["mean"], [e.name for e in experts], by_bucket=stats["by_bucket"])
        save_heatmap(payload, str(written.with_name(written.name.removesuffix(".safetensors") + "_heatmap.png")))
        training_curves(result.history).save(written.with_name(written.name.removesuffix(".safetensors")
                                                                + "_curves.png"))
        state = "cancelled — resume with --resume " + ckpt if result.cancelled else "done"
        print(f"{state}: {result.steps_done}/{cfg.steps} steps; gates → {written}; checkpoint → {ckpt}")
        print(f"final: {json.dumps({k: v for k, v in result.metrics.items() if k != 'lr'})}")
    return 0


def _prompt_lines(path: str | None, flag: str) -> list[str]:
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise MoleError(f"{flag} {p}: file not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MoleError(f"{flag} {p}: not a UTF-8 text file") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _compose_prompts(args: argparse.Namespace, refs: list) -> ComposePrompts:
    """The compose objective's prompts from the flags, checked before the model loads."""
    from .compose import ComposePrompts, named_concepts

    comps = list(args.compose_prompt) + _prompt_lines(args.compose_prompts, "--compose-prompts")
    base = list(args.base_prompt) + _prompt_lines(args.base_prompts, "--base-prompts")
    if not comps:
        raise MoleError("objective 'compose' needs composition prompts: --compose-prompt TEXT or "
                        "--compose-prompts FILE")
    concepts = sorted({r.concept for r in refs if r.concept})
    if not concepts:
        raise MoleError("objective 'compose' needs --images with one sub-folder per concept (named after its "
                        "trigger word)")
    unnamed = [p for p in comps if not named_concepts(p, concepts)]
    if unnamed:
        raise MoleError(f"composition prompt {unnamed[0]!r} names none of the concepts {concepts} (sub-folders "
                        "of --images)")
    return ComposePrompts(comps, base)


def _init_distributed(device_type: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def _progress_bar(total: int):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, desc="gates", unit="step", dynamic_ncols=True)


def _on_event(bar, kind: str, payload: dict) -> None:  # noqa: ANN001
    if bar is None or kind != "progress":
        return
    if payload.get("phase") == "block_search":  # after the last step: the bar counts the search's candidates
        bar.set_description(f"block search {payload['candidate']}/{payload['candidates']}", refresh=True)
        return
    bar.n = payload["step"]
    bar.set_postfix(loss=f"{payload['loss']:.4f}", H=f"{payload['gate_entropy']:.3f}", refresh=False)
    bar.refresh()


def _spec(args: argparse.Namespace, **over):  # noqa: ANN202
    from .sampling import SampleSpec

    kw = dict(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps, cfg=args.cfg,
              size=args.size, num=args.num, mask=args.mask, strength=args.strength, switch_every=args.switch_every,
              names=SAMPLE_FLAGS)
    kw.update(over)
    return SampleSpec(**kw)


def cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import sample_images, save_png

    wanted = {"gated": ("gates", "--gates FILE"), "static": ("weights", "--weights w1,w2,...")}
    if args.method in wanted and getattr(args, wanted[args.method][0]) is None:
        raise MoleError(f"--method {args.method} needs {wanted[args.method][1]}")
    spec = _spec(args, gates=args.gates, weights=args.weights, uniform=args.uniform or args.method == "uniform",
                 method=args.method if args.method in mole.METHODS else None)
    if args.gates:
        mole.read_gate_file(args.gates)  # fail fast: corrupt gate file
    out = outdir(args.out)
    names = [_in_out(out, f"{spec.mode}_{spec.seed + i:06d}.png") for i in range(spec.num)]  # before any work
    pipe, experts = _load(args)
    if spec.mask is not None and len(spec.mask) != len(experts):
        raise MoleError(f"--mask has {len(spec.mask)} values for {len(experts)} experts")
    for (image, info), name in zip(sample_images(pipe, experts, spec), names):
        path = save_png(image, info, name)
        print(path)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .sampling import image_grid, sample_images, save_png

    if args.gates:
        mole.read_gate_file(args.gates)  # fail fast: corrupt gate file, before the model loads or --out is made
    out = outdir(args.out)
    pipe, experts = _load(args)
    runs = [("mole", _spec(args, gates=args.gates)), ("nla", _spec(args, uniform=True)),
            ("switch", _spec(args, method="switch")), ("composite", _spec(args, method="composite"))]
    for i, e in enumerate(experts):
        runs.append((f"only_{Path(e.name).stem}", _spec(args, weights=[1.0 if j == i else 0.0
                                                                           for j in range(len(experts))])))
    guide = None
    if args.clip_model:
        from .evaluate import load_clip

        guide = load_clip(args.clip_model, args.clip_arch, names=CLI_NAMES)
    rows, tiles, labels = [], [], []
    for name, spec in runs:
        folder = Path(_in_out(out, name))
        folder.mkdir(exist_ok=True)
        for image, info in sample_images(pipe, experts, spec):
            save_png(image, info, _in_out(out, f"{name}/{info['seed']:06d}.png"))
            tiles.append(image)
            labels.append(f"{name} s{info['seed']}")
        row = {"method": name}
        if guide is not None:
            from .evaluate import evaluate_folder

            row.update(evaluate_folder(guide, folder, args.prompt, args.references))
        rows.append(row)
    image_grid(tiles, cols=args.num, labels=labels).save(_in_out(out, "grid.png"))
    Path(_in_out(out, "compare.json")).write_text(to_json(rows))
    Path(_in_out(out, "compare.md")).write_text(_table(rows))
    print(_table(rows))
    return 0


def _table(rows: list[dict]) -> str:
    lines = ["| method | text (CLIPScore) | text (cos) | image alignment (CLIPScore) |", "|---|---|---|---|"]
    for r in rows:
        ta = r.get("text_alignment", {})
        ia = ", ".join(f"{k}: {v['clipscore']:.3f}" for k, v in r.get("image_alignment", {}).items())
        lines.append(f"| {r['method']} | {ta.get('clipscore', float('nan')):.3f} | {ta.get('cosine', float('nan')):.3f}"
                     f" | {ia or '–'} |")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_folder, load_clip

    guide = load_clip(args.clip_model, args.clip_arch, names=CLI_NAMES)
    res = evaluate_folder(guide, args.images, args.prompt, args.references)
    text = to_json(res)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import describe, format_description

    model = None
    if args.base:
        from .diffusers_backend import load_pipeline

        model = load_pipeline(args.base, name="--base")
    out = [describe(f, model) for f in args.files]
    print(to_json(out) if args.json else "\n".join(format_description(d) for d in out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    t0 = time.time()
    summary = run_demo(Path(args.out), steps=args.steps, rebuild=args.rebuild, search=args.search)
    print(json.dumps(summary, indent=1))
    print(f"demo finished in {time.time() - t0:.0f} s → {args.out}/")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "compare": cmd_compare, "eval": cmd_eval,
            "inspect": cmd_inspect, "demo": cmd_demo}


# ----- what every command needs from the process -----
def _in_out(out: Path, name: str) -> str:
    """``out/name``, refused when a symlink there would take the write outside ``--out``."""
    return path_inside(out, name, "--out", str(out))


def outdir(path: str) -> Path:
    """``--out`` folder, created; one-line error if it is a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MoleError(f"--out {p}: exists and is not a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p


def to_json(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)


def device_of(spec: str) -> str:
    """``--device``: ``auto`` → cuda if available; one-line error for CUDA without a GPU."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise MoleError(f"--device {spec}: CUDA is not available here")
    return spec


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
