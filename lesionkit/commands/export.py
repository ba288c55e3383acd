"""`lesionkit export`: a checkpoint as ONNX or TorchScript with its preprocessing as JSON beside it, checked
against the PyTorch model on real images (`lesionkit.export`)."""

from __future__ import annotations

import argparse

from lesionkit.errors import UsageError
from lesionkit.export import FORMATS, TOLERANCE, export, sidecar_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/NAME/best")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or torchscript")
    parser.add_argument("--out", required=True, help="file to write, e.g. model.onnx (JSON beside it)")
    parser.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="real images (files or folders) for the parity check (default: the checkpoint's "
        "validation shards)",
    )
    parser.add_argument(
        "--metadata",
        metavar="CSV",
        help="with --images, for a checkpoint trained with metadata: age/sex/site per image id (the "
        "release's metadata CSV works as is)",
    )
    parser.add_argument("--parity-images", type=int, default=16, help="how many images the check uses")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help="largest allowed absolute probability difference to the PyTorch model",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    if args.parity_images < 1 or args.tolerance <= 0:
        raise UsageError("--parity-images must be >= 1 and --tolerance > 0")
    facts = export(
        args.checkpoint,
        args.format,
        args.out,
        args.images,
        args.parity_images,
        args.tolerance,
        args.force,
        args.metadata,
    )
    parity, meta = facts["parity"], facts.get("metadata_input")
    inputs = f"input {facts['input']['shape'][1:]}" + (f" + metadata [{meta['shape'][1]}]" if meta else "")
    print(
        f"lesionkit export: {facts['model']} -> {args.out} ({args.format}, dynamic batch, {inputs}); "
        f"preprocessing in {sidecar_path(args.out)}"
    )
    print(
        f"lesionkit export: parity on {parity['images']}: max |p_{args.format} - p_torch| = "
        f"{parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:g})"
    )
    return 0
