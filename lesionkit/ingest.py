"""Turn an image folder + a labels CSV (+ optional metadata CSV) into one validated sample table.

Three label formats are recognised from the CSV header:
- ISIC 2017 Part 3: `image_id,melanoma,seborrheic_keratosis` (nevus = both 0), classes in the order
  of the original study: nevus=0, melanoma=1, seborrheic_keratosis=2;
- ISIC 2018/2019 one-hot: `image,MEL,NV,BCC,...`, every non-id column is a class, in header order;
- plain: `image_id,label` with class names (sorted) or integer class indices.

Every problem is collected (not just the first) so one run tells the user everything that is wrong;
`collect(skip_bad=True)` turns the per-sample problems into a skipped list instead of an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lesionkit.errors import UsageError
from lesionkit.tasks import ISIC2017_CLASSES, ISIC2017_SCORED

ID_COLUMNS = ("image_id", "image")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# The official ISIC 2017 zips ship superpixel maps beside the images; they are not samples.
IGNORED_STEMS = ("_superpixels",)
MAX_LISTED = 10


class IngestError(UsageError):
    """Bad input; the message names the culprits and is meant to be shown to the user as is."""


@dataclass
class Samples:
    """The validated table: one row per sample with id, path, label, label_name, meta (dict)."""

    table: pd.DataFrame
    classes: list[str]
    label_format: str
    skipped: list[dict] = field(default_factory=list)  # [{"id", "reason"}], only with skip_bad
    unlisted: list[str] = field(default_factory=list)  # image files whose id is not in the CSV


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


def parse_labels(csv: str | Path) -> tuple[pd.DataFrame, list[str], str, list[tuple[str, str]]]:
    """Read a labels CSV of any known format -> (table[id, label, label_name], classes, format, problems).

    Whole-file errors (missing/empty file, missing columns) raise IngestError; per-row problems
    (bad values, several positives, duplicate ids) are returned as (id, reason) pairs.
    """
    path = Path(csv)
    df = _read_csv(path, "labels")
    id_col = _id_column(df, path)
    ids = df[id_col].str.strip()
    label_cols = [c for c in df.columns if c != id_col]
    isic2017 = set(ISIC2017_SCORED)
    if label_cols == ["label"]:
        fmt = "plain"
        classes, labels, problems = _plain(df["label"], ids)
    elif isic2017 & set(label_cols):
        fmt = "isic2017"
        missing = sorted(isic2017 - set(label_cols))
        extra = [c for c in label_cols if c not in isic2017]
        if missing or extra:
            raise IngestError(
                f"{path}: ISIC 2017 Part 3 labels need columns {id_col},melanoma,seborrheic_keratosis"
                + (f"; missing column(s): {', '.join(missing)}" if missing else "")
                + (f"; unexpected column(s): {', '.join(extra)}" if extra else "")
            )
        classes = list(ISIC2017_CLASSES)
        labels, problems = _one_hot(df, list(ISIC2017_SCORED), ids, classes, nevus_default=True)
    elif len(label_cols) >= 2:
        fmt = "onehot"
        classes = label_cols
        labels, problems = _one_hot(df, label_cols, ids, classes, nevus_default=False)
    else:
        raise IngestError(
            f"{path}: missing label columns; expected {id_col},label or "
            f"{id_col},melanoma,seborrheic_keratosis or {id_col},<one column per class>; "
            f"found columns: {', '.join(df.columns)}"
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
    return table, classes, fmt, problems


def read_labels(csv: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Strict read: (table[id, label, label_name], classes); any bad row raises IngestError."""
    table, classes, _, problems = parse_labels(csv)
    if problems:
        raise IngestError(_problems_message(str(csv), problems))
    return table, classes


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
        return number if not (isinstance(number, float) and math.isnan(number)) else None
    return text


def read_metadata(csv: str | Path) -> dict[str, dict]:
    """ISIC metadata CSV (`image_id,age_approximate,sex`, any extra columns) -> id -> {column: value}."""
    path = Path(csv)
    df = _read_csv(path, "metadata")
    id_col = _id_column(df, path)
    ids = df[id_col].str.strip()
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise IngestError(f"{path}: duplicate ids in metadata: {name_some(dup)}")
    columns = [c for c in df.columns if c != id_col]
    return {
        i: {c: _value(v.strip()) for c, v in zip(columns, row)}
        for i, row in zip(ids, df[columns].itertuples(index=False, name=None))
    }


def collect(
    images: str | Path, labels: str | Path, metadata: str | Path | None = None, skip_bad: bool = False
) -> Samples:
    """Join labels, image files and metadata; raise IngestError naming every bad sample unless skip_bad.

    Image files whose id is not in the CSV are not an error (returned in `unlisted` for a warning):
    official image folders often hold more than one split's labels cover.
    """
    table, classes, fmt, problems = parse_labels(labels)
    files = find_images(images)
    if not files:
        raise IngestError(f"{images}: no image files (*.jpg, *.jpeg, *.png)")
    listed = set(table["id"])
    problems += [(i, f"no image file in {images}") for i in table["id"] if i not in files]
    meta = read_metadata(metadata) if metadata is not None else {}
    if problems and not skip_bad:
        raise IngestError(_problems_message(str(labels), problems))
    bad_ids = {i for i, _ in problems}
    skipped = [{"id": i, "reason": r} for i, r in problems]
    table = table[~table["id"].isin(bad_ids)].reset_index(drop=True)
    if table.empty:
        raise IngestError(f"{labels}: no usable samples left after skipping {len(skipped)} bad one(s)")
    table["path"] = [str(files[i]) for i in table["id"]]
    table["meta"] = [meta.get(i, {}) for i in table["id"]]
    unlisted = sorted(set(files) - listed)
    return Samples(table=table, classes=classes, label_format=fmt, skipped=skipped, unlisted=unlisted)
