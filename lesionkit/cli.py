"""The `lesionkit` command: parses arguments and dispatches to the module that owns each subcommand.

Each subcommand is a module in `lesionkit/commands/` (and `benchmarks/cli.py`) with `add_arguments(parser)`
and `run(args) -> int`: argument parsing and printing only, the work is done by library modules. Modules
are imported lazily so `lesionkit --help` stays fast (no torch import). A `LesionkitError` from anywhere
ends the command here, once: one line on stderr, no traceback, its exit code (2 bad input, 1 failure).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lesionkit.errors import LesionkitError, message

# name -> (module, one-line help). Order is the order `lesionkit --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lesionkit.commands.synth", "write a synthetic dermoscopy dataset in the ISIC 2017 layout"),
    "download": (
        "lesionkit.commands.download",
        "fetch and unpack the official ISIC 2017 archives (resumable)",
    ),
    "pack": ("lesionkit.commands.pack", "pack images + a labels CSV into WebDataset shards with a manifest"),
    "stats": (
        "lesionkit.commands.stats",
        "print the class distribution of packed shards; --verify re-hashes them",
    ),
    "split": (
        "lesionkit.commands.split",
        "assign grouped cross-validation folds (by lesion or patient) to a shard folder",
    ),
    "dedup": (
        "lesionkit.commands.dedup",
        "find the same images in training and validation/test shards (perceptual hash + pixel check)",
    ),
    "train": (
        "lesionkit.commands.train",
        "train a model (multi-process: accelerate launch lesionkit/train.py)",
    ),
    "cv": (
        "lesionkit.commands.cv",
        "cross-validate a recipe: train every fold, score the out-of-fold predictions with a CI",
    ),
    "sweep": (
        "lesionkit.commands.sweep",
        "a grid/list of overrides over a recipe: list it, run it here, or submit one Slurm job array",
    ),
    "evaluate": (
        "lesionkit.commands.evaluate",
        "score a checkpoint on packed shards: metrics.json, predictions, plots",
    ),
    "compare": (
        "lesionkit.commands.compare",
        "compare runs or a sweep: a table best first, the paired bootstrap of the best vs each",
    ),
    "ensemble": (
        "lesionkit.commands.ensemble",
        "score an ensemble of checkpoints on shards (averaged probabilities; greedy selection)",
    ),
    "predict": ("lesionkit.commands.predict", "write a submission CSV for a folder of images or shards"),
    "explain": (
        "lesionkit.commands.explain",
        "Grad-CAM heat maps of a checkpoint over images: overlays and a contact sheet",
    ),
    "export": (
        "lesionkit.commands.export",
        "export a checkpoint to ONNX or TorchScript (preprocessing as JSON beside it), parity-checked",
    ),
    "preview-aug": ("lesionkit.commands.preview", "write a PNG grid of original and augmented images"),
    "weights": (
        "lesionkit.commands.weights",
        "fetch pretrained weights into a cache folder for nodes without internet",
    ),
    "bench": ("benchmarks.cli", "benchmarks: loader, aug, step, e2e, pack, memory (baseline beside each)"),
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


def run_command(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse `argv` for subcommand `name` and run it; user errors become one line and an exit code."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=prog or f"lesionkit {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(module.run(args) or 0)
    except LesionkitError as exc:
        print(f"lesionkit {name}: error: {message(exc)}", file=sys.stderr, flush=True)
        return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help/version or the usage error
        parser.print_help()
        return 2
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
