"""MODEL_CARD.md in every checkpoint folder: what the model is for and what it is not, from what lesionkit
knows about the run instead of from memory.

The facts live in `card.json` beside the weights: the trainer records the training data (manifests:
sources, counts), the recipe and the validation metrics with bootstrap CIs when it saves a checkpoint;
`evaluate` adds each test evaluation (metrics with CIs, ECE before/after temperature, thresholds). The
card is re-rendered from those facts, `info.json`, `config.yaml` and `temperature.json` after each change,
so it never disagrees with the files it describes.
"""

from __future__ import annotations

import json
from pathlib import Path

from lesionkit import __version__
from lesionkit.atomic import write_json, write_text

FACTS = "card.json"
CARD = "MODEL_CARD.md"
CARD_BOOTSTRAP = 200  # resamples for the validation CIs at each save (~0.1 s on 150 images)

# the recipe fields a reader needs to judge a run (the full config is config.yaml beside the card)
RECIPE_FIELDS = (
    "model", "pretrained", "image_size", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
    "scheduler", "augment", "color_constancy", "balanced", "class_weights", "label_smoothing",
    "mixup_alpha", "cutmix_alpha", "freeze_epochs", "freeze_blocks", "ema_decay", "val_tta", "monitor",
    "fold", "seed",
)  # fmt: skip

LICENCES = {
    "isic2017": "ISIC Archive images, each CC-0 or CC BY-NC: research use, no redistribution",
    "isic2018": "HAM10000 / ISIC 2018: CC BY-NC 4.0, research use with attribution",
    "isic2019": "ISIC 2019 (HAM10000, BCN20000, MSK): CC BY-NC 4.0, research use with attribution",
    "isic2020": "SIIM-ISIC 2020: CC BY-NC 4.0, research use with attribution",
    "ham10000": "HAM10000: CC BY-NC 4.0, research use with attribution",
}
NO_LICENCE = "not recorded: check the licence of the images' source before any use"
UNDER_REPRESENTED = 0.5  # a class with under half of an equal share of the training images


def dataset_facts(locations, fold: int = -1, held_out: bool = False) -> list[dict]:
    """Per shard folder: samples, counts per class, task, sources and metadata summary of its manifest.
    With `fold` >= 0 the counts are those `--fold` trains on (every other fold of the folder's split), or
    with `held_out` the ones it validates on (that fold), not the whole folder's."""
    from lesionkit.manifest import read_manifest, shard_selection, split_of

    out = []
    for loc in locations or []:
        try:
            m = read_manifest(loc)
            num, counts = m.get("num_samples"), m.get("counts", {})
            if fold >= 0:
                k = split_of(m, loc, [fold])["folds"]
                picked, _ = shard_selection(
                    m, loc, [fold] if held_out else [f for f in range(k) if f != fold]
                )
                num = sum(n for _, n, _ in picked)
                counts = {c: sum(int(pc.get(c, 0)) for _, _, pc in picked) for c in m["classes"]}
        except Exception as exc:  # noqa: BLE001 - the card says why, training goes on
            out.append({"location": str(loc), "unavailable": str(exc).splitlines()[0]})
            continue
        out.append(
            {
                "location": str(loc),
                "task": m.get("task"),
                "num_samples": num,
                "counts": counts,
                "sources": m.get("sources", {}),
                "metadata": m.get("metadata"),
            }
        )
    return out


def read_facts(ckpt: Path) -> dict:
    path = Path(ckpt) / FACTS
    return json.loads(path.read_text()) if path.is_file() else {}


def record_training(ckpt: Path, training: dict, task, classes, metrics: dict, val_y=None, val_p=None) -> None:
    """The trainer's facts at a save (main process, into the staging folder before publish); `training`
    is `training_facts(cfg)`, read once per run."""
    ci = None
    if val_y is not None and len(val_y):
        ci = task.bootstrap_ci(val_y, val_p, classes, n=CARD_BOOTSTRAP, seed=0)
    facts = {
        "training": training,
        "validation": {"metrics": _plain(metrics), "ci": ci},
        "evaluations": {},
    }
    write_json(Path(ckpt) / FACTS, facts)
    render(ckpt)


def training_facts(cfg) -> dict:
    """The run's data (its manifests, which may be remote) and recipe."""
    from lesionkit import labelmaps

    maps = labelmaps.mapped(cfg.train, cfg.label_maps)
    train = [dataset_facts([d], -1 if d in maps else cfg.fold)[0] for d in cfg.train]
    for ds in train:
        if ds["location"] in maps and "counts" in ds:  # counted in the classes it was trained as
            _mapped(ds, maps[ds["location"]])
    return {
        "train": train,
        "val": dataset_facts(cfg.val)
        if cfg.fold == -1
        else dataset_facts(labelmaps.validation_folders(cfg), cfg.fold, held_out=True),
        "fold": cfg.fold,
        "recipe": {k: getattr(cfg, k) for k in RECIPE_FIELDS if getattr(cfg, k, "") != ""},
        "lesionkit_version": __version__,
    }


def _mapped(ds: dict, name: str) -> None:
    """A `dataset_facts` entry of a --label-maps folder, counted in the classes its map gives it."""
    from lesionkit import labelmaps

    counts = labelmaps.relabel_counts(ds["counts"], labelmaps.load(name).classes)
    left_out = int(ds["num_samples"]) - sum(counts.values())
    ds.update(counts=counts, num_samples=sum(counts.values()), label_map=name, left_out=left_out)


def _label_map_lines(ds: dict) -> list[str]:
    if not ds.get("label_map"):
        return []
    return [f"  - label map `{ds['label_map']}`: {ds['left_out']} images of classes it maps to null left out"]


def _backfilled(ckpt: Path) -> dict:
    """A checkpoint saved before model cards existed: its training facts from the `config.yaml` and
    `info.json` it does have (validation metrics without CIs; the run's predictions are not kept)."""
    from lesionkit.config import load_config

    facts = read_facts(ckpt)
    if "training" not in facts and (ckpt / "config.yaml").is_file():
        facts["training"] = training_facts(load_config(ckpt / "config.yaml"))
        metrics = json.loads((ckpt / "info.json").read_text()).get("metrics") or {}
        facts.setdefault("validation", {"metrics": _plain(metrics), "ci": None})
    return facts


def add_evaluation(ckpt: Path, key: str, entry: dict) -> Path:
    """`evaluate`'s test metrics into the card (the same data, fold and TTA replace their earlier row)."""
    facts = _backfilled(Path(ckpt))
    facts.setdefault("evaluations", {})[key] = _plain(entry)
    write_json(Path(ckpt) / FACTS, facts)
    return render(ckpt)


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("confusion_matrix", "notes")}


# --------------------------------------------------------------------------------------------- rendering
def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(ci: dict | None, name: str) -> str:
    lo_hi = (ci or {}).get(name)
    return f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "–"


def _metrics_table(m: dict, ci: dict | None, classes) -> list[str]:
    rows = ["| class | n | AUC | 95% CI | AP | sensitivity | specificity |", "|---|---|---|---|---|---|---|"]
    for c in classes:
        rows.append(
            f"| {c} | {m.get(f'n_{c}', '–')} | {_f(m.get(f'auc_{c}'))} | {_ci(ci, f'auc_{c}')} | "
            f"{_f(m.get(f'ap_{c}'))} | {_f(m.get(f'sens_{c}'))} | {_f(m.get(f'spec_{c}'))} |"
        )
    return rows


def _scores(m: dict, ci: dict | None, task) -> str:
    names = dict.fromkeys([*task.composites, "auc_macro", "balanced_accuracy"])
    parts = [f"{n} **{_f(m.get(n))}** {_ci(ci, n)}" for n in names if m.get(n) is not None]
    return "; ".join(parts + [f"accuracy {_f(m.get('accuracy'))}", f"ECE {_f(m.get('ece'))}"])


def _metadata_lines(fields: dict) -> list[str]:
    """The population the images come from, as far as the manifest's metadata summary records it."""
    out = []
    for name, e in fields.items():
        if "values" in e:
            shown = ", ".join(f"{v} {n}" for v, n in list(e["values"].items())[:12])
        else:
            shown = f"{_f(e.get('min'), 0)} to {_f(e.get('max'), 0)}, mean {_f(e.get('mean'), 1)}"
        out.append(
            f"  - {name}: {shown} ({e.get('missing', 0)} of {e['present'] + e.get('missing', 0)} unknown)"
        )
    return out or ["  - no patient metadata (age, sex, site) recorded in the manifest"]


def render(ckpt: Path) -> Path:
    """Write MODEL_CARD.md from card.json, info.json, config.yaml and temperature.json."""
    from lesionkit.evaluate import task_of
    from lesionkit.inference import read_temperature

    ckpt = Path(ckpt)
    info = json.loads((ckpt / "info.json").read_text())
    facts, task, classes = read_facts(ckpt), task_of(info), list(info["classes"])
    training, val = facts.get("training", {}), facts.get("validation", {})
    lines = [
        f"# Model card: {info['model']} for {task.name} ({len(classes)} classes)",
        "",
        f"Written by lesionkit {__version__} from this checkpoint's files (`{FACTS}`, `info.json`, "
        "`config.yaml`, `temperature.json`); `lesionkit evaluate` adds its test results.",
        "",
        "## Task and classes",
        "",
        f"- task: `{task.name}`{f' ({task.description})' if task.description else ''}; official score "
        f"`{task.score}`",
        f"- classes (output order): {', '.join(f'`{c}`' for c in classes)}",
        f"- input: dermoscopy image, resized (shorter side) and centre-cropped to {info['image_size']} px, "
        f"normalised with mean {info['mean']} / std {info['std']}"
        + (", Shades-of-Gray colour constancy" if info.get("color_constancy") else ""),
        *(
            [
                f"- and patient metadata: {', '.join(info['meta_features']['fields'])} (a missing value is "
                "its own category; `predict --images` needs them per image: `--metadata CSV`)"
            ]
            if info.get("meta_features")
            else []
        ),
        f"- checkpoint: epoch {info.get('epoch', '–')}, monitor `{info.get('monitor', '–')}`",
        "",
        "## Training data",
        "",
    ]
    train_counts: dict[str, int] = {}
    for role in ("train", "val"):
        for ds in training.get(role, []):
            if "unavailable" in ds:
                lines.append(f"- {role}: `{ds['location']}` (manifest unavailable: {ds['unavailable']})")
                continue
            counts = ds.get("counts", {})
            if role == "train":
                for c, n in counts.items():
                    train_counts[c] = train_counts.get(c, 0) + n
            src = ds.get("sources") or {}
            lines += [
                f"- {role}: `{ds['location']}`: {ds.get('num_samples')} images "
                f"({', '.join(f'{c} {n}' for c, n in counts.items())})",
                f"  - sources: images `{src.get('images')}`, labels `{src.get('labels')}`",
                *_label_map_lines(ds),
                f"  - licence: {LICENCES.get(ds.get('task') or '', NO_LICENCE)}",
                *_metadata_lines(ds.get("metadata") or {}),
            ]
    if training.get("fold", -1) not in (-1, None):
        lines.append(f"- validated on fold {training['fold']} of the training folders (grouped split)")
    if not training:
        lines.append("- not recorded (a checkpoint from before model cards)")
    lines += ["", "## Recipe", ""]
    recipe = training.get("recipe", {})
    lines += [f"- {k}: `{v}`" for k, v in recipe.items()] or ["- see `config.yaml`"]
    lines += ["- full configuration: `config.yaml` beside this card", "", "## Validation", ""]
    m = val.get("metrics") or {}
    if m:
        ci = val.get("ci")
        n_boot = (ci or {}).get("n_boot")
        lines += [
            f"On the validation data above at epoch {info.get('epoch', '–')} ({m.get('n')} images, "
            f"TTA `{recipe.get('val_tta', 'none')}`, temperature 1); "
            + (
                f"95% CIs from {n_boot} bootstrap resamples of the images."
                if n_boot
                else "no CIs (the checkpoint predates model cards; `evaluate` on the same data gives them)."
            ),
            "",
            *_metrics_table(m, ci, classes),
            "",
            _scores(m, ci, task),
        ]
    else:
        lines.append("- no validation metrics recorded")
    evaluations = facts.get("evaluations", {})
    temperature = read_temperature(ckpt)
    lines += ["", "## Calibration", ""]
    lines.append(f"- validation ECE at temperature 1: {_f(m.get('ece'))}")
    if (ckpt / "temperature.json").is_file():
        t = json.loads((ckpt / "temperature.json").read_text())
        lines.append(f"- temperature {temperature:.4f}, fitted on {', '.join(t.get('fitted_on', []))}")
    else:
        lines.append("- no temperature fitted (`lesionkit evaluate --fit-temperature` on validation data)")
    for key, e in evaluations.items():
        lines.append(
            f"- {key}: ECE {_f(e.get('ece_t1'))} at temperature 1 -> {_f(e.get('ece'))} at temperature "
            f"{_f(e.get('temperature'), 4)}"
        )
    lines += ["", "## Thresholds", ""]
    chosen = [(k, e) for k, e in evaluations.items() if e.get("thresholds")]
    for key, e in chosen:
        pairs = ", ".join(f"{c} {_f(t, 4)}" for c, t in e["thresholds"].items())
        lines.append(f"- {key}: {pairs} (source: {e.get('thresholds_source')})")
    if not chosen:
        lines.append("- none chosen yet (`lesionkit evaluate --thresholds-from VALIDATION`)")
    lines += ["", "## Evaluations (`lesionkit evaluate`)", ""]
    for key, e in evaluations.items():
        lines += [
            f"### {key}",
            "",
            f"{e.get('n')} images, TTA `{e.get('tta')}`, temperature {_f(e.get('temperature'), 4)}; 95% CIs "
            f"from {(e.get('ci') or {}).get('n_boot', 0)} bootstrap resamples; report in `{e.get('out')}`.",
            "",
            *_metrics_table(e, e.get("ci"), classes),
            "",
            _scores(e, e.get("ci"), task),
            "",
        ]
    if not evaluations:
        lines += ["- none yet (`lesionkit evaluate --checkpoint THIS --data TEST`)", ""]
    total = sum(train_counts.values())
    rare = [c for c, n in train_counts.items() if total and n / total < UNDER_REPRESENTED / len(classes)]
    lines += [
        "## Intended use",
        "",
        "Research on dermoscopy image classification: benchmarking, method development, teaching. "
        "**Not a medical device**: not for diagnosis, triage or any decision about a patient; it has "
        "not been validated prospectively or cleared by any regulator.",
        "",
        "## Known limitations",
        "",
        "- Dermoscopy only: clinical (macroscopic) photographs, histology or other devices are out of scope.",
        "- Image sources: trained only on the sources listed above (public challenge data from a few "
        "dermatology centres); other dermatoscopes, clinics and populations shift performance.",
        "- Skin types: the training data do not record Fitzpatrick skin type; public ISIC/HAM10000 data "
        "come mostly from fair-skinned patients, so performance on darker skin is unknown.",
        f"- Closed set: every image gets a probability over {', '.join(classes)} only; other diagnoses "
        "are forced into these classes.",
    ]
    if rare:
        shares = ", ".join(
            f"{c} ({train_counts[c]} of {total} training images; validation AUC {_f(m.get(f'auc_{c}'))} "
            f"{_ci(val.get('ci'), f'auc_{c}')})"
            for c in rare
        )
        lines.append(
            f"- Under-represented classes: {shares}: the least training support; read their metrics "
            "with their CIs and expect more errors on them than the averages suggest."
        )
    lines += [
        "",
        "## How to reproduce",
        "",
        "```bash",
        "lesionkit train --config CHECKPOINT/config.yaml --output-dir runs/reproduce  # this folder's",
        *[
            f"lesionkit evaluate --checkpoint runs/reproduce/best --data {' '.join(e.get('data', []))}"
            + (f" --tta {e['tta']}" if e.get("tta", "none") != "none" else "")
            for e in evaluations.values()
        ],
        "```",
        "",
        f"Same seed (`{recipe.get('seed', '–')}`), same shards (checked by sha256 in their manifests); "
        "results match to floating-point noise on the same hardware class.",
        "",
    ]
    return write_text(ckpt / CARD, "\n".join(lines))
