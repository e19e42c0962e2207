"""``ppl``: the model-side command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ppl_model.backbones import BackboneError
from ppl_model.config import ConfigError, load_config
from ppl_model.data.datasets import DataLayoutError
from ppl_model.model_dir import ModelDirError
from ppl_model.training.runner import TrainingError, run_training

# Errors that come from what the user asked for: reported in one line, exit status 2, no traceback.
USER_ERRORS = (ConfigError, DataLayoutError, TrainingError, BackboneError, ModelDirError)


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    info = run_training(cfg, args.data, args.out, baseline=args.baseline, resume=args.resume,
                        show_progress=not args.no_progress)
    if info is not None:
        val = info.training.get("validation") or {}
        summary = f" val acc {val['acc']:.3f} (real {val['acc_real']:.3f}, fake {val['acc_fake']:.3f})" if val else ""
        print(f"model {info.version_id} written to {args.out}{summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl", description="PPL AI-generated image detector: model side")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a detector (PPL, or the plain baseline)",
                                description="Train a PPL detector on a data folder and write a model directory.")
    train.add_argument("--config", required=True, help="TOML config (see configs/)")
    train.add_argument("--data", required=True, help="data folder (genimage, paired or folders layout)")
    train.add_argument("--out", required=True, help="output folder: model directory, metrics.jsonl, checkpoints/")
    train.add_argument("--baseline", action="store_true",
                       help="plain BCE fine-tuning: RPR, PCL and the patch loss off, all else identical")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    train.set_defaults(handler=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as exc:
        print(f"ppl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
