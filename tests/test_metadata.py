"""Metadata fusion (`--metadata age,sex,site`): the feature encoding with missing values, every registry
model's fused forward/backward, a 2-rank DDP run on real ISIC 2020 images and metadata, and the checkpoint
round trip through evaluate, predict (shards, and raw images + a metadata CSV) and the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cpu_ddp, make_shards
from isic_real import GT2020, I2020, pack_2020
from test_train import TINY, env

import lesionkit
from lesionkit import metafeatures
from lesionkit.cli import run_command
from lesionkit.errors import ConfigError, UsageError
from lesionkit.models import MetaFusion, create_model, forward, list_models

REPO = Path(__file__).resolve().parents[1]
SPEC = metafeatures.MetaSpec(("age", "sex", "site"))


def test_features_encode_values_and_missing_values():
    assert SPEC.size == 2 + 3 + 10 and len(SPEC.names) == SPEC.size
    v = SPEC.encode({"age": 70, "sex": "male", "site": "torso"})
    assert v[:2] == [1.0, 0.0]  # (70 - 50) / 20, not missing
    assert v[2:5] == [0.0, 1.0, 0.0]
    assert v[5:].index(1.0) == metafeatures.SITES.index("torso") and sum(v[5:]) == 1.0
    missing = SPEC.encode({"age": None, "sex": None})  # site absent altogether
    assert missing[:2] == [0.0, 1.0] and missing[2:5] == [0.0, 0.0, 1.0] and missing[-1] == 1.0
    odd = {"age": 40, "sex": "female", "site": "left knee"}  # outside the vocabulary: counted as missing
    assert SPEC.encode(odd)[-1] == 1.0 and SPEC.unknown(odd) == ["site='left knee'"]
    assert SPEC({"id": "x", "meta": {"age": 30}})[:2] == [-1.0, 0.0]  # the loaders' hook reads the record
    assert metafeatures.parse("site, age") == metafeatures.MetaSpec(("age", "site"))
    assert metafeatures.parse("") is None
    with pytest.raises(
        ConfigError, match=r"--metadata bmi: unknown field\(s\); valid fields: age, sex, site"
    ):
        metafeatures.parse("age,bmi")


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_fuses_metadata_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, meta_features=SPEC.size)
    assert isinstance(model, MetaFusion) and model.head_name == "fusion"
    images = torch.randn(4, 3, 64, 64)
    rows = [
        {"age": 55, "sex": "female", "site": "head/neck"},
        {},
        {"age": None, "sex": "male"},
        {"site": "x"},
    ]
    meta = torch.tensor([SPEC.encode(r) for r in rows])
    logits = forward(model, images, meta)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    mlp_grad = model.fusion["meta"][0].weight.grad
    assert mlp_grad is not None and mlp_grad.abs().sum() > 0  # the metadata path learns
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads)
    model.eval()
    with torch.no_grad():  # the output depends on the metadata, image by image
        other = meta.clone()
        other[0] = torch.tensor(SPEC.encode({}))
        a, b = forward(model, images, meta), forward(model, images, other)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Real ISIC 2020 images of whole patients (with their metadata), 2 patient-grouped folds, and a 2-rank
    DDP run with `--metadata age,sex,site` validating on fold 0."""
    root = tmp_path_factory.mktemp("meta")
    folder, picked = pack_2020(root)
    assert run_command("split", [str(folder), "--by", "patient", "--folds", "2"]) == 0
    out = root / "run"
    cmd = cpu_ddp(REPO / "lesionkit" / "train.py", procs=2)
    argv = ["--train", str(folder), "--fold", "0", "--epochs", "1", "--metadata", "age,sex,site"]
    res = subprocess.run(
        cmd + TINY + argv + ["--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(env(), ACCELERATE_USE_CPU="1"),
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"root": root, "folder": folder, "picked": picked, "run": out}


@pytest.mark.ddp
def test_ddp_run_with_metadata_keeps_ranks_equal_and_saves_the_spec(real):
    world = json.loads((real["run"] / "world.json").read_text())
    assert world["world_size"] == 2
    assert len(world["weights_sha256"]) == 2 and len(set(world["weights_sha256"])) == 1
    info = json.loads((real["run"] / "best" / "info.json").read_text())
    assert info["meta_features"] == SPEC.to_info()
    state = torch.load(real["run"] / "best" / "model.pt", weights_only=True)
    assert state["fusion.meta.0.weight"].shape == (32, SPEC.size)


@pytest.mark.ddp
def test_checkpoint_round_trip_scores_the_same_everywhere(real, tmp_path):
    """evaluate (shards) == predict --data == predict --images + the release's metadata CSV == the API; and
    the metadata matters: the same images with their metadata blanked score differently."""
    ckpt, folder = real["run"] / "best", real["folder"]
    ev = tmp_path / "ev"
    argv = ["--checkpoint", str(ckpt), "--data", str(folder), "--out", str(ev), "--workers", "0"]
    assert run_command("evaluate", [*argv, "--bootstrap", "0"]) == 0
    by_eval = pd.read_csv(ev / "predictions.csv").set_index("image_id")["melanoma"].sort_index()
    assert len(by_eval) == len(real["picked"])

    sub = tmp_path / "data.csv"
    assert run_command("predict", ["--checkpoint", str(ckpt), "--data", str(folder), "--out", str(sub)]) == 0
    by_shards = pd.read_csv(sub).set_index("image_name")["target"].sort_index()
    assert np.abs(by_shards.to_numpy() - by_eval.to_numpy()).max() < 1e-6

    images = tmp_path / "images"
    images.mkdir()
    ids = list(by_eval.index[:12])
    for i in ids:
        (images / f"{i}.jpg").symlink_to(I2020 / "train" / f"{i}.jpg")
    raw = tmp_path / "raw.csv"
    argv = ["--checkpoint", str(ckpt), "--images", str(images), "--metadata", str(GT2020), "--out", str(raw)]
    assert run_command("predict", argv) == 0
    by_images = pd.read_csv(raw).set_index("image_name")["target"]
    assert np.abs(by_images.loc[ids].to_numpy() - by_eval.loc[ids].to_numpy()).max() < 1e-6

    model = lesionkit.load(ckpt)
    api = model.predict(images, metadata=GT2020)["melanoma"]
    assert np.abs(api.loc[ids].to_numpy() - by_eval.loc[ids].to_numpy()).max() < 1e-6
    one = model.predict(images / f"{ids[0]}.jpg", metadata={"age": None, "sex": None, "site": None})
    blank = {i: {} for i in ids}
    blanked = model.predict(images, metadata=blank)["melanoma"]
    assert np.abs(np.log(blanked.loc[ids].to_numpy() / by_eval.loc[ids].to_numpy())).max() > 0.01
    assert abs(one["melanoma"] - blanked.loc[ids[0]]) < 1e-6  # None values = missing = absent


@pytest.mark.ddp
def test_metadata_mistakes_are_one_clear_line(real, tmp_path, capsys):
    ckpt, images = real["run"] / "best", tmp_path / "images"
    images.mkdir()
    first = real["picked"].image_name.iloc[0]
    (images / f"{first}.jpg").symlink_to(I2020 / "train" / f"{first}.jpg")
    base = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp_path / "p.csv")]
    # the model takes metadata: raw images without it are refused
    assert run_command("predict", base) == 2
    assert "trained with metadata (age,sex,site)" in capsys.readouterr().err
    # a CSV without a site column names what it looks for
    pd.read_csv(GT2020).drop(columns=["anatom_site_general_challenge"]).to_csv(
        tmp_path / "m.csv", index=False
    )
    assert run_command("predict", [*base, "--metadata", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert "no column for site" in err and "anatom_site_general_challenge" in err
    # an image missing from the CSV is named
    gt = pd.read_csv(GT2020)
    gt[gt.image_name != first].to_csv(tmp_path / "others.csv", index=False)
    assert run_command("predict", [*base, "--metadata", str(tmp_path / "others.csv")]) == 2
    assert f"no metadata for 1 image(s): {first}" in capsys.readouterr().err
    with pytest.raises(UsageError, match="was trained with metadata"):
        lesionkit.load(ckpt).predict(images)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.ddp
def test_export_of_a_metadata_model_takes_images_and_features(real, tmp_path, capsys):
    """ONNX and TorchScript graphs with two inputs (image, encoded metadata) give the API's probabilities
    for raw images + the release's metadata CSV; the JSON says how to build the features."""
    import onnxruntime as ort

    from lesionkit.predict import load_image

    ckpt, images = real["run"] / "best", tmp_path / "images"
    images.mkdir()
    ids = list(real["picked"].image_name[:5])
    for i in ids:
        (images / f"{i}.jpg").symlink_to(I2020 / "train" / f"{i}.jpg")
    base = ["--checkpoint", str(ckpt), "--images", str(images)]
    assert run_command("export", [*base, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "takes metadata (age,sex,site) beside the image: pass --metadata" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()

    argv = [*base, "--metadata", str(GT2020), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert run_command("export", argv) == 0
    assert f"+ metadata [{SPEC.size}]" in capsys.readouterr().out
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert (
        side["metadata_input"]["features"] == SPEC.names and side["metadata_input"]["shape"][1] == SPEC.size
    )
    assert side["parity"]["n"] == 5 and side["parity"]["max_abs_diff"] <= 1e-4

    model = lesionkit.load(ckpt)
    expected = model.predict(images, metadata=GT2020).loc[ids].to_numpy()
    x = model.preprocess(torch.stack([load_image(images / f"{i}.jpg", model.image_size) for i in ids]))
    rows = metafeatures.read_csv(GT2020, SPEC)
    meta = np.array([SPEC.encode(rows[i]) for i in ids], dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy(), "metadata": meta})[0]
    assert np.abs(got - expected).max() <= 1e-4
    blank = np.tile(np.array(SPEC.encode({}), dtype=np.float32), (5, 1))  # the metadata input matters
    blanked = session.run(None, {"image": x.numpy(), "metadata": blank})[0]
    assert np.abs(np.log(blanked[:, 1] / got[:, 1])).max() > 0.01

    # TorchScript, parity checked on the fold the run validated on (no --images needed)
    out = tmp_path / "m.pt"
    assert (
        run_command("export", ["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    )
    assert (
        "validation image(s)" in capsys.readouterr().out
        and "(fold 0)" in json.loads((tmp_path / "m.pt.json").read_text())["parity"]["images"]
    )
    with torch.no_grad():
        scripted = torch.jit.load(str(out))(x, torch.from_numpy(meta)).numpy()
    assert np.abs(scripted - expected).max() <= 1e-4


@pytest.mark.ddp
def test_grad_cam_of_a_metadata_model_holds_each_images_metadata(real, tmp_path, capsys):
    """`explain --metadata CSV` and `evaluate --explain-errors` explain a metadata model: the probabilities
    beside the maps are the metadata-aware ones; without the metadata it is one clear line."""
    from lesionkit.explain import class_activation_maps
    from lesionkit.predict import load_image

    ckpt, images = real["run"] / "best", tmp_path / "images"
    images.mkdir()
    ids = sorted(real["picked"].image_name[:3])
    for i in ids:
        (images / f"{i}.jpg").symlink_to(I2020 / "train" / f"{i}.jpg")
    base = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp_path / "cam")]
    assert run_command("explain", base) == 2
    assert "trained with metadata (age,sex,site)" in capsys.readouterr().err
    assert not (tmp_path / "cam").exists()
    assert run_command("explain", [*base, "--metadata", str(GT2020)]) == 0
    table = pd.read_csv(tmp_path / "cam" / "explanations.csv").set_index("image_id")
    model = lesionkit.load(ckpt)
    expected = model.predict(images, metadata=GT2020)["melanoma"]
    assert sorted(table.index) == ids
    assert np.abs(table.loc[ids, "p_melanoma"].to_numpy() - expected.loc[ids].to_numpy()).max() < 1e-6

    u8 = torch.stack([load_image(images / f"{i}.jpg", model.image_size) for i in ids])
    rows = metafeatures.read_csv(GT2020, SPEC)
    meta = torch.tensor([SPEC.encode(rows[i]) for i in ids])
    maps = class_activation_maps(model, u8, [1, 1, 1], meta)
    assert maps.shape == (3, model.image_size, model.image_size) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    with pytest.raises(UsageError, match="takes metadata"):
        class_activation_maps(model, u8, [1, 1, 1])

    ev = tmp_path / "ev"
    argv = ["--checkpoint", str(ckpt), "--data", str(real["folder"]), "--fold", "0", "--out", str(ev)]
    assert (
        run_command("evaluate", [*argv, "--workers", "0", "--bootstrap", "0", "--explain-errors", "1"]) == 0
    )
    errors = pd.read_csv(ev / "errors" / "explanations.csv")
    pred = pd.read_csv(ev / "predictions.csv").set_index("image_id")
    assert len(errors) >= 1
    for _, row in errors.iterrows():  # each mistake's probabilities are evaluate's (with its metadata)
        assert abs(row["p_melanoma"] - pred.loc[row["image_id"], "melanoma"]) < 1e-6


def test_training_refuses_metadata_the_shards_do_not_hold(tmp_path):
    plain = tmp_path / "plain"
    make_shards(plain, 20, 2)  # packed without a metadata CSV
    argv = [*TINY, "--train", str(plain), "--val", str(plain), "--metadata", "age,site"]
    res = subprocess.run(
        [sys.executable, "-m", "lesionkit.train", *argv, "--output-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert f"--metadata age,site: {plain} has no age, site values" in lines[0]
    assert not (tmp_path / "r").exists()
