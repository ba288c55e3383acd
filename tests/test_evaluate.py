"""evaluate / predict end to end on a tiny synthetic set (customnet at 64 px, ~40 images).

The checkpoint is built here in the contract layout (model.pt + info.json + config.yaml) from a
seeded, untrained customnet: the tests check plumbing and exactness, not accuracy.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm
from wandb_log import records

from lesionkit import inference
from lesionkit.checkpoint import write_inference_files
from lesionkit.cli import run_command
from lesionkit.config import TrainConfig
from lesionkit.data import Batch
from lesionkit.models import create_model, input_stats
from lesionkit.pack import pack
from lesionkit.synth.generator import synthesize
from tests.conftest import cpu_ddp

CLASSES = ["nevus", "melanoma", "seborrheic_keratosis"]
REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path, classes=CLASSES, model="customnet", image_size=64, seed=0) -> Path:
    torch.manual_seed(seed)
    net = create_model(model, num_classes=len(classes))
    mean, std = input_stats(model)
    folder.mkdir(parents=True, exist_ok=True)
    write_inference_files(
        folder,
        net.state_dict(),
        TrainConfig(model=model, image_size=image_size),
        {
            "classes": list(classes),
            "model": model,
            "image_size": image_size,
            "mean": list(mean),
            "std": list(std),
        },
    )
    return folder


def build_fixture(root: Path) -> dict:
    """Synthetic ISIC layout -> shards `test` (24, 4 shards) and `val` (16, 3 shards) + a checkpoint."""
    syn = root / "syn"
    synthesize(syn, 24, 16, size=64, seed=0, priors=(0.4, 0.3, 0.3), workers=1)
    pack(
        syn / "ISIC-2017_Training_Data",
        syn / "ISIC-2017_Training_Part3_GroundTruth.csv",
        root / "test",
        size=64,
        shard_size=7,
        workers=0,
    )
    pack(
        syn / "ISIC-2017_Validation_Data",
        syn / "ISIC-2017_Validation_Part3_GroundTruth.csv",
        root / "val",
        size=64,
        shard_size=6,
        workers=0,
    )
    return {
        "root": root,
        "syn": syn,
        "test": root / "test",
        "val": root / "val",
        "ckpt": make_checkpoint(root / "ckpt"),
    }


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("evalfx"))


def run_evaluate(fx, out, *extra):
    argv = [
        "--checkpoint",
        str(fx["ckpt"]),
        "--data",
        str(fx["test"]),
        "--out",
        str(out),
        "--workers",
        "0",
        "--bootstrap",
        "200",
        *extra,
    ]
    assert run_command("evaluate", argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_metrics_equal_sklearn_on_written_predictions(fx, tmp_path):
    out = tmp_path / "ev"
    m = run_evaluate(fx, out, "--thresholds-from", str(fx["val"]))
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion.png",
        "metrics.json",
        "predictions.csv",
        "reliability.png",
        "roc.png",
        "thresholds.json",
    ]
    df = pd.read_csv(out / "predictions.csv")
    assert list(df.columns) == ["image_id", "label", "label_name", *CLASSES]
    assert len(df) == m["n"] == 24 and df["image_id"].is_unique and df["image_id"].is_monotonic_increasing
    y, p = df["label"].to_numpy(), df[CLASSES].to_numpy()
    assert np.allclose(p.sum(1), 1.0)
    for c, name in enumerate(CLASSES):
        assert m[f"auc_{name}"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
        assert m[f"ap_{name}"] == pytest.approx(skm.average_precision_score(y == c, p[:, c]))
        lo, hi = m["ci"][f"auc_{name}"]
        assert lo <= m[f"auc_{name}"] <= hi
        assert m[f"n_{name}"] == int((y == c).sum())
        # thresholds come from the validation shards, not from the evaluated data
        assert m[f"sens_thr_{name}"] == pytest.approx(
            ((p[:, c] >= m[f"threshold_{name}"]) & (y == c)).sum() / (y == c).sum()
        )
    assert m["isic2017_score"] == pytest.approx(
        (skm.roc_auc_score(y == 1, p[:, 1]) + skm.roc_auc_score(y == 2, p[:, 2])) / 2
    )
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p.argmax(1), labels=[0, 1, 2]).tolist()
    assert m["thresholds_source"] == f"Youden's J on {fx['val']}" and m["world_size"] == 1
    for png in ("roc.png", "confusion.png", "reliability.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG"
            im.verify()


@pytest.mark.ddp
def test_two_processes_give_the_same_metrics(fx, tmp_path):
    one = run_evaluate(fx, tmp_path / "one", "--tta", "flips")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = cpu_ddp(
        "-m",
        "lesionkit.evaluate",
        "--checkpoint",
        str(fx["ckpt"]),
        "--data",
        str(fx["test"]),
        "--out",
        str(tmp_path / "two"),
        "--workers",
        "0",
        "--bootstrap",
        "200",
        "--tta",
        "flips",
    )
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two.pop("world_size") == 2 and one.pop("world_size") == 1
    assert two.keys() == one.keys()
    for k, v in one.items():
        assert two[k] == (pytest.approx(v, rel=1e-6, abs=1e-9) if isinstance(v, float) else v), k
    a = pd.read_csv(tmp_path / "one" / "predictions.csv")
    b = pd.read_csv(tmp_path / "two" / "predictions.csv")
    assert a["image_id"].tolist() == b["image_id"].tolist()  # every sample exactly once, same ids
    assert np.allclose(a[CLASSES], b[CLASSES], atol=1e-6)


def _d4_symmetric_batch(n=3, size=64, seed=0) -> torch.Tensor:
    """Images invariant under all 8 rotations/reflections: a function of (min, max) of |x - c|, |y - c|."""
    rng = np.random.default_rng(seed)
    d = np.abs(np.arange(size) - (size - 1) / 2).astype(int)
    a, b = np.minimum.outer(d, d), np.maximum.outer(d, d)
    table = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(table[:, :, a, b]))


def test_tta_on_orientation_invariant_input_equals_plain(fx):
    model, info, _ = inference.load_checkpoint(fx["ckpt"])
    pre = inference.build_preprocess(info, "cpu")
    x = _d4_symmetric_batch()
    for view in inference.tta_views(x, "d4"):
        assert torch.equal(view, x)
    batches = [Batch(x, torch.tensor([0, 1, 2]), ["a", "b", "c"])]
    _, _, plain = inference.predict_probs(model, batches, "cpu", pre, "none")
    for tta in ("flips", "d4"):
        _, _, p = inference.predict_probs(model, batches, "cpu", pre, tta)
        assert np.allclose(p, plain, atol=1e-6)
    # ... while on ordinary images the views differ and TTA changes the prediction
    y = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    assert len({bytes(v.numpy()) for v in inference.tta_views(y, "d4")}) == 8
    _, _, p0 = inference.predict_probs(model, [Batch(y, torch.zeros(3), list("xyz"))], "cpu", pre, "none")
    _, _, p8 = inference.predict_probs(model, [Batch(y, torch.zeros(3), list("xyz"))], "cpu", pre, "d4")
    assert not np.allclose(p0, p8, atol=1e-6)


def test_fit_temperature_is_saved_and_applied(fx, tmp_path):
    ckpt = shutil.copytree(fx["ckpt"], tmp_path / "ckpt")
    argv = [
        "--checkpoint",
        str(ckpt),
        "--data",
        str(fx["val"]),
        "--out",
        str(tmp_path / "val"),
        "--workers",
        "0",
        "--bootstrap",
        "0",
        "--fit-temperature",
    ]
    assert run_command("evaluate", argv) == 0
    saved = json.loads((ckpt / "temperature.json").read_text())
    fitted = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert saved["temperature"] == pytest.approx(fitted["temperature"]) and saved["temperature"] != 1.0
    assert "ci" not in fitted
    argv = [
        "--checkpoint",
        str(ckpt),
        "--data",
        str(fx["val"]),
        "--out",
        str(tmp_path / "again"),
        "--workers",
        "0",
        "--bootstrap",
        "0",
    ]
    assert run_command("evaluate", argv) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["temperature"] == saved["temperature"] and again["nll"] == pytest.approx(fitted["nll"])
    untouched = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert again["nll"] <= untouched["nll"] + 1e-9


def _raw_images(fx, folder: Path) -> list[str]:
    """The validation JPEGs re-saved at odd sizes and formats (what a user's download looks like)."""
    folder.mkdir()
    ids = []
    for i, src in enumerate(sorted((fx["syn"] / "ISIC-2017_Validation_Data").glob("*.jpg"))[:6]):
        with Image.open(src) as im:
            im = im.resize([(150, 100), (90, 130), (64, 64)][i % 3])
            im.save(folder / (src.stem + (".png" if i % 2 else ".JPG")))
        ids.append(src.stem)
    (folder / "README.txt").write_text("not an image, ignored")
    return sorted(ids)


def test_predict_images_writes_isic2017_submission(fx, tmp_path):
    ids = _raw_images(fx, tmp_path / "imgs")
    out = tmp_path / "sub" / "submission.csv"
    assert (
        run_command(
            "predict",
            [
                "--checkpoint",
                str(fx["ckpt"]),
                "--images",
                str(tmp_path / "imgs"),
                "--out",
                str(out),
                "--workers",
                "0",
                "--tta",
                "flips",
            ],
        )
        == 0
    )
    df = pd.read_csv(out)
    assert list(df.columns) == ["image_id", "melanoma", "seborrheic_keratosis"]
    assert df["image_id"].tolist() == ids
    probs = df[["melanoma", "seborrheic_keratosis"]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all() and (probs.sum(1) <= 1 + 1e-9).all()


def test_predict_shards_matches_evaluate(fx, tmp_path):
    m = run_evaluate(fx, tmp_path / "ev")
    out, truth = tmp_path / "sub.csv", tmp_path / "truth.csv"
    assert (
        run_command(
            "predict",
            [
                "--checkpoint",
                str(fx["ckpt"]),
                "--data",
                str(fx["test"]),
                "--out",
                str(out),
                "--truth-out",
                str(truth),
                "--workers",
                "0",
            ],
        )
        == 0
    )
    sub, gt = pd.read_csv(out), pd.read_csv(truth)
    assert sub["image_id"].tolist() == gt["image_id"].tolist() == sorted(sub["image_id"]) and len(sub) == 24
    for name in ("melanoma", "seborrheic_keratosis"):
        assert skm.roc_auc_score(gt[name], sub[name]) == pytest.approx(m[f"auc_{name}"])


@pytest.mark.parametrize("case", ["empty", "bad_image", "classes", "model", "isic2017_classes"])
def test_bad_input_names_culprit_and_writes_nothing(fx, tmp_path, case, capsys):
    imgs, ckpt = tmp_path / "imgs", fx["ckpt"]
    imgs.mkdir()
    if case == "bad_image":
        _raw_images(fx, imgs := tmp_path / "raw")
        (imgs / "ISIC_9999999.jpg").write_text("this is not a JPEG")
        expect = "ISIC_9999999.jpg"
    elif case == "empty":
        expect = f"no images (.jpeg, .jpg, .png) in {imgs}"
    elif case == "classes":
        ckpt = make_checkpoint(tmp_path / "ck", classes=["benign", "malignant"])
        expect = "trained on classes ['benign', 'malignant']"
    elif case == "model":  # a customnet state dict under a config that says customnet_bn
        ckpt = shutil.copytree(fx["ckpt"], tmp_path / "ck")
        (ckpt / "config.yaml").write_text(
            (ckpt / "config.yaml").read_text().replace("model: customnet", "model: customnet_bn")
        )
        expect = f"{ckpt}: cannot load the model"
    else:
        ckpt = make_checkpoint(tmp_path / "ck", classes=["benign", "malignant"])
        expect = "the isic2017 submission needs the classes"
    out = tmp_path / "out" / "submission.csv"
    src = (
        ["--images", str(imgs)]
        if case in ("empty", "bad_image", "isic2017_classes")
        else ["--data", str(fx["test"])]
    )
    if case == "isic2017_classes":  # the default format is the checkpoint's task's (custom here)
        src += ["--format", "isic2017"]
    rc = run_command("predict", ["--checkpoint", str(ckpt), *src, "--out", str(out), "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lesionkit predict: error:") and expect in err, err
    assert not out.parent.exists()
    if case in ("classes", "model"):
        rc = run_command(
            "evaluate",
            [
                "--checkpoint",
                str(ckpt),
                "--data",
                str(fx["test"]),
                "--out",
                str(tmp_path / "ev"),
                "--workers",
                "0",
            ],
        )
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("lesionkit evaluate: error:") and expect in err, err
        assert not (tmp_path / "ev").exists() and not list(tmp_path.glob(".ev.tmp-*"))


def test_wandb_logs_into_the_checkpoint_training_run(fx, tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "demo"
    ckpt = shutil.copytree(fx["ckpt"], run_dir / "best")
    info = json.loads((ckpt / "info.json").read_text())
    (ckpt / "info.json").write_text(json.dumps({**info, "wandb_id": "lkeval0001"}))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = [
        "--checkpoint",
        str(ckpt),
        "--data",
        str(fx["val"]),
        "--out",
        str(tmp_path / "ev"),
        "--workers",
        "0",
        "--bootstrap",
        "0",
        "--wandb",
    ]
    assert run_command("evaluate", argv) == 0
    (run_file,) = (run_dir / "wandb").glob("offline-run-*-lkeval0001/run-lkeval0001.wandb")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    summary, images = {}, set()
    for rec in records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            summary.update(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in rec.summary.update
                }
            )
        elif kind == "history":
            images |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    assert summary["eval/val/isic2017_score"] == pytest.approx(m["isic2017_score"])
    assert summary["eval/val/auc_melanoma"] == pytest.approx(m["auc_melanoma"])
    for plot in ("roc", "confusion", "reliability"):  # wandb.Image rows: eval/val/roc/_type, .../path, ...
        assert f"eval/val/{plot}/_type" in images
