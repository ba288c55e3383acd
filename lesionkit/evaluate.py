"""`lesionkit evaluate`: score a checkpoint on packed shards -> metrics.json, predictions.csv, plots.

Runs on 1..N processes (`accelerate launch -m lesionkit.evaluate ...`): each rank scores its part of
the exactly-once evaluation reader, the per-sample logits are gathered once with `gather_object`, and
the main process computes the metrics and writes the output folder atomically (a temp folder renamed
into place, so a crash never leaves a half-written report).

Test-time augmentation averages probabilities over views: `flips` (identity, horizontal, vertical,
both) or `d4` (the 8 rotations/reflections of the square; dermoscopy has no canonical orientation).
Temperature scaling (`--fit-temperature` on a validation set) is stored as `temperature.json` in the
checkpoint folder and applied from then on by `evaluate` and `predict`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lesionkit import metrics as M
from lesionkit.atomic import replace_dir, write_json
from lesionkit.inference import TTA_MODES, gather_predictions, predict_logits

TEMPERATURE_FILE = "temperature.json"
THRESHOLDS_FILE = "thresholds.json"


class EvaluateError(ValueError):
    """Bad input for evaluate/predict; the message names the culprit and is shown as is."""


def exit_on_error(command: str, body: Callable[[], int]) -> int:
    """Run a command's body; a bad input ends it with one line on stderr and no traceback: exit 2 for
    flags, checkpoints and class lists (as `train` does for its config), 1 for corrupt data met while
    reading (as `train` does), so scripts can tell "fix the command" from "fix the data"."""
    from lesionkit.data import CorruptDataError, error_message

    try:
        return body()
    except EvaluateError as exc:
        message, code = str(exc), 2
    except CorruptDataError as exc:
        message, code = error_message(exc), 1
    print(f"lesionkit {command}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ----------------------------------------------------------------------------------------- inference
def predict_probs(model, loader, device, preprocess, tta: str = "none", temperature: float = 1.0):
    """(keys, labels, probs [N, C]): softmax(logits / T) averaged over the TTA views."""
    keys, labels, logits = predict_logits(model, loader, device, preprocess, tta)
    return keys, labels, M.softmax_views(logits, temperature)


# ------------------------------------------------------------------------------------------ helpers
def load_checkpoint(path: str | Path, device="cpu"):
    """(model on `device`, info, temperature) with user-facing errors naming the checkpoint."""
    from lesionkit.checkpoint import load_inference_model

    path = Path(path)
    if not path.is_dir():
        raise EvaluateError(f"checkpoint folder not found: {path}")
    try:
        model, info = load_inference_model(path, map_location="cpu")
    except FileNotFoundError as exc:
        raise EvaluateError(str(exc)) from None
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise EvaluateError(f"{path}: cannot load the model from this checkpoint ({first})") from None
    return model.to(device).eval(), info, read_temperature(path)


def read_temperature(ckpt: Path) -> float:
    path = Path(ckpt) / TEMPERATURE_FILE
    return float(json.loads(path.read_text())["temperature"]) if path.is_file() else 1.0


def check_classes(info: dict, data_classes: list[str], ckpt, data) -> None:
    if list(info["classes"]) != list(data_classes):
        raise EvaluateError(
            f"checkpoint {ckpt} was trained on classes {info['classes']} but {data} has {data_classes}; "
            "evaluate it on data packed with the same class list"
        )


def build_preprocess(info: dict, device):
    """The deterministic eval transform of training (shared module, so train and eval match)."""
    from lesionkit.augment import build_augment

    return build_augment("none", info["image_size"], info["mean"], info["std"],
                         color_constancy=bool(info.get("color_constancy", False))).eval().to(device)


def write_dir_atomic(out: Path, fill: Callable[[Path], None]) -> Path:
    """Build `out` in a sibling temp folder with `fill(tmp)`, then swap it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def predictions_frame(keys, labels, probs, classes) -> pd.DataFrame:
    df = pd.DataFrame({"image_id": keys, "label": labels,
                       "label_name": [classes[i] for i in labels]})
    for c, name in enumerate(classes):
        df[name] = probs[:, c]
    return df


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def summary_table(m: dict, classes: list[str]) -> str:
    ci = m.get("ci", {})
    lines = [f"{'class':<22}{'n':>6}{'AUC':>8}{'95% CI':>17}{'AUC>80%':>9}{'AP':>8}{'sens':>8}{'spec':>8}"]
    for c in classes:
        lo_hi = ci.get(f"auc_{c}")
        ci_txt = f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "-"
        lines.append(f"{c:<22}{m[f'n_{c}']:>6}{_fmt(m[f'auc_{c}']):>8}{ci_txt:>17}"
                     f"{_fmt(m[f'auc_sens_80_{c}']):>9}{_fmt(m[f'ap_{c}']):>8}{_fmt(m[f'sens_{c}']):>8}"
                     f"{_fmt(m[f'spec_{c}']):>8}")
    score_ci = ci.get("isic2017_score")
    lines.append(f"ISIC 2017 score {_fmt(m['isic2017_score'])}"
                 + (f" [{score_ci[0]:.3f}, {score_ci[1]:.3f}]" if score_ci else "")
                 + f"   balanced accuracy {_fmt(m['balanced_accuracy'])}   accuracy {_fmt(m['accuracy'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/NAME/best")
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR", help="shard folder(s) to score")
    parser.add_argument("--out", help="output folder (default: <checkpoint>/../eval-<data folder name>)")
    parser.add_argument("--tta", default="none", choices=TTA_MODES, help="test-time augmentation")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--thresholds-from", metavar="PATH",
                        help="per-class thresholds chosen on validation: a shard folder (scored now, Youden's J), "
                             "a thresholds.json or an earlier evaluate output folder; default: chosen on --data "
                             "itself (optimistic)")
    parser.add_argument("--temperature", type=float,
                        help="softmax temperature (default: the checkpoint's temperature.json, else 1)")
    parser.add_argument("--fit-temperature", action="store_true",
                        help="fit the temperature on --data (a validation set) and save it with the checkpoint")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the metrics and plots to W&B: into the training run of the checkpoint "
                             "when it has one (offline without WANDB_API_KEY)")


def _score(accelerator, model, info, dirs, args, preprocess):
    from lesionkit.data import dataset_info, eval_loader

    try:
        classes, _, num_samples = dataset_info(dirs)
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluateError(str(exc)) from None
    check_classes(info, classes, args.checkpoint, " ".join(map(str, dirs)))
    loader = eval_loader(dirs, image_size=info["image_size"], batch_size=args.batch_size, workers=args.workers,
                         rank=accelerator.process_index, world_size=accelerator.num_processes)
    keys, labels, logits = predict_logits(model, loader, accelerator.device, preprocess, args.tta,
                                          autocast=accelerator.autocast)
    keys, labels, logits = gather_predictions(accelerator, keys, labels, logits)
    if len(keys) != num_samples:
        raise EvaluateError(f"scored {len(keys)} samples but the manifests of {dirs} list {num_samples}")
    if not keys:
        raise EvaluateError(f"no samples in {' '.join(map(str, dirs))}")
    return keys, labels, logits


def _thresholds(args, accelerator, model, info, preprocess, temperature, labels, probs):
    """(thresholds per class, where they came from)."""
    src = args.thresholds_from
    if not src:
        return M.choose_thresholds(labels, probs, info["classes"]), "chosen on the evaluated data (optimistic)"
    path = Path(src)
    if path.is_dir() and (path / "manifest.json").is_file():
        _, y, z = _score(accelerator, model, info, [path], args, preprocess)
        return M.choose_thresholds(y, M.softmax_views(z, temperature), info["classes"]), f"Youden's J on {path}"
    file = path / THRESHOLDS_FILE if path.is_dir() else path
    if not file.is_file():
        raise EvaluateError(f"--thresholds-from {src}: not a shard folder, a {THRESHOLDS_FILE} or a folder "
                            "holding one")
    saved = json.loads(file.read_text())
    thresholds = saved.get("thresholds", saved)
    missing = [c for c in info["classes"] if c not in thresholds]
    if missing:
        raise EvaluateError(f"--thresholds-from {file}: no threshold for class(es) {missing}")
    return {c: thresholds[c] for c in info["classes"]}, f"{file} ({saved.get('source', 'saved')})"


def log_to_wandb(ckpt: Path, prefix: str, m: dict, out: Path) -> None:
    """Metrics into the run summary and the PNGs as images, resuming the checkpoint's training run
    (its id is in trainer.pt) so evaluation lands beside the training curves."""
    from lesionkit import tracking
    from lesionkit.checkpoint import TRAINER_STATE, load_trainer_state
    from lesionkit.config import load_config

    tracking.setup_wandb_env()
    import wandb

    cfg = load_config(ckpt / "config.yaml")
    run_id = load_trainer_state(ckpt)["loop"].get("wandb_id") if (ckpt / TRAINER_STATE).is_file() else None
    run = wandb.init(project=cfg.wandb_project, dir=str(ckpt.parent), id=run_id or None,
                     resume="allow" if run_id else None, job_type="evaluate", name=cfg.run_name or None)
    run.summary.update({f"{prefix}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
    run.log({f"{prefix}/{name}": wandb.Image(str(out / f"{name}.png"))
             for name in ("roc", "confusion", "reliability")})
    mode = run.settings.mode
    run.finish()
    wandb.teardown()  # stop the service now: the offline run file is complete when this returns
    print(f"lesionkit evaluate: logged to W&B ({mode}) under {prefix}/ in {ckpt.parent / 'wandb'}")


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    accelerator = Accelerator()
    return exit_on_error("evaluate", lambda: _run(args, accelerator))


def _run(args, accelerator) -> int:
    if args.batch_size < 1 or args.workers < 0 or args.bootstrap < 0:
        raise EvaluateError("--batch-size must be >= 1, --workers and --bootstrap >= 0")
    model, info, temperature = load_checkpoint(args.checkpoint, accelerator.device)
    if args.temperature is not None:
        if args.temperature <= 0:
            raise EvaluateError(f"--temperature must be > 0, got {args.temperature}")
        temperature = args.temperature
    classes = list(info["classes"])
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{Path(args.data[0]).name}"
    preprocess = build_preprocess(info, accelerator.device)
    keys, labels, logits = _score(accelerator, model, info, args.data, args, preprocess)

    if args.fit_temperature:
        temperature = M.fit_temperature(logits.mean(axis=1), labels)
    probs = M.softmax_views(logits, temperature)
    thresholds, source = _thresholds(args, accelerator, model, info, preprocess, temperature, labels, probs)
    if not accelerator.is_main_process:
        return 0

    m = M.compute_metrics(labels, probs, classes, thresholds=thresholds)
    if args.bootstrap:
        m["ci"] = M.bootstrap_ci(labels, probs, classes, n=args.bootstrap, seed=args.seed)
    m.update({
        "checkpoint": str(args.checkpoint), "data": [str(d) for d in args.data], "model": info["model"],
        "classes": classes, "image_size": info["image_size"], "tta": args.tta, "temperature": temperature,
        "thresholds_source": source, "world_size": accelerator.num_processes,
    })
    own_thresholds = M.choose_thresholds(labels, probs, classes)

    def fill(tmp: Path) -> None:
        (tmp / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
        (tmp / THRESHOLDS_FILE).write_text(json.dumps(
            {"thresholds": own_thresholds, "source": f"Youden's J on {' '.join(args.data)}"}, indent=2) + "\n")
        predictions_frame(keys, labels, probs, classes).to_csv(tmp / "predictions.csv", index=False)
        from lesionkit import plots

        plots.roc_figure(labels, probs, classes, tmp / "roc.png", title=f"ROC: {info['model']} on "
                         f"{Path(args.data[0]).name}")
        plots.confusion_figure(m["confusion_matrix"], classes, tmp / "confusion.png")
        plots.reliability_figure(labels, probs, tmp / "reliability.png")

    write_dir_atomic(out, fill)
    if args.fit_temperature:
        write_json(Path(args.checkpoint) / TEMPERATURE_FILE,
                          {"temperature": temperature, "fitted_on": [str(d) for d in args.data],
                           "n": int(labels.size), "tta": args.tta})
        print(f"lesionkit evaluate: temperature {temperature:.4f} saved to "
              f"{Path(args.checkpoint) / TEMPERATURE_FILE}")
    if args.wandb:
        log_to_wandb(Path(args.checkpoint), f"eval/{Path(args.data[0]).name}", m, out)
    print(summary_table(m, classes))
    print(f"lesionkit evaluate: {len(keys)} images, tta={args.tta}, {accelerator.num_processes} process(es) "
          f"-> {out}/ (metrics.json, predictions.csv, roc.png, confusion.png, reliability.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lesionkit evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
