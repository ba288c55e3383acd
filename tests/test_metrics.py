"""metrics.py against sklearn and hand-computed values; plots are real PNGs."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from lesionkit import metrics, plots
from lesionkit.tasks import get_task

ISIC2017 = get_task("isic2017")

CLASSES = ["nevus", "melanoma", "seborrheic_keratosis"]


def _data(n=200, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
    logits = rng.normal(size=(n, 3)) + signal * np.eye(3)[labels]
    return labels, metrics.softmax_views(logits), logits


def test_compute_metrics_matches_sklearn():
    labels, probs, _ = _data()
    m = ISIC2017.metrics(labels, probs, CLASSES)
    json.dumps(m)  # JSON-ready
    for c, name in enumerate(CLASSES):
        assert m[f"auc_{name}"] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]))
        assert m[f"ap_{name}"] == pytest.approx(skm.average_precision_score(labels == c, probs[:, c]))
        assert m[f"n_{name}"] == int((labels == c).sum())
        tn, fp, fn, tp = skm.confusion_matrix(labels == c, probs.argmax(1) == c).ravel()
        assert m[f"sens_{name}"] == pytest.approx(tp / (tp + fn))
        assert m[f"spec_{name}"] == pytest.approx(tn / (tn + fp))
    assert m["isic2017_score"] == pytest.approx((m["auc_melanoma"] + m["auc_seborrheic_keratosis"]) / 2)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, probs.argmax(1)))
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, probs.argmax(1)).tolist()
    assert m["nll"] == pytest.approx(skm.log_loss(labels, probs))
    assert m["n"] == 200 and m["notes"] == []


def test_auc_sens_80_definition():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    # the official scorer's definition: area under the ROC right of where TPR first reaches 0.8
    # (not normalised): a perfect ranking reaches TPR 1 at FPR 0 -> 1.0
    assert metrics.auc_above_sensitivity(y, y.astype(float)) == pytest.approx(1.0)
    # uninformative: the diagonal from (0.8, 0.8) to (1, 1) -> 0.2 * 0.9
    assert metrics.auc_above_sensitivity(y, np.zeros(9)) == pytest.approx(0.18)
    assert metrics.auc_above_sensitivity(y, np.linspace(1, 0, 9)) == pytest.approx(0.0)


def test_absent_class_is_undefined_not_a_crash():
    labels = np.array([0, 1, 0, 1, 0, 1])
    probs = np.tile([0.5, 0.3, 0.2], (6, 1))
    m = ISIC2017.metrics(labels, probs, CLASSES)
    assert m["auc_seborrheic_keratosis"] is None and m["isic2017_score"] is None
    assert m["n_seborrheic_keratosis"] == 0 and m["sens_seborrheic_keratosis"] is None
    assert any("seborrheic_keratosis" in note for note in m["notes"])
    assert m["auc_melanoma"] == pytest.approx(0.5)
    ci = ISIC2017.bootstrap_ci(labels, probs, CLASSES, n=50)
    assert ci["auc_seborrheic_keratosis"] is None and ci["isic2017_score"] is None


def test_thresholds_youden_applied():
    labels, probs, _ = _data(seed=1)
    thr = metrics.choose_thresholds(labels, probs, CLASSES)
    m = metrics.compute_metrics(labels, probs, CLASSES, thresholds=thr)
    for c, name in enumerate(CLASSES):
        fpr, tpr, _ = skm.roc_curve(labels == c, probs[:, c])
        # the chosen threshold attains the best J on the data it was chosen on
        assert m[f"sens_thr_{name}"] + m[f"spec_thr_{name}"] - 1 == pytest.approx((tpr - fpr).max())
        assert m[f"threshold_{name}"] == thr[name]


def test_bootstrap_ci_brackets_point_and_is_reproducible():
    labels, probs, _ = _data(n=150, seed=2)
    m = ISIC2017.metrics(labels, probs, CLASSES)
    a = ISIC2017.bootstrap_ci(labels, probs, CLASSES, n=300, seed=0)
    b = ISIC2017.bootstrap_ci(labels, probs, CLASSES, n=300, seed=0)
    assert a == b
    for key in [f"auc_{c}" for c in CLASSES] + ["isic2017_score"]:
        lo, hi = a[key]
        assert lo < m[key] < hi and hi - lo < 0.4
        assert a[f"n_valid_{key}"] == 300
    # the vectorised rank AUC equals sklearn on a resample
    idx = np.random.default_rng(5).integers(0, 150, size=(1, 150))
    y = labels[idx] == 1
    assert metrics._rank_auc(y, probs[idx, 1])[0] == pytest.approx(skm.roc_auc_score(y[0], probs[idx[0], 1]))


def test_paired_bootstrap_finds_the_planted_better_model_and_none_between_equals():
    labels, strong, _ = _data(n=300, seed=4, signal=2.0)
    _, weak, _ = _data(n=300, seed=4, signal=0.4)  # the same labels, a weaker signal
    score = metrics.bootstrap_score("auc_macro", CLASSES)
    better = metrics.paired_bootstrap(labels, strong, weak, score, n=400, seed=0)
    macro = [np.mean([skm.roc_auc_score(labels == c, p[:, c]) for c in range(3)]) for p in (strong, weak)]
    assert better["difference"] == pytest.approx(macro[0] - macro[1]) and better["difference"] > 0.1
    lo, hi = better["ci"]
    assert 0 < lo < better["difference"] < hi and better["p"] < 0.01 and better["n_valid"] == 400
    worse = metrics.paired_bootstrap(labels, weak, strong, score, n=400, seed=0)
    assert worse["difference"] == pytest.approx(-better["difference"]) and worse["p"] > 0.99
    same = metrics.paired_bootstrap(labels, strong, strong.copy(), score, n=400, seed=0)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0] and same["p"] == 1.0
    # balanced accuracy and composites through the same machinery; a metric without a bootstrap is refused
    ba = metrics.paired_bootstrap(labels, strong, weak, metrics.bootstrap_score("balanced_accuracy", CLASSES))
    assert ba["difference"] == pytest.approx(
        skm.balanced_accuracy_score(labels, strong.argmax(1))
        - skm.balanced_accuracy_score(labels, weak.argmax(1))
    )
    score17 = metrics.bootstrap_score("isic2017_score", CLASSES, ISIC2017.composites)
    assert metrics.paired_bootstrap(labels, strong, weak, score17, n=50)["p"] < 0.05
    with pytest.raises(ValueError, match="no bootstrap for 'nll'"):
        metrics.bootstrap_score("nll", CLASSES)


def test_fit_temperature_recovers_scale():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=4000)
    true_logits = rng.normal(size=(4000, 3)) + 2 * np.eye(3)[labels]
    # sample labels from the calibrated model, then make the logits 3x over-confident
    p = metrics.softmax_views(true_logits)
    labels = (rng.random((4000, 1)) > p.cumsum(1)).sum(1)
    t = metrics.fit_temperature(3 * true_logits, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    assert metrics.softmax_views(np.stack([true_logits, true_logits], 1)) == pytest.approx(p)


def test_plots_are_valid_pngs(tmp_path):
    labels, probs, _ = _data(n=80)
    m = metrics.compute_metrics(labels, probs, CLASSES)
    paths = [
        plots.roc_figure(labels, probs, CLASSES, tmp_path / "roc.png"),
        plots.confusion_figure(m["confusion_matrix"], CLASSES, tmp_path / "confusion.png"),
        plots.reliability_figure(labels, probs, tmp_path / "reliability.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.verify()
            assert im.size[0] > 300 and im.size[1] > 300
