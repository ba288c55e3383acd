"""lesionkit synth: deterministic bytes, exact class counts, ISIC 2017 layout, CLI errors, atomic writes."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from lesionkit.synth.generator import CLASSES, class_counts, contact_sheet, render, split_labels, synthesize

SPLITS = ("Training", "Validation")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lesionkit.cli", "synth", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "isic"
    synthesize(root, n_train=30, n_val=10, size=48, seed=3, workers=1)
    return root


def test_class_counts_are_largest_remainder_roundings():
    assert class_counts(100) == [69, 19, 12]
    assert class_counts(10) == [7, 2, 1]  # quotas 6.9 1.9 1.2: ties on .9 go to the earlier class
    assert class_counts(7) == [5, 1, 1]  # quotas 4.83 1.33 0.84: the largest remainder (SK) comes first
    assert class_counts(5, (1, 1, 1)) == [2, 2, 1]
    assert class_counts(0) == [0, 0, 0]
    labels = split_labels(200, (0.69, 0.19, 0.12), seed=0, split=0)
    assert np.bincount(labels).tolist() == [138, 38, 24]
    assert labels[:40].tolist() != sorted(labels[:40].tolist())  # shuffled, not grouped by class


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    again = tmp_path / "again"
    synthesize(again, n_train=30, n_val=10, size=48, seed=3, workers=1)
    assert _files(again) == _files(small)
    other = tmp_path / "other"
    synthesize(other, n_train=30, n_val=10, size=48, seed=4, workers=1)
    a, b = _files(small), _files(other)
    assert a.keys() == b.keys()
    images = [k for k in a if k.endswith(".jpg")]
    assert len(images) == 40 and all(a[k] != b[k] for k in images)


def test_process_pool_writes_the_same_bytes_as_one_process(tmp_path):
    synthesize(tmp_path / "one", n_train=60, n_val=4, size=32, seed=1, workers=1)
    synthesize(tmp_path / "pool", n_train=60, n_val=4, size=32, seed=1, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "pool")


def test_layout_csvs_match_the_images_and_counts(small):
    all_ids = []
    for split, n in zip(SPLITS, (30, 10)):
        images = sorted(p.stem for p in (small / f"ISIC-2017_{split}_Data").iterdir())
        header, truth = _rows(small / f"ISIC-2017_{split}_Part3_GroundTruth.csv")
        assert header == ["image_id", "melanoma", "seborrheic_keratosis"]
        assert sorted(r["image_id"] for r in truth) == images and len(images) == n
        assert {r["melanoma"] for r in truth} | {r["seborrheic_keratosis"] for r in truth} <= {"0.0", "1.0"}
        assert not any(r["melanoma"] == r["seborrheic_keratosis"] == "1.0" for r in truth)
        counts = [
            sum(r["melanoma"] == r["seborrheic_keratosis"] == "0.0" for r in truth),
            sum(r["melanoma"] == "1.0" for r in truth),
            sum(r["seborrheic_keratosis"] == "1.0" for r in truth),
        ]
        assert counts == class_counts(n) == ([21, 6, 3] if n == 30 else [7, 2, 1])

        header, meta = _rows(small / f"ISIC-2017_{split}_Data_metadata.csv")
        assert header == ["image_id", "age_approximate", "sex"]
        assert [r["image_id"] for r in meta] == [r["image_id"] for r in truth]
        assert all(r["age_approximate"] == "unknown" or int(r["age_approximate"]) % 5 == 0 for r in meta)
        assert {r["sex"] for r in meta} <= {"male", "female", "unknown"}
        all_ids += images
    assert len(set(all_ids)) == 40 and all_ids[0] == "ISIC_0000000"  # ids run on across splits


def test_every_image_decodes_rgb_at_the_requested_size(small):
    paths = sorted(small.glob("ISIC-2017_*_Data/*.jpg"))
    assert len(paths) == 40
    for path in paths:
        with Image.open(path) as im:
            im.load()
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48)), path


def test_cli_writes_dataset_with_custom_priors(tmp_path):
    out = tmp_path / "cli"
    sheet = tmp_path / "sheet.png"
    proc = _cli(
        str(out),
        "--n-train",
        "20",
        "--n-val",
        "5",
        "--size",
        "40",
        "--seed",
        "7",
        "--priors",
        "1",
        "1",
        "2",
        "--difficulty",
        "0.2",
        "--hair-prob",
        "1",
        "--contact-sheet",
        str(sheet),
    )
    assert proc.returncode == 0, proc.stderr
    assert "training: 20 images (nevus 5, melanoma 5, seborrheic_keratosis 10)" in proc.stdout
    _, truth = _rows(out / "ISIC-2017_Training_Part3_GroundTruth.csv")
    assert sum(r["seborrheic_keratosis"] == "1.0" for r in truth) == 10
    with Image.open(sheet) as im:
        assert im.format == "PNG" and 850 <= im.size[0] <= 950


@pytest.mark.parametrize(
    "flags, culprit",
    [
        (["--n-train", "-1"], "--n-train"),
        (["--n-val", "-3"], "--n-val"),
        (["--size", "8"], "--size"),
        (["--difficulty", "1.5"], "--difficulty"),
        (["--hair-prob", "-0.1"], "--hair-prob"),
        (["--priors", "0", "0", "0"], "--priors"),
        (["--n-train", "many"], "--n-train"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_cli_rejects_bad_flags_without_writing(tmp_path, flags, culprit):
    out = tmp_path / "bad"
    proc = _cli(str(out), *flags)
    assert proc.returncode != 0
    assert culprit in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_force_and_is_untouched_without_it(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = _cli(str(out), "--n-train", "5", "--n-val", "0", "--size", "32")
    assert proc.returncode != 0 and "--force" in proc.stderr and str(out) in proc.stderr
    assert _files(out) == {"keep.txt": b"precious"} and list(tmp_path.iterdir()) == [out]

    proc = _cli(str(out), "--n-train", "5", "--n-val", "0", "--size", "32", "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and len(list(out.glob("ISIC-2017_Training_Data/*.jpg"))) == 5
    assert list(tmp_path.iterdir()) == [out]  # no temp folders left beside OUT


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from lesionkit.synth import generator as synth

    def boom(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_csv", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.synthesize(tmp_path / "x", n_train=4, n_val=0, size=32, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_contact_sheet_has_one_row_per_class(small, tmp_path):
    png = contact_sheet(small, tmp_path / "sheet.png", per_class=3)
    with Image.open(png) as im:
        width, height = im.size
    assert 850 <= width <= 950 and height > width * len(CLASSES) / 3 * 0.8


def _pixel_auc(difficulty: float, n: int = 240) -> float:
    """Macro one-vs-rest AUC of a logistic regression on 12x12 thumbnails (5-fold cross-validated)."""
    labels = split_labels(n, (1, 1, 1), seed=0, split=0)
    thumbs = [
        Image.fromarray(render(int(y), 48, np.random.default_rng([5, i]), difficulty, 0.3)).resize(
            (12, 12), Image.BILINEAR
        )
        for i, y in enumerate(labels)
    ]
    x = np.stack([np.asarray(t, np.float32).ravel() / 255 for t in thumbs])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    probs = cross_val_predict(
        LogisticRegression(C=0.05, max_iter=1000),
        x,
        labels,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
        method="predict_proba",
    )
    return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in range(len(CLASSES))]))


def test_difficulty_controls_class_overlap():
    with threadpool_limits(1):  # tiny problems: BLAS threads only add contention
        easy, default, hopeless = _pixel_auc(0.0), _pixel_auc(0.5), _pixel_auc(1.0)
    assert easy > 0.85
    assert 0.58 < default < easy - 0.1
    assert abs(hopeless - 0.5) < 0.1
