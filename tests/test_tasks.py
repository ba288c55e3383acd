"""Every ISIC task on real data: each label format ingests and packs with its classes, counts, group ids and
metadata; each task's metrics equal scikit-learn's; `predict` writes each task's submission format."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from isic_real import GT2019, GT2020, HAM, I2019, I2020, META2019, pack_2019, pack_2020, records
from sklearn import metrics as skm
from test_evaluate import make_checkpoint

from lesionkit.cli import run_command
from lesionkit.ingest import collect
from lesionkit.metrics import _balanced_accuracy_rows, bootstrap_ci
from lesionkit.tasks import ISIC2018_CLASSES, ISIC2019_CLASSES, get_task

COUNTS_2019 = {"MEL": 946, "NV": 5533, "BCC": 412, "AK": 108, "BKL": 872, "DF": 88, "VASC": 111, "SCC": 146}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    (d2019, p2019), (d2020, p2020) = pack_2019(root), pack_2020(root)
    return {"root": root, "2019": d2019, "p2019": p2019, "2020": d2020, "p2020": p2020}


def test_isic2019_csv_gives_the_8_classes_counts_lesions_and_metadata_under_either_sex_name(tmp_path):
    images = I2019 / "ISIC_2019_Training_Input"
    found = collect(images, GT2019, metadata=META2019)
    assert found.classes == list(ISIC2019_CLASSES) and found.task == "isic2019"  # UNK (all 0) dropped
    assert found.table["label_name"].value_counts().to_dict() == COUNTS_2019 and not found.unlisted
    row = found.table.set_index("id").loc["ISIC_0000000"]
    assert row["meta"] == {"age": 55, "site": "anterior torso", "sex": "female"}  # `gender` -> sex
    lesions = [g.get("lesion") for g in found.table["groups"]]
    assert sum(x is not None for x in lesions) == 8000 and len({x for x in lesions if x}) == 5973
    renamed = tmp_path / "meta_sex.csv"  # other copies of the official CSV call the column `sex`
    renamed.write_text(META2019.read_text().replace(",gender\n", ",sex\n", 1))
    again = collect(images, GT2019, metadata=renamed)
    assert list(again.table["meta"]) == list(found.table["meta"])


def test_ham10000_dx_gives_the_isic2018_classes_and_never_maps_akiec_silently(tmp_path, capsys, caplog):
    found = collect(I2019 / "ISIC_2019_Training_Input", HAM)
    assert found.classes == list(ISIC2018_CLASSES) and found.task == "isic2018"
    assert found.table["label_name"].value_counts()["AKIEC"] == 254  # the 2019 labels: AK 108 + SCC 146
    assert "ISIC_2019_Training_GroundTruth.csv as --labels" in found.notes[0]
    row = found.table.set_index("id").loc["ISIC_0027419"]
    assert row["groups"] == {"lesion": "HAM_0000118"} and row["meta"]["age"] == 80
    assert "dx" not in row["meta"] and "dx_type" not in row["meta"]  # labels are never metadata

    # the 2019 classes from dx: every dx but akiec, which is refused (or, with --skip-bad, left out)
    ham = pd.read_csv(HAM, dtype=str).groupby("dx").head(2)
    ham.to_csv(tmp_path / "ham.csv", index=False)
    argv = ["--images", str(I2019 / "ISIC_2019_Training_Input"), "--labels", str(tmp_path / "ham.csv")]
    argv += ["--task", "isic2019", "--size", "32", "--workers", "0", "--out", str(tmp_path / "out")]
    assert run_command("pack", argv) == 2
    err = capsys.readouterr().err
    assert "2 bad sample(s)" in err and "dx akiec is AK or SCC in the ISIC 2019 labels" in err
    assert "ISIC_2019_Training_GroundTruth.csv as --labels" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert run_command("pack", [*argv, "--skip-bad"]) == 0
    assert "mapped to the ISIC 2019 classes except akiec" in caplog.text  # said, not silent
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == list(ISIC2019_CLASSES) and manifest["task"] == "isic2019"
    assert manifest["counts"] == {**dict.fromkeys(ISIC2019_CLASSES, 2), "AK": 0, "SCC": 0}
    akiec = set(ham[ham.dx == "akiec"].image_id)
    assert {s["id"] for s in manifest["skipped"]} == akiec


def test_isic2020_csv_target_or_diagnosis_with_patients_and_empty_cells_missing():
    images = I2020 / "train"
    found = collect(images, GT2020)
    assert found.classes == ["benign", "melanoma"] and found.task == "isic2020"
    assert found.table["label_name"].value_counts().to_dict() == {"benign": 1654, "melanoma": 27}
    patients = {g["patient"] for g in found.table["groups"]}
    assert len(patients) == 86
    sites = [m["site"] for m in found.table["meta"]]
    assert sites.count(None) == 9 and "torso" in sites  # empty cells are missing, not ""
    assert all(set(m) == {"sex", "age", "site"} for m in found.table["meta"])  # diagnosis etc. are labels
    finer = collect(images, GT2020, label_column="diagnosis")
    assert finer.task == "isic2020"
    assert finer.classes == ["lentigo_nos", "melanoma", "nevus", "seborrheic_keratosis", "unknown"]
    assert finer.table["label_name"].value_counts()["melanoma"] == 27
    with pytest.raises(ValueError, match="--label-column 'dx' does not apply.*target, diagnosis"):
        collect(images, GT2020, label_column="dx")


def test_isic2020_label_problems_name_the_images(tmp_path):
    rows = GT2020.read_text().splitlines()[:4]
    header, a, b, c = rows
    bad = [a.rsplit(",", 1)[0] + ",yes", b.replace(",unknown,benign,0", ",melanoma,benign,0"), c]
    (tmp_path / "gt.csv").write_text("\n".join([header, *bad]) + "\n")
    for column, needle in (("target", "target 'yes' is not 0/1"), ("diagnosis", "disagrees with target '0'")):
        with pytest.raises(ValueError, match=needle):
            collect(I2020 / "train", tmp_path / "gt.csv", label_column=column)
    test_csv = ",".join(header.split(",")[:5]) + "\n" + ",".join(c.split(",")[:5]) + "\n"
    (tmp_path / "test.csv").write_text(test_csv)  # the ISIC 2020 test set's CSV: no labels
    with pytest.raises(ValueError, match="need a 'target' column.*test set's CSV has no labels"):
        collect(I2020 / "train", tmp_path / "test.csv")


def test_packed_real_subsets_hold_classes_counts_groups_and_metadata(packed):
    for year, label_of, group in (
        ("2019", lambda r: r[list(ISIC2019_CLASSES)].astype(float).idxmax(), "lesion"),
        ("2020", lambda r: "melanoma" if r["target"] == "1" else "benign", "patient"),
    ):
        picked = packed[f"p{year}"].set_index("image" if year == "2019" else "image_name")
        manifest = json.loads((packed[year] / "manifest.json").read_text())
        expected = picked.apply(label_of, axis=1).value_counts().to_dict()
        assert {k: v for k, v in manifest["counts"].items() if v} == expected
        assert manifest["task"] == f"isic{year}" and manifest["num_samples"] == len(picked)
        back = records(packed[year])
        assert set(back) == set(picked.index)
        for key, rec in back.items():
            want = picked.loc[key, "lesion_id" if group == "lesion" else "patient_id"] or None
            assert rec["groups"] == {group: want} and rec["label_name"] == label_of(picked.loc[key])
            assert set(rec["meta"]) <= {"age", "sex", "site"}
        assert manifest["groups"][group]["unique"] == len(
            {r["groups"][group] for r in back.values()} - {None}
        )
        assert manifest["metadata"]["sex"]["present"] + manifest["metadata"]["sex"]["missing"] == len(back)


def test_pack_task_override_is_checked_against_the_classes(packed, tmp_path, capsys):
    argv = ["--images", str(I2020 / "train"), "--labels", str(packed["root"] / "gt2020.csv"), "--size", "32"]
    assert run_command("pack", [*argv, "--out", str(tmp_path / "a"), "--task", "isic2019"]) == 2
    assert "task isic2019 needs the classes ['MEL'" in capsys.readouterr().err
    assert (
        run_command("pack", [*argv, "--out", str(tmp_path / "b"), "--task", "custom", "--workers", "0"]) == 0
    )
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["task"] == "custom"


def _real_predictions(seed=0):
    """The official 2019 labels with seeded, label-correlated random probabilities."""
    gt = pd.read_csv(GT2019)
    y = gt[list(ISIC2019_CLASSES)].to_numpy().argmax(1)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(y.size, 8)) + 1.5 * np.eye(8)[y]
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_task_metrics_equal_sklearn_on_the_same_predictions():
    y, p = _real_predictions()
    m = get_task("isic2019").metrics(y, p, ISIC2019_CLASSES)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))
    for c, name in enumerate(ISIC2019_CLASSES):
        assert m[f"auc_{name}"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
        assert m[f"sens_{name}"] == pytest.approx(
            skm.recall_score(y == c, p.argmax(1) == c)
        )  # per-class recall
    assert (
        m["auc_melanoma"] == m["auc_MEL"]
        and get_task("isic2019").monitor_for("", ISIC2019_CLASSES).mode == "max"
    )

    target = (pd.read_csv(GT2020)["target"] == 1).to_numpy()
    score = np.random.default_rng(1).random(target.size) + 0.3 * target
    p2 = np.stack([1 - score / 1.3, score / 1.3], 1)
    m2 = get_task("isic2020").metrics(target.astype(int), p2, ["benign", "melanoma"])
    assert m2["auc_melanoma"] == pytest.approx(skm.roc_auc_score(target, score))


def test_bootstrap_balanced_accuracy_equals_sklearn_per_resample_and_brackets_the_point():
    y, p = _real_predictions()
    pred = p.argmax(1)
    idx = np.random.default_rng(0).integers(0, 300, size=(20, 300))  # small resamples: classes go missing
    rows = _balanced_accuracy_rows(y[idx], pred[idx], 8)
    with pytest.warns(UserWarning):  # sklearn warns when a predicted class is absent from the labels
        expected = [skm.balanced_accuracy_score(y[i], pred[i]) for i in idx]
    assert rows == pytest.approx(expected)
    ci = bootstrap_ci(y, p, ISIC2019_CLASSES, n=200)
    lo, hi = ci["balanced_accuracy"]
    assert lo < skm.balanced_accuracy_score(y, pred) < hi and ci["auc_macro"][0] < ci["auc_macro"][1]


def test_submission_formats_of_each_task():
    keys, p = ["ISIC_2", "ISIC_1"], np.array([[0.1] * 7 + [0.3], [0.3] + [0.1] * 7])
    sub = get_task("isic2019").submission_frame(keys, p, ISIC2019_CLASSES)
    assert list(sub.columns) == ["image", *ISIC2019_CLASSES, "UNK"] and sub["image"].tolist() == [
        "ISIC_1",
        "ISIC_2",
    ]
    assert sub["UNK"].tolist() == [0.0, 0.0] and sub["MEL"].tolist() == [0.3, 0.1]
    sub = get_task("isic2018").submission_frame(keys, p[:, :7], ISIC2018_CLASSES)
    assert list(sub.columns) == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    binary = get_task("isic2020").submission_frame(keys, [[0.8, 0.2], [0.4, 0.6]], ["benign", "melanoma"])
    assert list(binary.columns) == ["image_name", "target"] and binary["target"].tolist() == [0.6, 0.2]
    diagnosis = ["melanoma", "nevus", "unknown"]  # trained on diagnosis classes, scored by melanoma
    finer = get_task("isic2020").submission_frame(keys, [[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]], diagnosis)
    assert finer["target"].tolist() == [0.7, 0.2]


@pytest.mark.parametrize("year", ["2019", "2020"])
def test_predict_writes_the_checkpoint_task_format_by_default(packed, tmp_path, year, capsys):
    classes = json.loads((packed[year] / "manifest.json").read_text())["classes"]
    ckpt = make_checkpoint(tmp_path / "ckpt", classes=classes, image_size=32)
    out = tmp_path / "sub.csv"
    argv = ["--checkpoint", str(ckpt), "--data", str(packed[year]), "--out", str(out), "--workers", "0"]
    assert run_command("predict", argv) == 0
    sub = pd.read_csv(out)
    if year == "2019":
        assert list(sub.columns) == ["image", *ISIC2019_CLASSES, "UNK"] and len(sub) == len(packed["p2019"])
    else:
        assert list(sub.columns) == ["image_name", "target"] and len(sub) == len(packed["p2020"])
        assert sub["target"].between(0, 1).all()
    assert run_command("predict", [*argv, "--format", "isic2017"]) == 2  # the explicit format still rules
    assert "the isic2017 submission needs the classes" in capsys.readouterr().err
