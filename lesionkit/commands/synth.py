"""`lesionkit synth`: a synthetic dermoscopy dataset in the official ISIC 2017 layout (`lesionkit.synth`)."""

from __future__ import annotations

from lesionkit.synth.generator import ISIC2017_PRIORS, contact_sheet, synthesize


def add_arguments(parser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder to create (ISIC 2017 layout)")
    parser.add_argument(
        "--n-train", type=int, default=2000, metavar="N", help="training images (default 2000)"
    )
    parser.add_argument("--n-val", type=int, default=150, metavar="M", help="validation images (default 150)")
    parser.add_argument(
        "--size", type=int, default=256, metavar="S", help="image side in pixels (default 256)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="same seed, same bytes (default 0)")
    parser.add_argument(
        "--difficulty",
        type=float,
        default=0.5,
        metavar="D",
        help="chance each feature group comes from a random class: 0 = textbook, 1 = no signal (default 0.5)",
    )
    parser.add_argument(
        "--hair-prob",
        type=float,
        default=0.3,
        metavar="P",
        help="fraction of images with hairs (default 0.3)",
    )
    parser.add_argument(
        "--priors",
        type=float,
        nargs=3,
        default=list(ISIC2017_PRIORS),
        metavar=("NEVUS", "MELANOMA", "SK"),
        help="class priors (default ISIC 2017: 0.69 0.19 0.12)",
    )
    parser.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG quality (default 95)")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="W", help="processes (default min(4, CPUs))"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--contact-sheet", metavar="PNG", help="also write a PNG grid of samples per class")


def run(args) -> int:
    summary = synthesize(
        args.out,
        args.n_train,
        args.n_val,
        size=args.size,
        seed=args.seed,
        priors=tuple(args.priors),
        difficulty=args.difficulty,
        hair_prob=args.hair_prob,
        workers=args.workers,
        force=args.force,
        quality=args.quality,
    )
    for split, info in summary["splits"].items():
        counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
        print(f"{split}: {info['num_samples']} images ({counts})")
    print(f"wrote {summary['root']}")
    if args.contact_sheet:
        print(f"wrote {contact_sheet(args.out, args.contact_sheet)}")
    return 0
