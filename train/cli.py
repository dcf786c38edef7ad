"""Command line: ``python -m train {train,sample,eval,compare,inspect,demo}`` (console script ``mole-train``).

Train MoLE gates on a diffusers Stable Diffusion model from a folder of reference images,
sample with the learned mixture, evaluate with CLIP, compare against NLA, inspect files.
Errors print one line naming the bad input and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from mole_core import METHODS, MoleError
from mole_core.checks import parse_numbers, parse_switches

from .config import TrainConfig, config_fields
from .recipes import RECIPES, recipe_fields

EXIT_ERROR = 2


METHOD_CHOICES = ("gated", "uniform", "static", *METHODS)


def _floats(text: str) -> list[float]:
    """``--weights``: the nodes' list grammar (``mole_core.checks.parse_numbers``); the values are checked
    with the other numbers, by ``SampleSpec``."""
    try:
        return parse_numbers(text, "value", check=False)
    except MoleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int | tuple[int, int]:
    """``512`` or ``768x512`` (width x height)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or WxH in pixels, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected N or WxH in pixels, got {text!r}")
    return values[0], values[1]


def _mask(text: str) -> list[bool]:
    """``--mask``: the nodes' on/off grammar (``mole_core.checks.parse_switches``)."""
    try:
        return parse_switches(text, "value")
    except MoleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="diffusers model folder (or a .safetensors checkpoint "
                   "diffusers can load offline)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA file or PEFT folder, optional :strength; repeat for every expert (order = gate order)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def _add_train_parser(sub: argparse._SubParsersAction, recipe: str) -> None:
    p = sub.add_parser("train", help="train gates from reference images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--recipe", default="paper", choices=list(RECIPES),
                   help="the option defaults to start from (any option given wins): paper — the paper's gates "
                   "(softmax, denoising objective); compose — the composition benchmark's best recipe (trigger-word "
                   "gates, compose objective, block search; needs --clip-model, --compose-prompt(s), "
                   "--base-prompt(s) and one reference sub-folder per concept named after its LoRA's trigger word)")
    p.add_argument("--images", required=True, help="folder of reference images (flat or one sub-folder per concept)")
    p.add_argument("--out", default="gates.safetensors", help="gate file to write")
    p.add_argument("--resume", default=None, help="resume from this training checkpoint")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: <out stem>.state.safetensors)")
    p.add_argument("--clip-model", default=None, help="local open_clip .safetensors checkpoint (clip objective)")
    p.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of --clip-model (or 'toy': "
                   "the toy world's CLIP)")
    p.add_argument("--compose-prompt", action="append", default=[], metavar="TEXT",
                   help="objective compose: a prompt naming concepts by their reference sub-folder names "
                   "(trigger words); repeat")
    p.add_argument("--compose-prompts", default=None, metavar="FILE", help="objective compose: a text file, "
                   "one composition prompt per line")
    p.add_argument("--base-prompt", action="append", default=[], metavar="TEXT",
                   help="objective compose: a prompt naming no concept (prior preservation); repeat")
    p.add_argument("--base-prompts", default=None, metavar="FILE", help="objective compose: a text file, one "
                   "base prompt per line")
    preset = recipe_fields(recipe)
    for name, default, help_, choices in config_fields():
        default = preset.get(name, default)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(flag, type=type(default), default=default, help=help_, choices=choices)


def _add_sample_parser(sub: argparse._SubParsersAction, name: str, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="prompt")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (then +1 per image)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--size", type=_size, default=512, metavar="N|WxH",
                   help="image size in pixels: one side (square) or width x height, multiples of 8")
    p.add_argument("--num", type=int, default=1, help="number of images")
    p.add_argument("--mask", type=_mask, default=None, help="experts on/off, e.g. 1,0,1 (gates renormalised)")
    p.add_argument("--strength", type=float, default=1.0, help="mixture strength λ")
    p.add_argument("--switch-every", type=int, default=1, metavar="K",
                   help="LoRA Switch: step s uses expert (s // K) mod N (of the experts that are on)")
    p.add_argument("--out", default="mole_samples", help="output folder")
    return p


def build_parser(recipe: str = "paper") -> argparse.ArgumentParser:
    """The CLI's parser; ``recipe``: the training options' defaults (:mod:`train.recipes`)."""
    ap = argparse.ArgumentParser(prog="mole-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log more")
    ap.add_argument("--debug", action="store_true", help="print the traceback of any error (default: one line)")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_train_parser(sub, recipe)
    s = _add_sample_parser(sub, "sample", "generate images with learned gates, static weights, NLA, LoRA Switch "
                           "or LoRA Composite")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--gates", default=None, help="gate file from `train` (method gated)")
    g.add_argument("--weights", type=_floats, default=None, help="static weights w1,w2,... (one per expert; "
                   "method static)")
    g.add_argument("--uniform", action="store_true", help="NLA: 1/N each (method uniform)")
    s.add_argument("--method", default=None, choices=METHOD_CHOICES,
                   help="gated (--gates) | uniform | static (--weights) | switch: one LoRA at a time, the next every "
                   "--switch-every steps | composite: every LoRA's own CFG prediction, averaged (one batched "
                   "forward). Default: from --gates/--weights/--uniform")
    c = _add_sample_parser(sub, "compare", "MoLE vs NLA vs LoRA Switch vs LoRA Composite vs each single expert, "
                           "same seeds → table + grid")
    c.add_argument("--gates", required=True, help="gate file from `train`")
    c.add_argument("--references", default=None, help="reference folder for CLIP image alignment")
    c.add_argument("--clip-model", default=None, help="local open_clip .safetensors checkpoint for metrics")
    c.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture")
    e = sub.add_parser("eval", help="CLIP text and image alignment of a folder of images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--images", required=True, help="folder of generated images")
    e.add_argument("--prompt", required=True, help="prompt they were generated from")
    e.add_argument("--references", default=None, help="reference folder (one sub-folder per concept)")
    e.add_argument("--clip-model", required=True, help="local open_clip .safetensors checkpoint")
    e.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture")
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    i = sub.add_parser("inspect", help="describe LoRA or gate files")
    i.add_argument("files", nargs="+", help="LoRA files, PEFT folders or gate files")
    i.add_argument("--base", default=None, help="diffusers model folder to count matched targets")
    i.add_argument("--json", action="store_true", help="print JSON")
    d = sub.add_parser("demo", help="end-to-end run on the embedded tiny default (no downloads)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", default="demo_out", help="output folder")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    d.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, run the compose recipe's block search (a smaller judge than the "
                        "benchmark's: 4 prompts per set, 6 DDIM steps; about 75 s on 2 cores); --no-search skips it")
    d.add_argument("--rebuild", action="store_true",
                   help="rebuild the toy world (mole_toy/assets) first: ≈ 40 min on 2 CPU cores; default: the "
                   "committed assets")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", default="paper")
    recipe = pre.parse_known_args(argv)[0].recipe  # so that `--recipe compose --help` shows its defaults
    args = build_parser(recipe if recipe in RECIPES else "paper").parse_args(argv)
    if getattr(args, "recipe", recipe) != recipe:  # an abbreviated flag: again, with the recipe's defaults
        args = build_parser(args.recipe).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from . import commands

    try:
        return commands.COMMANDS[args.command](args)
    except MoleError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a fault of the machine (disk, memory) or a bug: one line unless --debug
        if args.debug:
            raise
        text = " ".join(str(exc).split()) or "(no message)"
        print(f"error: {type(exc).__name__}: {text} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


__all__ = ["main", "build_parser", "TrainConfig"]
