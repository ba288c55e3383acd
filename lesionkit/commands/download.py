"""`lesionkit download isic2017`: the official ISIC 2017 archives, resumable (`lesionkit.download`)."""

from __future__ import annotations

import sys

from lesionkit.download import BASE_URL, download_isic2017


def add_arguments(parser) -> None:
    parser.add_argument("dataset", choices=["isic2017"], help="which dataset to fetch")
    parser.add_argument("--root", required=True, help="folder to download and unpack into")
    parser.add_argument("--base-url", default=BASE_URL, help=f"where the files live (default {BASE_URL})")
    parser.add_argument("--parts", default="train,val,test", help="comma-separated subset of train,val,test")
    parser.add_argument("--retries", type=int, default=3, help="resume attempts per file (default 3)")
    parser.add_argument("--remove-zips", action="store_true", help="delete each zip once unpacked")


def run(args) -> int:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    layout = download_isic2017(
        args.root,
        parts,
        base_url=args.base_url,
        retries=args.retries,
        remove_zips=args.remove_zips,
        progress=sys.stderr.isatty(),
    )
    print(f"ISIC 2017 ({', '.join(parts)}) is in {args.root}. Pack it with:")
    for part, paths in layout.items():
        print(
            f"  lesionkit pack --images {paths['images']} --labels {paths['labels']} "
            f"--out shards/isic2017-{part}"
        )
    return 0
