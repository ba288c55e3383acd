"""The Python API (`lesionkit.load(...).predict`) gives `evaluate`'s probabilities for the same images,
with TTA and the checkpoint's temperature, and `predict` on the command line goes through it."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import lesionkit
from lesionkit.cli import run_command
from lesionkit.errors import UsageError
from tests.test_evaluate import CLASSES, build_fixture


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    fx = build_fixture(tmp_path_factory.mktemp("apifx"))
    ckpt = shutil.copytree(fx["ckpt"], fx["root"] / "ckpt-t")
    (ckpt / "temperature.json").write_text(json.dumps({"temperature": 1.7}))
    fx["ckpt_t"] = ckpt
    return fx


@pytest.mark.parametrize("tta", ["none", "flips", "d4"])
def test_api_equals_evaluate_on_the_same_images(fx, tmp_path, tta):
    out = tmp_path / "ev"
    argv = ["--checkpoint", str(fx["ckpt_t"]), "--data", str(fx["test"]), "--out", str(out)]
    assert run_command("evaluate", [*argv, "--workers", "0", "--bootstrap", "0", "--tta", tta]) == 0
    assert json.loads((out / "metrics.json").read_text())["temperature"] == 1.7
    ev = pd.read_csv(out / "predictions.csv").set_index("image_id")[CLASSES]

    model = lesionkit.load(fx["ckpt_t"])
    assert model.temperature == 1.7 and model.classes == CLASSES
    # the raw images the shards were packed from, as a folder and as a list of paths
    folder = fx["syn"] / "ISIC-2017_Training_Data"
    api = model.predict(folder, tta=tta, batch_size=5)
    assert list(api.index) == list(ev.index) and list(api.columns) == CLASSES
    assert np.abs(api.to_numpy() - ev.to_numpy()).max() < 1e-6
    assert np.allclose(api.sum(axis=1), 1.0)
    paths = sorted(folder.glob("*.jpg"))[:3]
    listed = model.predict([str(p) for p in paths], tta=tta)
    assert np.abs(listed.to_numpy() - ev.loc[[p.stem for p in paths]].to_numpy()).max() < 1e-6
    one = model.predict(paths[0], tta=tta)
    assert isinstance(one, dict) and list(one) == CLASSES
    assert np.allclose(list(one.values()), ev.loc[paths[0].stem].to_numpy(), atol=1e-6)
    # without the temperature the probabilities are sharper: T is really applied
    plain = lesionkit.load(fx["ckpt_t"], temperature=1.0).predict(paths[0], tta=tta)
    assert max(plain.values()) > max(one.values()) + 1e-4


def test_in_memory_images_match_the_same_image_as_a_file(fx, tmp_path):
    model = lesionkit.load(fx["ckpt"])
    src = sorted((fx["syn"] / "ISIC-2017_Validation_Data").glob("*.jpg"))[0]
    with Image.open(src) as im:
        pil = im.convert("RGB").resize((90, 70))
    pil.save(tmp_path / "same.png")
    from_file = model.predict(tmp_path / "same.png")
    from_pil = model.predict(pil)
    from_array = model.predict([np.asarray(pil), np.asarray(pil)])
    assert from_pil == pytest.approx(from_file, abs=1e-7)
    assert list(from_array.index) == ["0", "1"]
    assert np.allclose(from_array.to_numpy(), [list(from_file.values())] * 2, atol=1e-7)
    chw = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1)  # torch's layout, one image and a batch
    assert model.predict(chw) == pytest.approx(from_file, abs=1e-7)
    assert np.allclose(model.predict(chw[None]).to_numpy(), [list(from_file.values())], atol=1e-7)
    assert model.predict(pil.convert("L")) != pytest.approx(from_file, abs=1e-7)  # grey: taken as RGB


def test_predict_command_takes_one_image_file_through_the_api(fx, tmp_path):
    src = sorted((fx["syn"] / "ISIC-2017_Validation_Data").glob("*.jpg"))[1]
    out = tmp_path / "one.csv"
    argv = ["--checkpoint", str(fx["ckpt_t"]), "--images", str(src), "--out", str(out), "--tta", "flips"]
    assert run_command("predict", [*argv, "--workers", "0"]) == 0
    sub = pd.read_csv(out)
    expect = lesionkit.load(fx["ckpt_t"]).predict(src, tta="flips")
    assert sub["image_id"].tolist() == [src.stem]
    assert sub.loc[0, "melanoma"] == pytest.approx(expect["melanoma"], abs=1e-6)
    assert sub.loc[0, "seborrheic_keratosis"] == pytest.approx(expect["seborrheic_keratosis"], abs=1e-6)


def test_bad_api_input_is_one_clear_usage_error(fx, tmp_path):
    model = lesionkit.load(fx["ckpt"])
    with pytest.raises(UsageError, match="image not found: .*nope.jpg"):
        model.predict(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_text("not a jpeg")
    with pytest.raises(UsageError, match="(?s)1 file\\(s\\) are not readable images.*bad.jpg"):
        model.predict([tmp_path / "bad.jpg"])
    with pytest.raises(UsageError, match="trained on images only; it takes no metadata"):
        model.predict(tmp_path / "bad.jpg", metadata={"age": 50})
    with pytest.raises(UsageError, match="arrays must be uint8"):
        model.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(UsageError, match="not a lesionkit checkpoint"):
        lesionkit.load(tmp_path)
