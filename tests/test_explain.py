"""Grad-CAM explanations: maps of the image's size for every registry model; on a model trained on planted
data (the colour of a square mark decides the class, a brown disc is in every image) the map peaks on the
mark; `explain` writes overlays, a contact sheet and explanations.csv; `evaluate --explain-errors N`
explains the N most confident mistakes of each class."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from lesionkit import api
from lesionkit.checkpoint import write_inference_files
from lesionkit.cli import run_command
from lesionkit.config import TrainConfig
from lesionkit.explain import class_activation_maps, most_confident_errors
from lesionkit.models import HALF, create_model, list_models
from lesionkit.predict import load_image
from tests.test_evaluate import CLASSES, build_fixture
from tests.test_export import IMAGES

S, MARK = 128, 24
PLANTED = ["blue_mark", "red_mark"]


def planted(n: int, seed: int):
    """uint8 [n, S, S, 3] skin-toned noise with a brown disc (both classes) and a 16 px square whose
    colour is the class; returns (images, labels, (top, left) of each mark)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    images, labels, boxes = np.empty((n, S, S, 3), np.uint8), rng.integers(0, 2, n), []
    for i in range(n):
        img = np.array([205.0, 160.0, 140.0]) + rng.normal(0, 12, (S, S, 3))
        cy, cx, r = *rng.integers(S // 4, 3 * S // 4, 2), rng.integers(S // 8, S // 5)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = [120, 80, 60]
        top, left = rng.integers(0, S - MARK, 2)
        img[top : top + MARK, left : left + MARK] = [230, 30, 30] if labels[i] else [30, 60, 230]
        images[i] = np.clip(img, 0, 255)
        boxes.append((int(top), int(left)))
    return images, labels, boxes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A customnet trained for 2 epochs on 256 planted 128 px images (~5 s), as a checkpoint; 24 held-out
    PNGs. 128 px (the customnet recipe's size) gives its last block an 8x8 map, fine enough to locate a
    24 px mark."""
    root = tmp_path_factory.mktemp("planted")
    x, y, _ = planted(256, 0)
    torch.manual_seed(0)
    net = create_model("customnet", num_classes=2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    inputs, targets = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5, torch.from_numpy(y)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(32):
            loss = nn.functional.cross_entropy(net(inputs[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    ckpt = root / "ckpt"
    ckpt.mkdir()
    info = {"classes": PLANTED, "model": "customnet", "image_size": S, "mean": list(HALF), "std": list(HALF)}
    write_inference_files(ckpt, net.eval().state_dict(), TrainConfig(model="customnet", image_size=S), info)
    held, labels, boxes = planted(24, 1)
    (root / "imgs").mkdir()
    for i, img in enumerate(held):
        Image.fromarray(img).save(root / "imgs" / f"img_{i:03d}.png")
    return {"root": root, "ckpt": ckpt, "labels": labels, "boxes": boxes}


@pytest.mark.parametrize("model", list_models())
def test_maps_have_the_image_size_and_are_finite_for_every_model(model, registry_checkpoint):
    m = api.load(registry_checkpoint(model))
    images = torch.stack([load_image(p, 64) for p in IMAGES[:3]])
    maps = class_activation_maps(m, images, [0, 1, 2])
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_map_peaks_on_the_planted_mark(trained, tmp_path, capsys):
    out = tmp_path / "cam"
    argv = [
        "--checkpoint",
        str(trained["ckpt"]),
        "--images",
        str(trained["root"] / "imgs"),
        "--out",
        str(out),
    ]
    assert run_command("explain", argv) == 0
    assert "24 overlay(s)" in capsys.readouterr().out
    table = pd.read_csv(out / "explanations.csv")
    assert len(table) == 24 and table["image_id"].tolist() == [f"img_{i:03d}" for i in range(24)]
    predicted = table[[f"p_{c}" for c in PLANTED]].to_numpy().argmax(1)
    assert (predicted == trained["labels"]).mean() >= 0.95  # the model learnt the mark
    hits, contrast = 0, []
    model = api.load(trained["ckpt"])
    images = torch.stack([load_image(trained["root"] / "imgs" / f"{k}.png", S) for k in table["image_id"]])
    maps = class_activation_maps(model, images, predicted.tolist())
    for i, (top, left) in enumerate(trained["boxes"]):
        y, x = table.loc[i, "peak_y"], table.loc[i, "peak_x"]
        hits += top - 8 <= y < top + MARK + 8 and left - 8 <= x < left + MARK + 8  # half a map cell
        inside = np.zeros((S, S), bool)
        inside[top : top + MARK, left : left + MARK] = True
        contrast.append(maps[i][inside].mean() / max(maps[i][~inside].mean(), 1e-6))
    assert hits >= 22, f"the map's peak is on the mark in only {hits} of 24 images"
    assert min(contrast) > 1.5 and np.median(contrast) > 2, contrast  # the mark is hotter than the rest


def test_explain_writes_overlays_sheet_and_refuses_to_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "cam"
    imgs = sorted((trained["root"] / "imgs").glob("*.png"))[:3]
    argv = ["--checkpoint", str(trained["ckpt"]), "--images", *map(str, imgs), "--out", str(out)]
    assert run_command("explain", [*argv, "--classes", "red_mark"]) == 0
    names = sorted(p.name for p in out.iterdir())
    pred = api.load(trained["ckpt"]).predict(imgs).idxmax(axis=1)
    expected = {f"{k}__{c}.png" for k in pred.index for c in {pred[k], "red_mark"}}
    assert set(names) == expected | {"contact_sheet.png", "explanations.csv"}
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 300
    with Image.open(out / f"{imgs[0].stem}__red_mark.png") as overlay:
        assert overlay.size == (S, S)
    capsys.readouterr()
    assert run_command("explain", argv) == 2
    assert f"{out} exists; pass --force" in capsys.readouterr().err
    assert run_command("explain", [*argv, "--classes", "purple", "--force"]) == 2
    assert "--classes ['purple']: not classes of" in capsys.readouterr().err


def test_evaluate_explains_the_most_confident_mistakes(tmp_path):
    fx = build_fixture(tmp_path / "fx")
    out = tmp_path / "ev"
    argv = ["--checkpoint", str(fx["ckpt"]), "--data", str(fx["test"]), "--out", str(out), "--workers", "0"]
    assert run_command("evaluate", [*argv, "--bootstrap", "0", "--explain-errors", "2"]) == 0
    pred = pd.read_csv(out / "predictions.csv")
    labels, probs = pred["label"].to_numpy(), pred[CLASSES].to_numpy()
    picked = most_confident_errors(labels, probs, 2)
    assert 0 < len(picked) <= 6
    for c in range(3):  # per class: its mistakes, most confident first, at most 2
        mine = [i for i in picked if labels[i] == c]
        wrong = [i for i in range(len(labels)) if labels[i] == c and probs[i].argmax() != c]
        assert len(mine) == min(2, len(wrong))
        assert all(probs[mine[0]].max() >= probs[j].max() for j in wrong)
    table = pd.read_csv(out / "errors" / "explanations.csv")
    assert set(table["image_id"]) == {pred.loc[i, "image_id"] for i in picked}
    for i in picked:  # the predicted and the true class of every mistake
        key = pred.loc[i, "image_id"]
        assert (out / "errors" / f"{key}__{CLASSES[probs[i].argmax()]}.png").is_file()
        assert (out / "errors" / f"{key}__{CLASSES[labels[i]]}.png").is_file()
    assert (out / "errors" / "contact_sheet.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["n"] == 24
