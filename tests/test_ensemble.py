"""`lesionkit ensemble`: the mean of the members' `evaluate` probabilities (each member with its own image
size, normalisation and temperature), greedy selection on planted predictions, bad input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionkit import ensemble, metrics
from lesionkit.cli import run_command
from lesionkit.tasks import get_task
from tests.conftest import CLASSES, make_shards
from tests.test_evaluate import make_checkpoint

ISIC2017 = get_task("isic2017")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    make_shards(root / "test", 24, 2, size=32)
    a = make_checkpoint(root / "a", image_size=32, seed=0)
    b = make_checkpoint(root / "b", image_size=40, seed=1)  # another input size (the loader resizes) ...
    info = json.loads((b / "info.json").read_text())
    (b / "info.json").write_text(
        json.dumps({**info, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    )
    (b / "temperature.json").write_text(json.dumps({"temperature": 2.0}))  # ... normalisation, temperature
    return {"root": root, "test": root / "test", "a": a, "b": b}


def evaluate_probs(fx, ckpt: Path, out: Path) -> pd.DataFrame:
    argv = ["--checkpoint", str(ckpt), "--data", str(fx["test"]), "--out", str(out), "--workers", "0"]
    assert run_command("evaluate", [*argv, "--bootstrap", "0"]) == 0
    return pd.read_csv(out / "predictions.csv")


def run_ensemble(fx, out: Path, *extra, ckpts=("a", "b")) -> dict:
    argv = [*(str(fx[c]) for c in ckpts), "--data", str(fx["test"]), "--out", str(out), "--workers", "0"]
    assert run_command("ensemble", [*argv, "--bootstrap", "100", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_ensemble_of_two_is_the_mean_of_their_evaluate_probabilities(fx, tmp_path):
    a = evaluate_probs(fx, fx["a"], tmp_path / "ev-a")
    b = evaluate_probs(fx, fx["b"], tmp_path / "ev-b")
    assert not np.allclose(a[CLASSES], b[CLASSES], atol=1e-3)  # two different members
    m = run_ensemble(fx, tmp_path / "ens")
    out = tmp_path / "ens"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ev-a").iterdir())
    df = pd.read_csv(out / "predictions.csv")
    assert df["image_id"].tolist() == a["image_id"].tolist() == b["image_id"].tolist()
    assert np.abs(df[CLASSES].to_numpy() - (a[CLASSES].to_numpy() + b[CLASSES].to_numpy()) / 2).max() < 1e-6
    y, p = df["label"].to_numpy(), df[CLASSES].to_numpy()
    assert m["isic2017_score"] == pytest.approx(ISIC2017.metrics(y, p, CLASSES)["isic2017_score"])
    assert m["members"] == m["checkpoint"] == [str(fx["a"]), str(fx["b"])] and m["selection"] is None
    assert m["image_size"] == [32, 40] and m["temperature"] == [1.0, 2.0] and m["n"] == 24
    # a checkpoint listed twice weighs twice, and is scored once
    run_ensemble(fx, tmp_path / "ens2", ckpts=("a", "b", "a"))
    df2 = pd.read_csv(tmp_path / "ens2" / "predictions.csv")
    expected = (2 * a[CLASSES].to_numpy() + b[CLASSES].to_numpy()) / 3
    assert np.abs(df2[CLASSES].to_numpy() - expected).max() < 1e-6


def _planted(n=300, seed=0):
    """Labels and three members: `mel` ranks melanoma well, `sk` seborrheic keratosis, `noise` nothing."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)

    def member(good: int) -> np.ndarray:
        logits = rng.normal(size=(n, 3))
        logits[:, good] += 3 * (labels == good)
        return metrics.softmax_views(logits)

    return labels, np.stack([member(0), member(1), member(2)])  # 0: nevus only (= noise for the score)


def test_greedy_selection_takes_the_complementary_members_and_leaves_the_useless_one():
    labels, probs = _planted()
    chosen, steps = ensemble.greedy(labels, probs, CLASSES, ISIC2017, max_models=5)
    singles = [ISIC2017.metrics(labels, p, CLASSES)["isic2017_score"] for p in probs]
    assert chosen[0] == int(np.argmax(singles)) and set(chosen) == {1, 2}
    assert all(b > a for a, b in zip(steps, steps[1:]))  # each step improved, then it stopped
    final = ISIC2017.metrics(labels, ensemble.average(probs, chosen), CLASSES)["isic2017_score"]
    assert steps[-1] == pytest.approx(final) and final > max(singles)
    # one clearly better member: nothing improves on it alone
    strong = probs[1] + probs[2]
    alone, _ = ensemble.greedy(labels, np.stack([probs[0], strong / 2]), CLASSES, ISIC2017, max_models=5)
    assert alone == [1]
    assert ensemble.greedy(labels, probs, CLASSES, ISIC2017, max_models=1)[0] == [chosen[0]]


def test_greedy_cli_records_its_members_and_scores_them(fx, tmp_path):
    m = run_ensemble(fx, tmp_path / "g", "--select", "greedy", "--max-models", "3")
    a = evaluate_probs(fx, fx["a"], tmp_path / "ev-a")[CLASSES].to_numpy()
    b = evaluate_probs(fx, fx["b"], tmp_path / "ev-b")
    labels = b["label"].to_numpy()
    chosen, steps = ensemble.greedy(labels, np.stack([a, b[CLASSES].to_numpy()]), CLASSES, ISIC2017, 3)
    ckpts = [str(fx["a"]), str(fx["b"])]
    assert m["members"] == [ckpts[i] for i in chosen] and m["selection"]["scores"] == pytest.approx(steps)
    assert m["selection"]["score"] == "isic2017_score" and m["isic2017_score"] == pytest.approx(steps[-1])


def test_predict_with_several_checkpoints_averages_them(fx, tmp_path):
    def predict(*ckpts) -> pd.DataFrame:
        out = tmp_path / f"{'-'.join(ckpts)}.csv"
        argv = ["--checkpoint", *(str(fx[c]) for c in ckpts), "--data", str(fx["test"]), "--out", str(out)]
        assert run_command("predict", [*argv, "--workers", "0"]) == 0
        return pd.read_csv(out)

    a, b, both = predict("a"), predict("b"), predict("a", "b")
    assert both["image_id"].tolist() == a["image_id"].tolist() and len(both) == 24
    cols = ["melanoma", "seborrheic_keratosis"]
    assert np.abs(both[cols].to_numpy() - (a[cols].to_numpy() + b[cols].to_numpy()) / 2).max() < 1e-6


def test_checkpoints_of_other_classes_are_refused_naming_them(fx, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "binary", classes=["benign", "melanoma"], image_size=32)
    argv = [str(fx["a"]), str(other), "--data", str(fx["test"]), "--out", str(tmp_path / "out")]
    assert run_command("ensemble", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lesionkit ensemble: error: ") and len(err.splitlines()) == 1
    assert f"checkpoint {other} was trained on classes ['benign', 'melanoma'] but {fx['a']}" in err
    assert not (tmp_path / "out").exists()


def _cv_folder(path: Path, labels, probs, folds, ids, task="isic2017", classes=CLASSES) -> Path:
    """A finished CV's two files `ensemble --oof` reads (the real ones are tested in test_folds)."""
    path.mkdir()
    (path / "cv.json").write_text(json.dumps({"task": task}))
    df = pd.DataFrame({"image_id": ids, "label": labels, "label_name": [classes[i] for i in labels]})
    df[list(classes)] = probs
    df.assign(fold=folds).to_csv(path / "oof_predictions.csv", index=False)
    return path


def test_oof_ensemble_of_cvs_is_their_mean_scored_per_fold_and_paired_with_each(tmp_path, capsys):
    labels, probs = _planted()
    ids, folds = [f"ISIC_{i:07d}" for i in range(len(labels))], np.arange(len(labels)) % 3
    cvs = [_cv_folder(tmp_path / f"cv-{i}", labels, probs[i], folds, ids) for i in (1, 2)]
    # the second CV lists its images in another order and scored 10 more (its other folds): the ensemble
    # pairs the images both scored, by id
    extra = _cv_folder(
        tmp_path / "cv-more",
        np.r_[labels, [0] * 10],
        np.r_[probs[2], probs[2][:10]],
        np.r_[folds, [3] * 10],
        ids + [f"x{i}" for i in range(10)],
    )
    out = tmp_path / "ens"
    argv = ["--oof", str(cvs[0]), str(extra), "--out", str(out), "--bootstrap", "200"]
    assert run_command("ensemble", argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    mean = (probs[1] + probs[2]) / 2
    df = pd.read_csv(out / "predictions.csv")
    assert df["image_id"].tolist() == ids and np.abs(df[CLASSES].to_numpy() - mean).max() < 1e-9
    assert m["n"] == len(labels) and m["isic2017_score"] == pytest.approx(
        ISIC2017.metrics(labels, mean, CLASSES)["isic2017_score"]
    )
    assert [f["fold"] for f in m["folds"]] == [0, 1, 2] and [f["n"] for f in m["folds"]] == [100] * 3
    rows = folds == 1
    assert m["folds"][1]["isic2017_score"] == pytest.approx(
        ISIC2017.metrics(labels[rows], mean[rows], CLASSES)["isic2017_score"]
    )
    # each member alone ranks one class: the mean beats both, by the paired bootstrap on the same images
    singles = [ISIC2017.metrics(labels, probs[i], CLASSES)["isic2017_score"] for i in (1, 2)]
    for row, single in zip(m["vs_members"], singles):
        assert row["difference"] == pytest.approx(m["isic2017_score"] - single) and row["p"] < 0.01
    printed = capsys.readouterr().out
    assert (
        f"out-of-fold isic2017_score {m['isic2017_score']:.4f}" in printed
        and f"over {len(labels)} images" in printed
    )
    assert f"ensemble - {cvs[0]}: {m['vs_members'][0]['difference']:+.4f}" in printed


@pytest.mark.parametrize(
    "case, needle",
    [
        ("fold", "{b}: 1 of the 300 images it shares with {a} were held out by another fold"),
        ("task", "{b} is a custom CV on classes"),
        ("none", "{b} scored none of the images {a} scored"),
        ("data", "--oof averages the predictions each CV saved"),
        ("notcv", "{b}: not a finished cross-validation folder"),
    ],
)
def test_oof_ensemble_refuses_cvs_of_other_splits_tasks_or_images(tmp_path, capsys, case, needle):
    labels, probs = _planted()
    ids, folds = [f"ISIC_{i:07d}" for i in range(len(labels))], np.arange(len(labels)) % 3
    a = _cv_folder(tmp_path / "a", labels, probs[1], folds, ids)
    b_folds, b_ids, task = folds.copy(), list(ids), "isic2017"
    if case == "fold":
        b_folds[7] = (b_folds[7] + 1) % 3
    if case == "none":
        b_ids = [f"other-{i}" for i in ids]
    if case == "task":
        task = "custom"
    b = tmp_path / "b"
    if case == "notcv":
        b.mkdir()
    else:
        _cv_folder(b, labels, probs[2], b_folds, b_ids, task=task)
    extra = ["--data", str(tmp_path)] if case == "data" else []
    assert run_command("ensemble", ["--oof", str(a), str(b), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lesionkit ensemble: error: ") and len(err.splitlines()) == 1
    assert needle.format(a=a, b=b) in err and not (tmp_path / "out").exists()
