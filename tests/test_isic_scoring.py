"""The ISIC Challenge's own scorer agrees with lesionkit on a `predict --format isic-scoring` file.

isic-challenge-scoring 5.6.0 pins an older stack (pandas<2.1, numpy<2) than lesionkit, so it lives in
its own throwaway venv, built once per machine under a fixed path keyed on the version and reused.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate import CLASSES, build_fixture

from lesionkit.cli import run_command

SCORER_VERSION = "5.6.0"
SCORER_VENV = Path(f"/tmp/lesionkit-isic-scoring-venv-{SCORER_VERSION}")


def scorer_python() -> Path:
    """The venv's python; built in a temp path and renamed when complete (`python -m` survives the rename)."""
    python = SCORER_VENV / "bin" / "python"
    if (SCORER_VENV / ".ready").exists():
        return python
    tmp = SCORER_VENV.with_name(f"{SCORER_VENV.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=300)
    subprocess.run(
        [
            str(tmp / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            f"isic-challenge-scoring=={SCORER_VERSION}",
            "pandas<2.1",
            "numpy<2",
        ],
        check=True,
        timeout=600,
    )
    (tmp / ".ready").touch()
    try:
        tmp.rename(SCORER_VENV)
    except OSError:  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return python


@pytest.mark.slow
def test_official_scorer_matches_lesionkit_metrics(tmp_path):
    python = scorer_python()
    fx = build_fixture(tmp_path / "fx")
    pred, truth = tmp_path / "pred.csv", tmp_path / "truth.csv"
    assert (
        run_command(
            "predict",
            [
                "--checkpoint",
                str(fx["ckpt"]),
                "--data",
                str(fx["test"]),
                "--format",
                "isic-scoring",
                "--truth-out",
                str(truth),
                "--out",
                str(pred),
                "--workers",
                "0",
                "--tta",
                "flips",
            ],
        )
        == 0
    )
    assert pred.read_text().splitlines()[0] == "image," + ",".join(CLASSES)
    assert (
        run_command(
            "evaluate",
            [
                "--checkpoint",
                str(fx["ckpt"]),
                "--data",
                str(fx["test"]),
                "--out",
                str(tmp_path / "ev"),
                "--workers",
                "0",
                "--bootstrap",
                "0",
                "--tta",
                "flips",
            ],
        )
        == 0
    )
    ours = json.loads((tmp_path / "ev" / "metrics.json").read_text())

    proc = subprocess.run(
        [
            str(python),
            "-m",
            "isic_challenge_scoring",
            "-o",
            "json",
            "classification",
            str(truth),
            str(pred),
            "-m",
            "auc",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    official = json.loads(proc.stdout)
    per_category = official["per_category"]
    for name in CLASSES:
        assert per_category["auc"][name] == pytest.approx(ours[f"auc_{name}"], abs=1e-9)
        assert per_category["auc_sens_80"][name] == pytest.approx(ours[f"auc_sens_80_{name}"], abs=1e-9)
        assert per_category["ap"][name] == pytest.approx(ours[f"ap_{name}"], abs=1e-9)
    assert official["aggregate"]["balanced_accuracy"] == pytest.approx(ours["balanced_accuracy"], abs=1e-9)
    assert official["overall"] == pytest.approx(ours["auc_macro"], abs=1e-9)
