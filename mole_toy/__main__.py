"""``python -m mole_toy build [--quick] [--out DIR]``: rebuild the toy world's assets;
``python -m mole_toy build-clip [--out DIR]``: (re)train only its toy CLIP guide."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mole_toy", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train and write every asset (deterministic)")
    b.add_argument("--quick", action="store_true", help="tiny step counts, into a temporary folder unless --out")
    b.add_argument("--out", default=None, help="output folder (default: mole_toy/assets)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: reproducible, and "
                   "much faster than 2 on a shared machine)")
    b.add_argument("--preview", default=None, help="also write PNG grids of the evaluation samples here")
    c = sub.add_parser("build-clip", help="(re)train only the toy CLIP of an existing world; other files unchanged")
    c.add_argument("--quick", action="store_true", help="tiny step counts (smoke test)")
    c.add_argument("--out", default=None, help="the built world's folder (default: mole_toy/assets)")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: reproducible)")
    c.add_argument("--hard-negatives", type=int, default=None, metavar="N",
                   help="per training step, N renders whose texture is darker than the world draws it, shown to "
                   "every caption as an image it does not describe (default 0: the committed CLIP)")
    args = parser.parse_args(argv)
    if args.command == "build-clip":
        if args.hard_negatives is not None and args.hard_negatives < 0:
            parser.error(f"--hard-negatives must be ≥ 0, got {args.hard_negatives}")
        if args.quick and args.out is None:
            parser.error("build-clip --quick needs --out (it would replace the committed toy CLIP)")
        return _build_clip(args)
    return _build(args)


def _build_clip(args: argparse.Namespace) -> int:
    from .build import BuildConfig, build_clip, with_overrides

    cfg = with_overrides(BuildConfig.quick() if args.quick else BuildConfig(), threads=args.threads,
                         clip_hard_negatives=args.hard_negatives)
    entry = build_clip(out=Path(args.out) if args.out else None, config=cfg)["clip"]
    held = entry["held_out"]["clean"]
    print(json.dumps({"file": entry["file"], "bytes": entry["bytes"], "seconds": entry["training"]["seconds"],
                      "retrieval": held["retrieval"], "zero_shot_all": held["zero_shot"]["all_attributes"]}, indent=1))
    return 0


def _build(args: argparse.Namespace) -> int:
    from .build import BuildConfig, build, with_overrides

    cfg = with_overrides(BuildConfig.quick() if args.quick else BuildConfig(), threads=args.threads)
    out = args.out
    if out is None and args.quick:
        out = tempfile.mkdtemp(prefix="toy_quick_")
    manifest = build(out=Path(out) if out else None, quick=args.quick, config=cfg, preview=args.preview)
    summary = {"seconds": manifest["build"]["total_seconds"], "bytes": manifest["sizes"]["total_bytes"],
               "probe_clean": manifest["metrics"]["probe"]["clean"],
               "concepts": {n: m["with_lora"] for n, m in manifest["metrics"]["generation"]["concepts"].items()}}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
