"""Packing real ISIC images into shards, read back with plain tarfile / webdataset (not lesionkit)."""

from __future__ import annotations

import io
import json
import re
import signal
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from lesionkit import cli
from lesionkit.manifest import verify
from lesionkit.pack import encode_image, pack
from lesionkit.tasks import ISIC2017_CLASSES

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
THUMBS = DATA / "isic2017-256"
FULLRES = DATA / "isic2017-fullres-sample"


def csv_labels(csv: Path) -> dict[str, int]:
    """ISIC 2017 Part 3 ground truth -> id -> class index (nevus 0, melanoma 1, sk 2), by hand."""
    df = pd.read_csv(csv)
    return {
        r.image_id: 1 if r.melanoma == 1 else 2 if r.seborrheic_keratosis == 1 else 0 for r in df.itertuples()
    }


def tar_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, read with the standard library only: key -> {ext: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("val") / "val"
    code = cli.main(
        [
            "pack",
            "--images",
            str(THUMBS / "ISIC-2017_Validation_Data"),
            "--labels",
            str(THUMBS / "ISIC-2017_Validation_Part3_GroundTruth.csv"),
            "--metadata",
            str(THUMBS / "ISIC-2017_Validation_Data_metadata.csv"),
            "--out",
            str(out),
            "--shard-size",
            "40",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    return out


def test_train_split_counts_and_tar_readback(tmp_path):
    """All 2000 training thumbnails: class counts as in the study, every id once with its CSV label."""
    out = tmp_path / "train"
    csv = THUMBS / "ISIC-2017_Training_Part3_GroundTruth.csv"
    manifest = pack(THUMBS / "ISIC-2017_Training_Data", csv, out, shard_size=500, workers=2)
    assert manifest["counts"] == {"nevus": 1372, "melanoma": 374, "seborrheic_keratosis": 254}
    assert manifest["num_samples"] == 2000 and manifest["classes"] == list(ISIC2017_CLASSES)
    assert [s["num_samples"] for s in manifest["shards"]] == [500, 500, 500, 500]
    assert all(min(s["counts"].values()) > 20 for s in manifest["shards"])  # shuffled: every shard mixes
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert verify(out) == []
    samples = tar_samples(out)
    expected = csv_labels(csv)
    assert {k: int(v["cls"]) for k, v in samples.items()} == expected
    assert all(set(v) == {"jpg", "cls", "json"} for v in samples.values())


def test_val_readback_with_webdataset_and_metadata(val_shards):
    manifest = json.loads((val_shards / "manifest.json").read_text())
    assert manifest["counts"] == {"nevus": 78, "melanoma": 30, "seborrheic_keratosis": 42}
    assert manifest["task"] == "isic2017" and manifest["label_format"] == "isic2017"
    assert [s["num_samples"] for s in manifest["shards"]] == [40, 40, 40, 30]
    meta = pd.read_csv(THUMBS / "ISIC-2017_Validation_Data_metadata.csv", dtype=str).set_index("image_id")
    expected = csv_labels(THUMBS / "ISIC-2017_Validation_Part3_GroundTruth.csv")
    urls = [str(val_shards / s["name"]) for s in manifest["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        info = json.loads(sample["json"])
        key = sample["__key__"]
        assert info["id"] == key and info["label"] == int(sample["cls"])
        assert info["label_name"] == ISIC2017_CLASSES[info["label"]]
        # the one metadata vocabulary: age_approximate -> age, `unknown` -> None
        age, sex = meta.loc[key, "age_approximate"], meta.loc[key, "sex"]
        assert info["meta"] == {
            "age": None if age == "unknown" else int(age),
            "sex": None if sex == "unknown" else sex,
        }
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.mode == "RGB" and image.size == (256, 256) == (info["width"], info["height"])
        seen[key] = info["label"]
    assert seen == expected


def test_fullres_sample_resized_with_aspect_kept(tmp_path):
    csv = FULLRES / "ground_truth.csv"
    manifest = pack(FULLRES / "images", csv, tmp_path / "full", size=160, workers=2)
    assert manifest["counts"] == {"nevus": 5, "melanoma": 4, "seborrheic_keratosis": 5}
    samples = tar_samples(tmp_path / "full")
    assert {k: int(v["cls"]) for k, v in samples.items()} == csv_labels(csv)
    for key, sample in samples.items():
        info = json.loads(sample["json"])
        with Image.open(FULLRES / "images" / f"{key}.jpg") as original:
            assert (info["width"], info["height"]) == original.size
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert min(image.size) == 160 and image.mode == "RGB"
        assert abs(image.width / image.height - info["width"] / info["height"]) < 0.01


@pytest.mark.timeout(120)
def test_workers_end_when_the_parent_ignores_sigterm(tmp_path):
    """Forked workers inherit the parent's SIGTERM disposition (an in-process training run sets one); the
    pool's exit must still terminate them (it once hung here until the 600 s test timeout)."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        manifest = pack(
            FULLRES / "images", FULLRES / "ground_truth.csv", tmp_path / "full", size=64, workers=2
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sum(manifest["counts"].values()) == 14


def test_draft_decoding_matches_full_decode():
    """Reduced-size JPEG decoding must not change what is stored beyond resampling noise."""
    path = FULLRES / "images" / "ISIC_0010459.jpg"  # the smallest full-res file keeps this fast
    fast, _, _ = encode_image(path, 128, 95, draft=True)
    slow, _, _ = encode_image(path, 128, 95, draft=False)
    a, b = (np.asarray(Image.open(io.BytesIO(x)), dtype=np.float32) for x in (fast, slow))
    assert a.shape == b.shape == (128, 171, 3)
    assert np.abs(a - b).mean() < 3.0


def test_same_seed_gives_identical_shards_whatever_the_workers(tmp_path, val_shards):
    again = pack(
        THUMBS / "ISIC-2017_Validation_Data",
        THUMBS / "ISIC-2017_Validation_Part3_GroundTruth.csv",
        tmp_path / "again",
        shard_size=40,
        workers=0,
        metadata=THUMBS / "ISIC-2017_Validation_Data_metadata.csv",
    )
    first = json.loads((val_shards / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]


def write_images(folder: Path, names: dict[str, tuple[str, tuple[int, int]]]) -> None:
    """Tiny test images: name -> (PIL mode, (w, h))."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (mode, size) in names.items():
        image = Image.new("RGB", size, (200, 120, 90)).convert(mode)
        image.save(folder / name)


def read_back(folder: Path) -> dict[str, tuple[int, dict, Image.Image]]:
    return {
        k: (int(v["cls"]), json.loads(v["json"]), Image.open(io.BytesIO(v["jpg"])))
        for k, v in tar_samples(folder).items()
    }


def test_onehot_labels_drop_an_empty_unk_column(tmp_path):
    write_images(tmp_path / "img", {f"ISIC_{i}.jpg": ("RGB", (40, 30)) for i in range(4)})
    (tmp_path / "gt.csv").write_text(
        "image,MEL,NV,BCC,UNK\nISIC_0,1.0,0.0,0.0,0.0\nISIC_1,0.0,1.0,0.0,0.0\n"
        "ISIC_2,0.0,0.0,1.0,0.0\nISIC_3,0.0,1.0,0.0,0.0\n"
    )
    manifest = pack(tmp_path / "img", tmp_path / "gt.csv", tmp_path / "out", size=16, workers=0)
    # UNK (ISIC 2019's "none of these") never has a positive in training labels: not a class
    assert manifest["classes"] == ["MEL", "NV", "BCC"] and manifest["label_format"] == "onehot"
    assert manifest["counts"] == {"MEL": 1, "NV": 2, "BCC": 1} and manifest["task"] == "custom"
    back = read_back(tmp_path / "out")
    assert {k: v[0] for k, v in back.items()} == {"ISIC_0": 0, "ISIC_1": 1, "ISIC_2": 2, "ISIC_3": 1}
    assert back["ISIC_2"][1]["label_name"] == "BCC"


@pytest.mark.parametrize(
    "labels, classes, expected",
    [
        (["nevus", "melanoma", "nevus"], ["melanoma", "nevus"], [1, 0, 1]),
        (["2", "0", "2"], ["0", "1", "2"], [2, 0, 2]),
    ],
)
def test_plain_label_column(tmp_path, labels, classes, expected):
    write_images(tmp_path / "img", {f"a{i}.png": ("RGB", (30, 30)) for i in range(3)})
    rows = "".join(f"a{i},{label}\n" for i, label in enumerate(labels))
    (tmp_path / "gt.csv").write_text("image_id,label\n" + rows)
    manifest = pack(tmp_path / "img", tmp_path / "gt.csv", tmp_path / "out", size=16, workers=0)
    assert manifest["classes"] == classes and manifest["label_format"] == "plain"
    assert [read_back(tmp_path / "out")[f"a{i}"][0] for i in range(3)] == expected


def test_modes_and_exif_orientation_become_upright_rgb(tmp_path):
    write_images(
        tmp_path / "img",
        {
            "gray.jpg": ("L", (40, 20)),
            "cmyk.jpg": ("CMYK", (20, 40)),
            "alpha.png": ("RGBA", (30, 60)),
            "pal.png": ("P", (50, 25)),
        },
    )
    rotated = Image.new("RGB", (60, 30), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait (rotate 90 degrees)
    rotated.save(tmp_path / "img" / "rot.jpg", exif=exif)
    ids = ["gray", "cmyk", "alpha", "pal", "rot"]
    (tmp_path / "gt.csv").write_text(
        "image_id,melanoma,seborrheic_keratosis\n" + "".join(f"{i},0,0\n" for i in ids)
    )
    pack(tmp_path / "img", tmp_path / "gt.csv", tmp_path / "out", size=16, workers=0)
    back = read_back(tmp_path / "out")
    sizes = {k: (v[2].mode, v[2].size, (v[1]["width"], v[1]["height"])) for k, v in back.items()}
    assert sizes == {
        "gray": ("RGB", (32, 16), (40, 20)),
        "cmyk": ("RGB", (16, 32), (20, 40)),
        "alpha": ("RGB", (16, 32), (30, 60)),
        "pal": ("RGB", (32, 16), (50, 25)),
        "rot": ("RGB", (16, 32), (30, 60)),
    }


def test_force_replaces_and_existing_output_is_kept_otherwise(tmp_path, capsys):
    write_images(tmp_path / "img", {"a.jpg": ("RGB", (20, 20)), "b.jpg": ("RGB", (20, 20))})
    (tmp_path / "gt.csv").write_text("image_id,melanoma,seborrheic_keratosis\na,1,0\nb,0,0\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [
        "pack",
        "--images",
        str(tmp_path / "img"),
        "--labels",
        str(tmp_path / "gt.csv"),
        "--out",
        str(out),
        "--workers",
        "0",
        "--size",
        "16",
    ]
    assert cli.main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli.main(args + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.csv", "img", "out"]  # no temp left


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    import lesionkit.pack as pack_module

    write_images(tmp_path / "img", {f"x{i}.jpg": ("RGB", (20, 20)) for i in range(20)})
    (tmp_path / "gt.csv").write_text("image_id,label\n" + "".join(f"x{i},a\n" for i in range(20)))
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return encode_image(*args, **kwargs)

    monkeypatch.setattr(pack_module, "encode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(tmp_path / "img", tmp_path / "gt.csv", tmp_path / "out", size=16, shard_size=5, workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.csv", "img"]


def test_stats_table_and_verify(val_shards, tmp_path, capsys):
    assert cli.main(["stats", str(val_shards), str(pack_fullres_small(tmp_path)), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "melanoma" in out and "30 (20.0%)" in out and "4 (28.6%)" in out  # val and full-res columns
    assert "34 (20.7%)" in out  # total column: 30 + 4 melanoma of 164
    bad = tmp_path / "full"
    shard = bad / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli.main(["stats", str(bad), "--verify"]) == 1
    assert "shard-000000.tar: sha256 differs" in capsys.readouterr().err
    shard.unlink()
    assert cli.main(["stats", str(bad), "--verify"]) == 1
    assert "shard-000000.tar: missing" in capsys.readouterr().err
    assert cli.main(["stats", str(tmp_path / "not_packed")]) == 2
    assert re.search("lesionkit stats: error: .*not_packed", capsys.readouterr().err)


def pack_fullres_small(tmp_path: Path) -> Path:
    """The full-res sample packed small (a second column for the stats table)."""
    pack(FULLRES / "images", FULLRES / "ground_truth.csv", tmp_path / "full", size=64, workers=2)
    return tmp_path / "full"
