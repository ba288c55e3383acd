"""`lesionkit evaluate`: score a checkpoint on packed shards -> metrics.json, predictions.csv, plots
(`lesionkit.evaluate`); several processes with `accelerate launch -m lesionkit.evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionkit import metrics as M
from lesionkit import modelcard, sources
from lesionkit.atomic import write_json
from lesionkit.config import TTA_MODES
from lesionkit.errors import UsageError
from lesionkit.evaluate import (
    evaluation_name,
    load_thresholds,
    log_to_wandb,
    score,
    summary_table,
    task_of,
    write_report,
)
from lesionkit.inference import TEMPERATURE_FILE
from lesionkit.manifest import MANIFEST


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/NAME/best")
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="DIR",
        help="shard folder(s) to score: local, http(s)://, s3://, gs:// or 'pipe:COMMAND {shard}'",
    )
    parser.add_argument("--out", help="output folder (default: <checkpoint>/../eval-<data folder name>)")
    parser.add_argument("--tta", default="none", choices=TTA_MODES, help="test-time augmentation")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--thresholds-from",
        metavar="PATH",
        help="per-class thresholds chosen on validation: a shard folder (scored now, Youden's J), "
        "a thresholds.json or an earlier evaluate output folder; default: chosen on --data "
        "itself (optimistic)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        help="softmax temperature (default: the checkpoint's temperature.json, else 1)",
    )
    parser.add_argument(
        "--fit-temperature",
        action="store_true",
        help="fit the temperature on --data (a validation set) and save it with the checkpoint",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0 = off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        help="score only this fold of --data's split (`lesionkit split`): what `train --fold K` held out",
    )
    parser.add_argument(
        "--cache-dir", help="keep remote shards here once checked against the manifest's sha256"
    )
    parser.add_argument(
        "--fetch-retries", type=int, default=5, help="retries of a dropped connection to remote shards"
    )
    parser.add_argument(
        "--explain-errors",
        type=int,
        default=0,
        metavar="N",
        help="add Grad-CAM overlays and a contact sheet of the N most confident mistakes of each class "
        "(errors/ in the output folder)",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the metrics and plots to W&B: into the training run of the checkpoint "
        "when it has one (offline without WANDB_API_KEY)",
    )


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    if args.batch_size < 1 or args.workers < 0 or args.bootstrap < 0 or args.explain_errors < 0:
        raise UsageError("--batch-size must be >= 1, --workers, --bootstrap and --explain-errors >= 0")
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    accelerator = Accelerator()
    try:
        return _evaluate(args, accelerator)
    finally:  # every rank leaves the process group: exiting with it alive can abort in c10d's teardown
        accelerator.end_training()


def _evaluate(args: argparse.Namespace, accelerator) -> int:
    from lesionkit import api

    loaded = api.load(args.checkpoint, accelerator.device, args.temperature)  # also what explains errors
    model, info, temperature, preprocess = loaded.module, loaded.info, loaded.temperature, loaded.preprocess
    classes, task = list(info["classes"]), task_of(info)
    out = (
        Path(args.out)
        if args.out
        else Path(args.checkpoint).parent / f"eval-{sources.display_name(args.data[0])}"
    )
    fetch = sources.Fetch(cache_dir=args.cache_dir, retries=args.fetch_retries)

    def scored(dirs, folds=None):
        return score(
            accelerator,
            model,
            info,
            dirs,
            args.checkpoint,
            args.tta,
            args.batch_size,
            args.workers,
            preprocess,
            folds,
            fetch,
        )

    keys, labels, logits = scored(args.data, None if args.fold is None else [args.fold])
    if args.fit_temperature:
        temperature = M.fit_temperature(logits.mean(axis=1), labels)
    probs = M.softmax_views(logits, temperature)
    src = Path(args.thresholds_from) if args.thresholds_from else None
    if src is None:
        thresholds, source = (
            M.choose_thresholds(labels, probs, classes),
            "chosen on the evaluated data (optimistic)",
        )
    elif (src / MANIFEST).is_file():
        _, y, z = scored([src])
        thresholds, source = (
            M.choose_thresholds(y, M.softmax_views(z, temperature), classes),
            f"Youden's J on {src}",
        )
    else:
        thresholds, source = load_thresholds(src, classes)
    if not accelerator.is_main_process:
        return 0

    m = task.metrics(labels, probs, classes, thresholds=thresholds)
    if args.bootstrap:
        m["ci"] = task.bootstrap_ci(labels, probs, classes, n=args.bootstrap, seed=args.seed)
    m.update(
        {
            "checkpoint": str(args.checkpoint),
            "data": [str(d) for d in args.data],
            "fold": args.fold,
            "model": info["model"],
            "task": task.name,
            "classes": classes,
            "image_size": info["image_size"],
            "tta": args.tta,
            "temperature": temperature,
            "thresholds_source": source,
            "world_size": accelerator.num_processes,
        }
    )

    def explain_errors(folder: Path) -> None:
        from lesionkit.evaluate import images_of
        from lesionkit.explain import most_confident_errors, write_explanations

        picked = most_confident_errors(labels, probs, args.explain_errors)
        if not picked:
            return
        chosen = [keys[i] for i in picked]
        folds = None if args.fold is None else [args.fold]
        images, meta = images_of(args.data, chosen, info["image_size"], folds, fetch, loaded.meta)
        write_explanations(
            loaded,
            chosen,
            images,
            probs[picked],
            folder / "errors",
            labels=labels[picked],
            title=f"the {args.explain_errors} most confident mistakes of each class: {info['model']} on "
            f"{sources.display_name(args.data[0])} (Grad-CAM of the predicted class)",
            meta=meta,
        )

    write_report(
        out,
        m,
        keys,
        labels,
        probs,
        classes,
        M.choose_thresholds(labels, probs, classes),
        args.data,
        title=f"ROC: {info['model']} on {sources.display_name(args.data[0])}",
        extra=explain_errors if args.explain_errors else None,
    )
    if args.fit_temperature:
        write_json(
            Path(args.checkpoint) / TEMPERATURE_FILE,
            {
                "temperature": temperature,
                "n": int(labels.size),
                "fitted_on": [str(d) for d in args.data],
                "tta": args.tta,
            },
        )
        print(
            f"lesionkit evaluate: temperature {temperature:.4f} saved to "
            f"{Path(args.checkpoint) / TEMPERATURE_FILE}"
        )
    try:  # the report is written; a read-only checkpoint folder only costs the card its new section
        card = modelcard.add_evaluation(
            Path(args.checkpoint),
            evaluation_name(args.data, args.fold, args.tta),
            {
                **m,
                "ece_t1": M.expected_calibration_error(labels, M.softmax_views(logits, 1.0)),
                "thresholds": thresholds,
                "out": str(out),
            },
        )
    except OSError as exc:
        card = f"not updated ({exc.strerror or exc}: {Path(args.checkpoint) / modelcard.CARD})"
    if args.wandb:
        log_to_wandb(Path(args.checkpoint), info, f"eval/{sources.display_name(args.data[0])}", m, out)
    print(summary_table(m, classes, task))
    print(
        f"lesionkit evaluate: {len(keys)} images, tta={args.tta}, {accelerator.num_processes} process(es) "
        f"-> {out}/ (metrics.json, predictions.csv, roc.png, confusion.png, reliability.png); "
        f"model card {card}"
    )
    return 0
