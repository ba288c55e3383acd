"""`lesionkit export`: ONNX and TorchScript of every registry model agree with PyTorch on real ISIC images
(max absolute probability difference <= 1e-4), take any batch size, and carry their preprocessing as JSON;
a failing parity check exits 1 and writes nothing."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lesionkit
from lesionkit import export as E
from lesionkit.cli import run_command
from lesionkit.models import list_models
from tests.isic_real import DATA
from tests.test_evaluate import CLASSES

REAL = DATA / "isic2017-256" / "ISIC-2017_Validation_Data"
IMAGES = sorted(REAL.glob("*.jpg"))[:6]
BIG = {"alexnet", "densenet121", "resnet50"}  # checked by the export itself only (see below)


def _checkpoint(tmp_path, model, registry_checkpoint):
    ckpt = registry_checkpoint(model)  # shared, read only
    if model == "customnet_bn":  # colour constancy and a temperature travel into the JSON and the graph
        ckpt = shutil.copytree(ckpt, tmp_path / model)
        info = json.loads((ckpt / "info.json").read_text())
        (ckpt / "info.json").write_text(json.dumps({**info, "color_constancy": True}))
        (ckpt / "temperature.json").write_text(json.dumps({"temperature": 1.5}))
    return ckpt


def _export(ckpt, fmt, out, *extra):
    argv = ["--checkpoint", str(ckpt), "--format", fmt, "--out", str(out), "--images", *map(str, IMAGES)]
    return run_command("export", [*argv, *extra])


@pytest.mark.parametrize("model", list_models())
def test_export_parity_on_real_images(model, tmp_path, capsys, registry_checkpoint):
    ckpt = _checkpoint(tmp_path, model, registry_checkpoint)
    api = lesionkit.load(ckpt)
    expected = api.predict(IMAGES).to_numpy()  # the API's probabilities: preprocessing + T outside, then in
    x = api.preprocess(torch.stack([_u8(api, p) for p in IMAGES])).numpy()

    onnx_file, ts_file = tmp_path / "m.onnx", tmp_path / "m.pt"
    assert _export(ckpt, "onnx", onnx_file) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "max |p_onnx - p_torch| = " in line and "tolerance 0.0001" in line
    printed = float(line.split("= ")[1].split()[0])
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["parity"]["max_abs_diff"] <= 1e-4 and printed == pytest.approx(
        side["parity"]["max_abs_diff"], abs=1e-6
    )
    assert side["classes"] == CLASSES and side["preprocessing"]["image_size"] == 64
    assert side["preprocessing"]["mean"] == api.info["mean"] and side["temperature"] == api.temperature
    assert side["preprocessing"]["color_constancy"] == (model == "customnet_bn")
    assert _export(ckpt, "torchscript", ts_file) == 0
    ts_side = json.loads((tmp_path / "m.pt.json").read_text())
    assert ts_side["format"] == "torchscript" and ts_side["parity"]["max_abs_diff"] <= 1e-4
    if model in BIG:
        return  # loading 100-240 MB graphs again would double the test's time; the export checked them
    # an independent onnxruntime session at batch sizes 1 and 6 (the export traced 2)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):
        got = session.run(None, {"image": batch})[0]
        assert got.shape == (len(batch), 3) and np.abs(got - expected[: len(batch)]).max() <= 1e-4
    scripted = torch.jit.load(str(ts_file))
    with torch.no_grad():
        got = scripted(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def _u8(api, path):
    from lesionkit.predict import load_image

    return load_image(path, api.image_size)


def test_fixed_adaptive_pool_equals_torch():
    x = torch.randn(2, 3, 5, 7)
    for out in [(4, 4), (6, 6), (2, 3), (5, 7)]:
        want = torch.nn.functional.adaptive_avg_pool2d(x, out)
        assert torch.allclose(E.FixedAdaptiveAvgPool((5, 7), out)(x), want, atol=1e-6)


def test_failed_parity_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch, registry_checkpoint):
    ckpt = _checkpoint(tmp_path, "customnet", registry_checkpoint)
    real = E._onnx
    monkeypatch.setattr(E, "_onnx", lambda *a: real(*a) + 1e-3)  # a graph off by 1e-3
    out = tmp_path / "out" / "m.onnx"
    assert _export(ckpt, "onnx", out) == 1
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "failed the parity check: max |p_onnx - p_torch| = 0.001 > 0.0001" in err
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_to_overwrite_and_needs_parity_images(tmp_path, capsys, registry_checkpoint):
    ckpt = _checkpoint(tmp_path, "customnet", registry_checkpoint)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    assert _export(ckpt, "onnx", out) == 2
    assert f"{out} exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier export"
    assert _export(ckpt, "onnx", out, "--force") == 0 and out.stat().st_size > 1000
    # one parity image: the graph is still traced at another batch size (2) than it is checked at (1)
    assert _export(ckpt, "torchscript", tmp_path / "one.pt", "--parity-images", "1") == 0
    assert json.loads((tmp_path / "one.pt.json").read_text())["parity"]["n"] == 1
    rc = run_command(
        "export", ["--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "n.onnx")]
    )
    assert (
        rc == 2
        and "names no validation shards here to check parity on; pass --images" in capsys.readouterr().err
    )
