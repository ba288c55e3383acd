"""Small real ISIC 2019 / 2020 shard folders for the task and fold tests: label CSVs of whole lesions /
whole patients chosen from ../shared/data, packed at 32 px (seconds, not the minutes of a full pack)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd

from lesionkit.pack import pack
from lesionkit.tasks import ISIC2019_CLASSES

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
I2019 = DATA / "isic2019-256"
I2020 = DATA / "isic2020-256"
GT2019 = I2019 / "ISIC_2019_Training_GroundTruth.csv"
META2019 = I2019 / "ISIC_2019_Training_Metadata.csv"
HAM = I2019 / "HAM10000_metadata.csv"
GT2020 = I2020 / "ISIC_2020_Training_GroundTruth.csv"


def subset_2019(csv: Path, lesions_per_class: int = 6, unlisted_per_class: int = 2) -> pd.DataFrame:
    """Rows of the official 2019 ground truth: per class the images of its first lesions (several images
    each where HAM10000 has them) plus a few archive images without a lesion id; written to `csv`."""
    gt = pd.read_csv(GT2019, dtype=str)
    meta = pd.read_csv(META2019, dtype=str, keep_default_na=False)[["image", "lesion_id"]]
    gt = gt.merge(meta, on="image")
    gt["y"] = gt[list(ISIC2019_CLASSES)].astype(float).idxmax(axis=1)
    sizes = gt[gt.lesion_id != ""].groupby("lesion_id").size()
    parts = []
    for c in ISIC2019_CLASSES:
        rows = gt[gt.y == c]
        multi = sorted(set(rows.lesion_id) & set(sizes[sizes > 1].index))[:lesions_per_class]
        parts += [rows[rows.lesion_id.isin(multi)], rows[rows.lesion_id == ""].head(unlisted_per_class)]
    picked = pd.concat(parts).sort_values("image")
    picked[pd.read_csv(GT2019, nrows=0).columns].to_csv(csv, index=False)
    return picked


def subset_2020(csv: Path, melanoma_patients: int = 5, other_patients: int = 5) -> pd.DataFrame:
    """Rows of the ISIC 2020 ground truth of whole patients, some with melanomas; written to `csv`."""
    gt = pd.read_csv(GT2020, dtype=str, keep_default_na=False)
    with_mel = sorted(gt[gt.target == "1"].patient_id.unique())[:melanoma_patients]
    without = sorted(set(gt.patient_id) - set(gt[gt.target == "1"].patient_id))[:other_patients]
    picked = gt[gt.patient_id.isin(with_mel + without)]
    picked.to_csv(csv, index=False)
    return picked


def pack_2019(root: Path) -> tuple[Path, pd.DataFrame]:
    picked = subset_2019(root / "gt2019.csv")
    out = root / "isic2019"
    pack(I2019 / "ISIC_2019_Training_Input", root / "gt2019.csv", out, size=32, shard_size=12, workers=2,
         metadata=META2019)  # fmt: skip
    return out, picked


def pack_2020(root: Path, **kw) -> tuple[Path, pd.DataFrame]:
    picked = subset_2020(root / "gt2020.csv")
    out = root / kw.pop("name", "isic2020")
    pack(I2020 / "train", root / "gt2020.csv", out, size=32, shard_size=25, workers=2, **kw)
    return out, picked


def records(folder: Path) -> dict[str, dict]:
    """id -> the JSON record of every sample, read with the standard library's tarfile."""
    out = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    rec = json.load(io.TextIOWrapper(tf.extractfile(member), encoding="utf-8"))
                    out[rec["id"]] = rec
    return out
