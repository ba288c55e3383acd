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
