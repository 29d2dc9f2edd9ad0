"""The `gemma4` command line: a thin adapter over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import ModelConfig
from ..errors import Gemma4Error
from ..weights.presets import PRESETS, preset_config


def _info(args: argparse.Namespace) -> None:
    from ..summary import format_summary, summarize
    from ..weights import open_checkpoint, validate

    if args.model in PRESETS and not Path(args.model).exists():
        summary = summarize(ModelConfig.from_dict(preset_config(args.model)))
    else:
        checkpoint = open_checkpoint(args.model)
        validate(checkpoint)
        summary = summarize(checkpoint.config, {n: t.dtype for n, t in checkpoint.tensors.items()})
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


def _synth(args: argparse.Namespace) -> None:
    from ..weights import synthesize
    from ..weights.checkpoint import resolve_dtype

    out = synthesize(args.preset, args.out_dir, dtype=resolve_dtype(args.dtype), seed=args.seed)
    print(f"wrote {args.preset} to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4", description="Run Google's Gemma 4 models locally.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe a checkpoint: variant, layer plan, parameters, bytes")
    info.add_argument("model", metavar="MODEL", help=f"checkpoint folder, or a preset ({', '.join(PRESETS)})")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)

    synth = commands.add_parser("synth", help="write a synthetic checkpoint with a real model's exact layout")
    synth.add_argument("preset", choices=list(PRESETS), metavar="PRESET", help=", ".join(PRESETS))
    synth.add_argument("out_dir", metavar="OUT_DIR")
    synth.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except Gemma4Error as e:
        print(f"gemma4: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemma4: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
