"""The `lesionkit` command: parses arguments and dispatches to the module that owns each subcommand.

Each subcommand lives in its own module as `add_arguments(parser)` + `run(args) -> int` (`bench` in the
top-level `benchmarks` package, beside this one); modules are imported lazily so `lesionkit --help` stays
fast (no torch import).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order `lesionkit --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lesionkit.synth", "write a synthetic dermoscopy dataset in the ISIC 2017 layout"),
    "download": ("lesionkit.download", "fetch and unpack the official ISIC 2017 archives (resumable)"),
    "pack": ("lesionkit.pack", "pack images + a labels CSV into WebDataset shards with a manifest"),
    "stats": ("lesionkit.stats", "print the class distribution of packed shards; --verify re-hashes them"),
    "train": ("lesionkit.train", "train a model (multi-process: accelerate launch lesionkit/train.py)"),
    "evaluate": ("lesionkit.evaluate", "score a checkpoint on packed shards: metrics.json, predictions, plots"),
    "predict": ("lesionkit.predict", "write an ISIC submission CSV for a folder of images or shards"),
    "preview-aug": ("lesionkit.preview", "write a PNG grid of original and augmented images"),
    "bench": ("benchmarks.cli", "benchmarks: loader, aug, step, e2e, pack (baseline beside each)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesionkit",
        description="Train CNNs on dermoscopy images (ISIC): pack -> shards -> train -> evaluate.",
    )
    from lesionkit import __version__

    parser.add_argument("--version", action="version", version=f"lesionkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help/version or the usage error
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"lesionkit {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
