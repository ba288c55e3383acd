"""Turn an image folder + a labels CSV (+ optional metadata CSVs) into one validated sample table.

Label formats are recognised from the CSV header (and decide the task, see `lesionkit.tasks`):
- ISIC 2017 Part 3: `image_id,melanoma,seborrheic_keratosis` (nevus = both 0), classes in the order
  of the original study: nevus=0, melanoma=1, seborrheic_keratosis=2;
- ISIC 2018/2019 one-hot: `image,MEL,NV,BCC,...`, every non-id column is a class, in header order; the
  2019 `UNK` column (no positives in training labels) is dropped when it has no positive;
- ISIC 2020: `image_name,patient_id,...,diagnosis,benign_malignant,target`: `target` (melanoma or not)
  by default, or the finer `diagnosis` (`label_column="diagnosis"`); the other columns are metadata;
- HAM10000 metadata: `lesion_id,image_id,dx,...`: `dx` as the ISIC 2018 classes, or with task isic2019
  as the 2019 classes, where an `akiec` row is a bad sample: the 2019 labels split akiec into AK and
  SCC, which only the ISIC 2019 ground truth CSV knows;
- plain: `image_id,label` with class names (sorted) or integer class indices, any further columns
  being metadata.

Metadata (from the labels CSV's extra columns and from `--metadata` CSVs) is stored under one
vocabulary whatever the release calls it (`META_NAMES`: age, sex, site), group ids under `GROUP_NAMES`
(patient, lesion); empty cells and `unknown` are missing (None). Label columns (`dx`, `diagnosis`,
`target`, ...) are never metadata: a model fed them would read the answer.

Every problem is collected (not just the first) so one run tells the user everything that is wrong;
`collect(skip_bad=True)` turns the per-sample problems into a skipped list instead of an error.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lesionkit import tasks
from lesionkit.errors import UsageError
from lesionkit.tasks import (
    HAM10000_DX,
    HAM10000_DX_2019,
    ISIC2017_CLASSES,
    ISIC2017_SCORED,
    ISIC2018_CLASSES,
    ISIC2019_CLASSES,
    ISIC2019_UNKNOWN,
)

ID_COLUMNS = ("image_id", "image", "image_name")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# The official ISIC 2017 zips ship superpixel maps beside the images; they are not samples.
IGNORED_STEMS = ("_superpixels",)
MAX_LISTED = 10
# One metadata vocabulary across ISIC releases: CSV column -> the name in each sample's `meta`.
META_NAMES = {
    "age_approx": "age",
    "age_approximate": "age",
    "age": "age",
    "sex": "sex",
    "gender": "sex",
    "anatom_site_general": "site",
    "anatom_site_general_challenge": "site",
}
GROUP_NAMES = {"patient_id": "patient", "lesion_id": "lesion"}  # CSV column -> group kind
GROUP_KINDS = ("patient", "lesion")
LABEL_COLUMNS = {"dx", "dx_type", "diagnosis", "benign_malignant", "target", "label"}  # never metadata
MISSING = {"", "unknown", "nan", "na", "n/a", "none", "null"}  # of the vocabulary's fields (lower case)
TRUTH_2019 = "ISIC_2019_Training_GroundTruth.csv as --labels (and HAM10000_metadata.csv as --metadata)"
AKIEC_2019 = f"dx akiec is AK or SCC in the ISIC 2019 labels, which dx cannot tell: pass {TRUTH_2019}"
LABEL_CHOICES = {"isic2020": ("target", "diagnosis"), "ham10000": ("dx",), "plain": ("label",)}


class IngestError(UsageError):
    """Bad input; the message names the culprits and is meant to be shown to the user as is."""


@dataclass
class Labels:
    """A parsed labels CSV: table[id, label, label_name], the classes, its format, the task it implies,
    per-row problems, metadata and group ids from its own extra columns, and notes for the user."""

    table: pd.DataFrame
    classes: list[str]
    label_format: str
    task: str
    problems: list[tuple[str, str]]
    meta: dict[str, dict] = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Samples:
    """The validated table: one row per sample with id, path, label, label_name, meta and groups (dicts)."""

    table: pd.DataFrame
    classes: list[str]
    label_format: str
    task: str = "custom"
    skipped: list[dict] = field(default_factory=list)  # [{"id", "reason"}], only with skip_bad
    unlisted: list[str] = field(default_factory=list)  # image files whose id is not in the CSV
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. HAM10000 classes)


def name_some(items: list[str], limit: int = MAX_LISTED) -> str:
    """`a, b, c ... and 7 more`: long culprit lists stay readable."""
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _problems_message(source: str, problems: list[tuple[str, str]]) -> str:
    """Group (id, reason) pairs by reason: one line per kind of problem, naming the ids."""
    by_reason: dict[str, list[str]] = {}
    for sample_id, reason in problems:
        by_reason.setdefault(reason, []).append(sample_id)
    lines = [f"{source}: {len(problems)} bad sample(s):"]
    lines += [f"  {reason}: {name_some(ids)}" for reason, ids in by_reason.items()]
    return "\n".join(lines)


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise IngestError(f"{what} CSV not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise IngestError(f"{path}: empty {what} CSV (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: cannot parse {what} CSV: {e}") from None
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise IngestError(f"{path}: {what} CSV has a header but no rows")
    return df


def _id_column(df: pd.DataFrame, path: Path) -> str:
    for name in ID_COLUMNS:
        if name in df.columns:
            return name
    raise IngestError(
        f"{path}: missing id column (one of {', '.join(ID_COLUMNS)}); found columns: {', '.join(df.columns)}"
    )


def _binary(value: str) -> int | None:
    """0/1 (also written 0.0/1.0) -> int; anything else -> None."""
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def _one_hot(df: pd.DataFrame, columns: list[str], ids: pd.Series, classes: list[str], nevus_default: bool):
    """Per row: the one positive column's class index, or a problem (`nevus_default`: none = class 0)."""
    labels, problems = [], []
    for sample_id, row in zip(ids, df[columns].itertuples(index=False, name=None)):
        values = [_binary(v) for v in row]
        bad = [f"{c}={v!r}" for c, v, b in zip(columns, row, values) if b is None]
        positives = [c for c, b in zip(columns, values) if b == 1]
        if bad:
            problems.append((sample_id, f"label values other than 0/1 ({', '.join(bad)})"))
        elif len(positives) > 1:
            problems.append((sample_id, f"more than one positive class ({'+'.join(positives)})"))
        elif not positives and not nevus_default:
            problems.append((sample_id, "no positive class"))
        labels.append(classes.index(positives[0]) if len(positives) == 1 else 0)
    return labels, problems


def _plain(values: pd.Series, ids: pd.Series):
    """`label` column: integer class indices, or class names sorted alphabetically."""
    values = values.str.strip()
    missing = [(i, "missing label") for i, v in zip(ids, values) if v == ""]
    present = values[values != ""]
    if not present.empty and present.str.fullmatch(r"\d+").all():
        classes = [str(i) for i in range(int(present.astype(int).max()) + 1)]
        labels = [int(v) if v else 0 for v in values]
    else:
        classes = sorted(present.unique())
        labels = [classes.index(v) if v else 0 for v in values]
    return classes, labels, missing


def _slug(text: str) -> str:
    """A class name from a free-text value: `lentigo NOS` -> `lentigo_nos` (usable in metric names)."""
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def _format(columns: list[str], id_col: str) -> str:
    if "target" in columns or (id_col == "image_name" and "label" not in columns):
        return "isic2020"
    if "dx" in columns and "lesion_id" in columns:
        return "ham10000"
    if "label" in columns:
        return "plain"
    if set(ISIC2017_SCORED) & set(columns):
        return "isic2017"
    return "onehot"


def _isic2020(df: pd.DataFrame, ids: pd.Series, label_column: str, path: Path):
    """`target` (benign / melanoma) or `diagnosis` (its values as classes, checked against `target`)."""
    if label_column not in df.columns:
        raise IngestError(
            f"{path}: ISIC 2020 labels need a {label_column!r} column; found {', '.join(df.columns)} (the "
            "test set's CSV has no labels: `lesionkit predict --images` scores its images)"
        )
    if label_column == "target":
        labels, problems = [], []
        for i, v in zip(ids, df["target"].str.strip()):
            value = _binary(v)
            if value is None:
                problems.append((i, f"target {v!r} is not 0/1"))
            labels.append(value or 0)
        return list(tasks.ISIC2020_CLASSES), labels, problems
    names = df["diagnosis"].str.strip().map(_slug)
    problems = [(i, "missing diagnosis") for i, v in zip(ids, names) if v == ""]
    if "target" in df.columns:
        for i, name, target in zip(ids, names, df["target"].str.strip()):
            if name and (name == tasks.MELANOMA) != (_binary(target) == 1):
                problems.append((i, f"diagnosis {name!r} disagrees with target {target!r}"))
    classes = sorted(set(names) - {""})
    return classes, [classes.index(v) if v else 0 for v in names], problems


def _ham10000(df: pd.DataFrame, ids: pd.Series, task: str | None):
    """`dx` as the ISIC 2018 classes, or (task isic2019) as the 2019 classes where dx decides them: an
    `akiec` row is then a bad sample (AK or SCC?) that only the ISIC 2019 ground truth can label."""
    to_2019 = task == "isic2019"
    mapping, classes = (HAM10000_DX_2019, ISIC2019_CLASSES) if to_2019 else (HAM10000_DX, ISIC2018_CLASSES)
    dx = df["dx"].str.strip().str.lower()
    problems = []
    for i, v in zip(ids, dx):
        if v not in mapping:
            problems.append((i, f"unknown dx {v!r} (HAM10000 has {', '.join(mapping)})"))
        elif mapping[v] is None:
            problems.append((i, AKIEC_2019))
    return list(classes), [classes.index(mapping.get(v) or "MEL") for v in dx], problems


def parse_labels(csv: str | Path, label_column: str | None = None, task: str | None = None) -> Labels:
    """Read a labels CSV of any known format. `label_column` picks the label of a CSV that has several
    (ISIC 2020: `target` or `diagnosis`); `task` (pack --task) picks HAM10000's target classes.

    Whole-file errors (missing/empty file, missing columns) raise IngestError; per-row problems
    (bad values, several positives, duplicate ids) are returned as (id, reason) pairs.
    """
    path = Path(csv)
    df = _read_csv(path, "labels")
    id_col = _id_column(df, path)
    ids = df[id_col].str.strip()
    columns = [c for c in df.columns if c != id_col]
    fmt = _format(columns, id_col)
    choices = LABEL_CHOICES.get(fmt, ())
    if label_column is not None and label_column not in choices:
        raise IngestError(
            f"{path}: --label-column {label_column!r} does not apply to this {fmt} labels CSV"
            + (f"; choose one of: {', '.join(choices)}" if choices else " (it has one label)")
        )
    notes: list[str] = []
    extra: list[str] = []  # metadata / group columns of the labels CSV itself
    if fmt == "isic2020":
        classes, labels, problems = _isic2020(df, ids, label_column or "target", path)
        extra = columns
    elif fmt == "ham10000":
        classes, labels, problems = _ham10000(df, ids, task)
        extra = columns
        notes.append(
            f"{path.name}: labels from HAM10000 `dx`, "
            + (
                "mapped to the ISIC 2019 classes except akiec (AK or SCC: no AK or SCC sample)"
                if task == "isic2019"
                else "so the ISIC 2018 classes (akiec = AKIEC)"
            )
            + f"; the ISIC 2019 ground truth splits akiec into AK and SCC: for them pass {TRUTH_2019}"
        )
    elif fmt == "plain":
        classes, labels, problems = _plain(df["label"], ids)
        extra = [c for c in columns if c != "label"]
    elif fmt == "isic2017":
        isic2017 = set(ISIC2017_SCORED)
        missing = sorted(isic2017 - set(columns))
        unexpected = [c for c in columns if c not in isic2017]
        if missing or unexpected:
            raise IngestError(
                f"{path}: ISIC 2017 Part 3 labels need columns {id_col},melanoma,seborrheic_keratosis"
                + (f"; missing column(s): {', '.join(missing)}" if missing else "")
                + (f"; unexpected column(s): {', '.join(unexpected)}" if unexpected else "")
            )
        classes = list(ISIC2017_CLASSES)
        labels, problems = _one_hot(df, list(ISIC2017_SCORED), ids, classes, nevus_default=True)
    elif len(columns) >= 2:
        classes = columns
        if ISIC2019_UNKNOWN in classes and not (df[ISIC2019_UNKNOWN].map(_binary) == 1).any():
            classes = [c for c in classes if c != ISIC2019_UNKNOWN]  # the test set's outlier column
        labels, problems = _one_hot(df, classes, ids, classes, nevus_default=False)
    else:
        raise IngestError(
            f"{path}: missing label columns; expected {id_col},label or "
            f"{id_col},melanoma,seborrheic_keratosis or {id_col},<one column per class> or the ISIC 2020 "
            f"columns (image_name,...,target); found columns: {', '.join(df.columns)}"
        )
    table = pd.DataFrame({"id": ids, "label": labels})
    table["label_name"] = [classes[i] for i in labels]
    problems += [(i, "empty id") for i in ids[ids == ""]]
    problems += [
        (i, "id contains '.', '/' or whitespace (breaks tar member names)")
        for i in ids[ids.str.contains(r"[./\\\s]", regex=True)]
    ]
    dup = ids[ids.duplicated(keep=False) & (ids != "")]
    problems += [(i, "duplicate id") for i in dup.unique()]
    implied = {"isic2017": "isic2017", "isic2020": "isic2020", "ham10000": "isic2018"}.get(fmt)
    if fmt == "ham10000" and task == "isic2019":
        implied = task
    meta, groups = _meta_and_groups(df, ids, extra)
    return Labels(table, classes, fmt, implied or tasks.detect(classes).name, problems, meta, groups, notes)


def read_labels(csv: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Strict read: (table[id, label, label_name], classes); any bad row raises IngestError."""
    parsed = parse_labels(csv)
    if parsed.problems:
        raise IngestError(_problems_message(str(csv), parsed.problems))
    return parsed.table, parsed.classes


def find_images(folder: str | Path) -> dict[str, Path]:
    """id (file stem) -> path of every image file directly in `folder` (jpg/jpeg/png, any case)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"images folder not found: {folder}")
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.stem.endswith(IGNORED_STEMS):
            found.setdefault(p.stem, []).append(p)
    clashes = [f"{paths[0].name}/{paths[1].name}" for paths in found.values() if len(paths) > 1]
    if clashes:
        raise IngestError(f"{folder}: several image files for one id: {name_some(clashes)}")
    return {k: v[0] for k, v in found.items()}


def _value(text: str):
    """Metadata cell -> int, float, None (empty) or the string itself ('unknown' stays a string)."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        if isinstance(number, float):
            return None if math.isnan(number) else int(number) if number.is_integer() else number
        return number
    return text


def _meta_and_groups(df: pd.DataFrame, ids: pd.Series, columns: list[str]) -> tuple[dict, dict]:
    """id -> metadata under the one vocabulary (`META_NAMES`; other columns under their own name) and
    id -> group ids (`GROUP_NAMES`), from `columns` of `df`; label columns are left out."""
    columns = [c for c in columns if c not in LABEL_COLUMNS]
    meta: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    for i, row in zip(ids, df[columns].itertuples(index=False, name=None)):
        m, g = {}, {}
        for column, text in zip(columns, row):
            text = text.strip()
            if column in GROUP_NAMES:
                g[GROUP_NAMES[column]] = text or None
            elif column in META_NAMES:
                value = None if text.lower() in MISSING else _value(text)
                m[META_NAMES[column]] = value.lower() if isinstance(value, str) else value
            else:
                m[column] = _value(text)
        meta[i], groups[i] = m, g
    return meta, groups


def read_metadata(csv: str | Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """A metadata CSV (ISIC 2017 `image_id,age_approximate,sex`, ISIC 2019 `image,age_approx,
    anatom_site_general,lesion_id,sex|gender`, HAM10000 `lesion_id,image_id,dx,...`, any extra columns)
    -> (id -> metadata, id -> group ids)."""
    path = Path(csv)
    df = _read_csv(path, "metadata")
    id_col = _id_column(df, path)
    ids = df[id_col].str.strip()
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise IngestError(f"{path}: duplicate ids in metadata: {name_some(dup)}")
    return _meta_and_groups(df, ids, [c for c in df.columns if c != id_col])


def _merge(*sources: dict[str, dict]) -> dict[str, dict]:
    """Per id, later sources' known values over earlier ones (a missing value never erases one)."""
    out: dict[str, dict] = {}
    for source in sources:
        for i, values in source.items():
            merged = out.setdefault(i, {})
            merged.update({k: v for k, v in values.items() if v is not None or k not in merged})
    return out


def summarize(meta: list[dict], groups: list[dict]) -> dict:
    """The manifest's summary of the samples' metadata and group ids: per field how many samples have a
    value, how many lack one, and the range (numbers) or the counts per value (at most 50 distinct)."""
    fields: dict[str, dict] = {}
    for name in sorted({k for m in meta for k in m}):
        values = [m.get(name) for m in meta]
        known = [v for v in values if v is not None]
        entry: dict = {"present": len(known), "missing": len(values) - len(known)}
        numbers = [v for v in known if isinstance(v, (int, float))]
        if numbers and len(numbers) == len(known):
            entry.update(min=min(numbers), max=max(numbers), mean=round(sum(numbers) / len(numbers), 3))
        else:
            counts = Counter(map(str, known))
            entry.update(
                values=dict(counts.most_common()) if len(counts) <= 50 else {"distinct": len(counts)}
            )
        fields[name] = entry
    kinds = {}
    for kind in GROUP_KINDS:
        ids = [g.get(kind) for g in groups]
        known = [v for v in ids if v is not None]
        if known:
            kinds[kind] = {"present": len(known), "missing": len(ids) - len(known), "unique": len(set(known))}
    return {"metadata": fields, "groups": kinds}


def collect(
    images: str | Path,
    labels: str | Path,
    metadata=None,
    skip_bad: bool = False,
    label_column: str | None = None,
    task: str | None = None,
) -> Samples:
    """Join labels, image files and metadata (a CSV path or a list of them; later files' values win);
    raise IngestError naming every bad sample unless skip_bad.

    Image files whose id is not in the CSV are not an error (returned in `unlisted` for a warning):
    official image folders often hold more than one split's labels cover.
    """
    parsed = parse_labels(labels, label_column, task)
    table, problems = parsed.table, parsed.problems
    files = find_images(images)
    if not files:
        raise IngestError(f"{images}: no image files (*.jpg, *.jpeg, *.png)")
    listed = set(table["id"])
    problems += [(i, f"no image file in {images}") for i in table["id"] if i not in files]
    extra = [
        read_metadata(m)
        for m in ([] if metadata is None else [metadata] if isinstance(metadata, (str, Path)) else metadata)
    ]
    meta = _merge(parsed.meta, *(m for m, _ in extra))
    groups = _merge(parsed.groups, *(g for _, g in extra))
    if problems and not skip_bad:
        raise IngestError(_problems_message(str(labels), problems))
    bad_ids = {i for i, _ in problems}
    skipped = [{"id": i, "reason": r} for i, r in problems]
    table = table[~table["id"].isin(bad_ids)].reset_index(drop=True)
    if table.empty:
        raise IngestError(f"{labels}: no usable samples left after skipping {len(skipped)} bad one(s)")
    table["path"] = [str(files[i]) for i in table["id"]]
    table["meta"] = [meta.get(i, {}) for i in table["id"]]
    table["groups"] = [groups.get(i, {}) for i in table["id"]]
    unlisted = sorted(set(files) - listed)
    return Samples(
        table=table,
        classes=parsed.classes,
        label_format=parsed.label_format,
        task=parsed.task,
        skipped=skipped,
        unlisted=unlisted,
        notes=parsed.notes,
    )
