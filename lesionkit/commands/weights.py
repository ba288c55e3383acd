"""`lesionkit weights fetch NAME...`: put pretrained weights into a cache folder that offline nodes train
from (`lesionkit.weights`)."""

from __future__ import annotations

import argparse

from lesionkit import weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("fetch", help="download the ImageNet weights of models into the weights cache")
    p.add_argument(
        "models", nargs="+", metavar="NAME", help=f"models: {', '.join(weights.pretrained_models())}"
    )
    p.add_argument(
        "--weights-cache",
        metavar="DIR",
        help=f"cache folder (default: ${weights.ENV}, else torch hub's folder, which torchvision reads too)",
    )
    p.add_argument(
        "--mirror",
        metavar="URL",
        help="fetch the same file names from this folder URL (an internal mirror) instead of the upstream",
    )


def run(args: argparse.Namespace) -> int:
    cache = weights.cache_dir(args.weights_cache or "") or weights.default_dir()
    for model in args.models:
        weights.source(model)  # every name checked before anything is downloaded
    for model in args.models:
        path, downloaded = weights.fetch(model, cache, args.mirror)
        print(f"{model}: {path}" + ("" if downloaded else " (already there)"))
    print(f"train offline with --weights-cache {cache} (or {weights.ENV}={cache})")
    return 0
