"""MODEL_CARD.md: written into every checkpoint a run publishes from the run's real facts (data counts and
sources, recipe, validation metrics with CIs), and `evaluate` adds its test metrics, ECE before/after the
temperature and the thresholds."""

import json
import re
import shutil

import pytest

from lesionkit.cli import run_command
from tests.test_evaluate import CLASSES, build_fixture


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    fx = build_fixture(tmp_path_factory.mktemp("cardfx"))
    out = fx["root"] / "run"
    argv = [
        "--train",
        str(fx["test"]),
        "--val",
        str(fx["val"]),
        "--output-dir",
        str(out),
        "--model",
        "customnet",
    ]
    argv += [
        "--image-size",
        "64",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--epochs",
        "2",
        "--augment",
        "light",
    ]
    assert run_command("train", [*argv, "--no-wandb", "--mixed-precision", "no", "--lr", "0.001"]) == 0
    return fx, out


def _num(text: str, pattern: str) -> list[str]:
    found = re.findall(pattern, text)
    assert found, pattern
    return found


def test_every_published_checkpoint_has_a_card_with_the_run_numbers(run):
    fx, out = run
    for link in ("best", "last"):
        ckpt = (out / link).resolve()
        card = (ckpt / "MODEL_CARD.md").read_text()
        info = json.loads((ckpt / "info.json").read_text())
        facts = json.loads((ckpt / "card.json").read_text())
        m, ci = info["metrics"], facts["validation"]["ci"]
        assert card.startswith("# Model card: customnet for isic2017 (3 classes)")
        assert f"checkpoint: epoch {info['epoch']}" in card
        # training data from the manifests: counts and sources
        train_counts = json.loads((fx["test"] / "manifest.json").read_text())["counts"]
        assert f"`{fx['test']}`: 24 images ({', '.join(f'{c} {n}' for c, n in train_counts.items())})" in card
        assert f"`{fx['val']}`: 16 images" in card and str(fx["syn"] / "ISIC-2017_Training_Data") in card
        assert "no patient metadata (age, sex, site) recorded" in card  # the synthetic set has none
        assert "- lr: `0.001`" in card and "- epochs: `2`" in card and "- image_size: `64`" in card
        # validation metrics with their bootstrap CIs, exactly the run's
        for c in CLASSES:
            lo, hi = ci[f"auc_{c}"]
            row = f"| {c} | {m[f'n_{c}']} | {m[f'auc_{c}']:.3f} | [{lo:.3f}, {hi:.3f}] |"
            assert row in card, row
        assert f"isic2017_score **{m['isic2017_score']:.3f}**" in card
        assert f"validation ECE at temperature 1: {m['ece']:.3f}" in card
        assert "**Not a medical device**" in card and "Dermoscopy only" in card and "Fitzpatrick" in card
        assert "lesionkit train --config CHECKPOINT/config.yaml --output-dir runs/reproduce" in card
        assert "none yet (`lesionkit evaluate" in card and "no temperature fitted" in card
        # 7 of 24 training images per minority class is over half an equal share: none is flagged here
        assert "Under-represented classes" not in card


def test_evaluate_adds_test_metrics_calibration_and_thresholds(run, tmp_path):
    fx, out = run
    ckpt = (out / "best").resolve()
    common = ["--checkpoint", str(ckpt), "--workers", "0", "--bootstrap", "100"]
    assert (
        run_command(
            "evaluate", [*common, "--data", str(fx["val"]), "--out", str(tmp_path / "v"), "--fit-temperature"]
        )
        == 0
    )
    assert (
        run_command(
            "evaluate",
            [
                *common,
                "--data",
                str(fx["test"]),
                "--out",
                str(tmp_path / "t"),
                "--thresholds-from",
                str(tmp_path / "v"),
            ],
        )
        == 0
    )
    card = (ckpt / "MODEL_CARD.md").read_text()
    t = json.loads((tmp_path / "t" / "metrics.json").read_text())
    v = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert "### test" in card and "### val" in card
    assert f"24 images, TTA `none`, temperature {t['temperature']:.4f}" in card
    for c in CLASSES:
        lo, hi = t["ci"][f"auc_{c}"]
        assert f"| {c} | {t[f'n_{c}']} | {t[f'auc_{c}']:.3f} | [{lo:.3f}, {hi:.3f}] |" in card
    assert f"temperature {v['temperature']:.4f}, fitted on {fx['val']}" in card
    # ECE before (T = 1, recomputed from the written predictions at T = 1) and after the temperature
    ece_after = _num(card, r"- test: ECE ([0-9.]+) at temperature 1 -> ([0-9.]+)")[0]
    assert float(ece_after[1]) == pytest.approx(t["ece"], abs=5e-4)
    assert float(ece_after[0]) != pytest.approx(t["ece"], abs=1e-6)
    thr = json.loads((tmp_path / "v" / "thresholds.json").read_text())["thresholds"]
    pairs = ", ".join(f"{c} {thr[c]:.4f}" for c in CLASSES)
    assert f"- test: {pairs} (source: {tmp_path / 'v' / 'thresholds.json'}" in card
    assert f"lesionkit evaluate --checkpoint runs/reproduce/best --data {fx['test']}" in card
    # evaluating the same data again replaces its section instead of adding another
    assert run_command("evaluate", [*common, "--data", str(fx["test"]), "--out", str(tmp_path / "t2")]) == 0
    assert (ckpt / "MODEL_CARD.md").read_text().count("### test") == 1


def test_under_represented_classes_are_named_with_their_numbers(run, tmp_path):
    from lesionkit import modelcard

    _, out = run
    ckpt = shutil.copytree((out / "best").resolve(), tmp_path / "ck")
    facts = json.loads((ckpt / "card.json").read_text())
    facts["training"]["train"][0]["counts"] = {"nevus": 90, "melanoma": 40, "seborrheic_keratosis": 12}
    facts["training"]["train"][0]["metadata"] = {
        "age": {"present": 130, "missing": 12, "min": 15, "max": 85, "mean": 51.25},
        "sex": {"present": 140, "missing": 2, "values": {"female": 75, "male": 65}},
    }
    (ckpt / "card.json").write_text(json.dumps(facts))
    card = modelcard.render(ckpt).read_text()
    auc = json.loads((ckpt / "info.json").read_text())["metrics"]["auc_seborrheic_keratosis"]
    line = "- Under-represented classes: seborrheic_keratosis (12 of 142 training images; validation AUC"
    assert f"{line} {auc:.3f}" in card
    assert "melanoma (40 of" not in card  # 28% is over half of an equal share (1/6)
    assert "  - age: 15 to 85, mean 51.2 (12 of 142 unknown)" in card
    assert "  - sex: female 75, male 65 (2 of 142 unknown)" in card


def test_a_card_that_cannot_be_written_does_not_fail_the_evaluation(run, tmp_path, monkeypatch, capsys):
    from lesionkit import modelcard

    fx, out = run

    def read_only(*_):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(modelcard, "write_json", read_only)
    argv = ["--checkpoint", str(out / "best"), "--data", str(fx["val"]), "--out", str(tmp_path / "ev")]
    assert run_command("evaluate", [*argv, "--workers", "0", "--bootstrap", "0"]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()
    assert (
        f"model card not updated (Read-only file system: {out / 'best' / 'MODEL_CARD.md'})"
        in capsys.readouterr().out
    )


def test_a_checkpoint_from_before_model_cards_gets_its_facts_from_its_config(run, tmp_path):
    fx, out = run
    old = tmp_path / "old"
    shutil.copytree((out / "last").resolve(), old)
    (old / "card.json").unlink()
    (old / "MODEL_CARD.md").unlink()
    argv = [
        "--checkpoint",
        str(old),
        "--data",
        str(fx["val"]),
        "--out",
        str(tmp_path / "e"),
        "--workers",
        "0",
    ]
    assert run_command("evaluate", argv) == 0
    card, m = (old / "MODEL_CARD.md").read_text(), json.loads((old / "info.json").read_text())["metrics"]
    assert f"`{fx['test']}`: 24 images" in card and "not recorded" not in card
    assert "- lr: `0.001`" in card and "- epochs: `2`" in card
    assert f"isic2017_score **{m['isic2017_score']:.3f}**" in card and "### val" in card
    assert "no CIs (the checkpoint predates model cards" in card
