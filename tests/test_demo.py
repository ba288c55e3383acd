"""The default data is learnable: a small CNN trained for a few hundred steps on synthetic shards, through
the real entry point, beats chance clearly (the property `make demo` shows)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lesionkit.pack import pack
from lesionkit.synth.generator import synthesize

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_cnn_on_synthetic_data_beats_chance(tmp_path):
    synthesize(tmp_path / "raw", n_train=600, n_val=200, size=48, seed=3, workers=1)
    for split, name in (("train", "Training"), ("val", "Validation")):
        pack(
            images=tmp_path / "raw" / f"ISIC-2017_{name}_Data",
            shard_size=100,
            workers=1,
            size=48,
            labels=tmp_path / "raw" / f"ISIC-2017_{name}_Part3_GroundTruth.csv",
            out=tmp_path / split,
        )
    # 600 images / batch 16 = 38 steps per epoch x 12 epochs = 456 steps. Measured: min AUC 0.74, score 0.77
    # (AVX2 machine); min AUC 0.62, score 0.70 (AVX-512 machine: other kernels, other bits). Chance is 0.5.
    cmd = [
        sys.executable,
        str(REPO / "lesionkit" / "train.py"),
        "--config",
        "demo",
        "--image-size",
        "48",
        "--batch-size",
        "16",
        "--epochs",
        "12",
        "--workers",
        "1",
        "--no-wandb",
        "--mixed-precision",
        "no",
        "--train",
        str(tmp_path / "train"),
        "--val",
        str(tmp_path / "val"),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    best = json.loads((tmp_path / "run" / "best" / "info.json").read_text())["metrics"]
    aucs = [best[f"auc_{c}"] for c in ("nevus", "melanoma", "seborrheic_keratosis")]
    assert min(aucs) > 0.6 and best["isic2017_score"] > 0.65, best
    assert max(aucs) < 0.999  # the synthetic classes overlap on purpose
