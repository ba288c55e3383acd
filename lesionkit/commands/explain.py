"""`lesionkit explain`: Grad-CAM heat maps of a checkpoint over images: PNG overlays for the predicted class
(and any class asked for), a contact sheet with the probabilities, explanations.csv (`lesionkit.explain`)."""

from __future__ import annotations

import argparse

import torch

from lesionkit.explain import SHEET, explain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/NAME/best")
    parser.add_argument(
        "--images", required=True, nargs="+", metavar="PATH", help="image files and/or folders of images"
    )
    parser.add_argument("--out", required=True, help="output folder (new; --force replaces it)")
    parser.add_argument(
        "--classes", nargs="*", default=[], metavar="CLASS", help="also explain these classes for every image"
    )
    parser.add_argument(
        "--metadata",
        metavar="CSV",
        help="for a checkpoint trained with metadata: age/sex/site per image id (the release's metadata "
        "CSV works as is); each image is explained with its own metadata held fixed",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    out = explain(
        args.checkpoint, args.images, args.out, args.classes, args.force, args.device, args.metadata
    )
    n = len(list(out.glob("*__*.png")))
    print(f"lesionkit explain: {n} overlay(s), {out / SHEET}, {out / 'explanations.csv'} -> {out}/")
    return 0
