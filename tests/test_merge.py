"""Merged training (issue 15): label maps from one release's classes into another's, the refusal of a class a
map does not name, per-source sampling weights, and a merged run end to end, on real ISIC 2017, 2019 and 2020
images from ../shared/data (small subsets packed at 32 px)."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_shards
from isic_real import GT2020, pack_2019, pack_2020

from lesionkit import labelmaps, tasks
from lesionkit.config import TrainConfig, apply_overrides
from lesionkit.data import train_loader
from lesionkit.errors import ConfigError, UsageError
from lesionkit.manifest import dataset_info
from lesionkit.pack import pack

REPO = Path(__file__).resolve().parents[1]
I17 = REPO / ".." / "shared" / "data" / "isic2017-256"


def pack_2017(root: Path, name: str, split: str, n: int) -> tuple[Path, pd.DataFrame]:
    """The first `n` images of an ISIC 2017 split with each class present."""
    gt = pd.read_csv(I17 / f"ISIC-2017_{split}_Part3_GroundTruth.csv")
    nevus = gt[(gt.melanoma == 0) & (gt.seborrheic_keratosis == 0)]
    picked = pd.concat([gt[gt.melanoma == 1].head(n // 3), gt[gt.seborrheic_keratosis == 1].head(n // 3),
                        nevus.head(n - 2 * (n // 3))])  # fmt: skip
    picked.to_csv(root / f"{name}.csv", index=False)
    pack(I17 / f"ISIC-2017_{split}_Data", root / f"{name}.csv", root / name, size=32, shard_size=8, workers=0)
    return root / name, picked


def label_2017(row) -> str:
    return "melanoma" if row.melanoma else "seborrheic_keratosis" if row.seborrheic_keratosis else "nevus"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    i17, gt17 = pack_2017(root, "isic2017", "Training", 24)
    i17v, _ = pack_2017(root, "isic2017-val", "Validation", 12)
    i19, gt19 = pack_2019(root)
    i20, gt20 = pack_2020(root, name="isic2020-dx", label_column="diagnosis")
    return {"i17": i17, "i17v": i17v, "i19": i19, "i20": i20, "gt17": gt17, "gt19": gt19, "gt20": gt20}


def expected_counts(labels, mapping) -> dict:
    counts = collections.Counter(mapping[x] for x in labels)
    counts.pop(None, None)
    return dict(counts)


def test_shipped_maps_name_every_class_of_their_source_and_only_target_classes():
    assert {"isic2017_to_isic2019", "isic2019_to_isic2017", "isic2020_to_isic2019"} <= set(
        labelmaps.shipped()
    )
    for name in labelmaps.shipped():
        lmap = labelmaps.load(name)
        target = tasks.get_task(lmap.target).classes
        assert {v for v in lmap.classes.values() if v is not None} <= set(target), name
        source = tasks.get_task(lmap.source).classes
        if source is not None:
            assert set(source) <= set(lmap.classes), name
    # every diagnosis of the real ISIC 2020 ground truth, as pack names it
    diagnoses = (
        pd.read_csv(GT2020, dtype=str).diagnosis.str.lower().str.replace(r"[^0-9a-z]+", "_", regex=True)
    )
    assert set(diagnoses.str.strip("_")) <= set(labelmaps.load("isic2020_to_isic2019").classes)
    assert labelmaps.load("isic2017_to_isic2019").classes == {
        "nevus": "NV",
        "melanoma": "MEL",
        "seborrheic_keratosis": "BKL",
    }


def test_merged_counts_and_every_streamed_label_follow_the_map(real):
    """ISIC 2019 mapped into ISIC 2017's classes: the counts from the manifests, and one epoch of the real
    loader (every sample once), give each image the label the map gives its official class; the classes
    mapped to null (BCC, AK, ...) never appear."""
    folders = [str(real["i17"]), str(real["i19"])]
    merge = labelmaps.merge(folders, ["none", "isic2019_to_isic2017"], tasks.ISIC2017_CLASSES)
    classes, counts, total = dataset_info(folders, merge=merge)
    to17 = labelmaps.load("isic2019_to_isic2017").classes
    truth = collections.Counter((r.image_id, label_2017(r)) for r in real["gt17"].itertuples())
    truth += collections.Counter((r.image, to17[r.y]) for r in real["gt19"].itertuples() if to17[r.y])
    assert classes == list(tasks.ISIC2017_CLASSES)
    assert counts == {c: sum(n for (_, label), n in truth.items() if label == c) for c in classes}
    assert total == truth.total() < len(real["gt17"]) + len(real["gt19"])
    loader = train_loader(folders, image_size=32, batch_size=1, workers=0, seed=0, epoch=0, rank=0,
                          world_size=1, merge=merge)  # fmt: skip
    seen = collections.Counter(
        (key, classes[int(label)]) for batch in loader for key, label in zip(batch.keys, batch.labels)
    )
    assert seen == truth  # (images in both releases, under one ISIC id, come once from each)


def test_isic2020_diagnoses_map_onto_isic2019_classes(real):
    merge = labelmaps.merge(
        [real["i19"], real["i20"]], ["none", "isic2020_to_isic2019"], tasks.ISIC2019_CLASSES
    )
    _, counts, total = dataset_info([real["i19"], real["i20"]], merge=merge)
    _, counts19, total19 = dataset_info([real["i19"]])
    to19 = labelmaps.load("isic2020_to_isic2019").classes
    slug = real["gt20"].diagnosis.str.lower().str.replace(r"[^0-9a-z]+", "_", regex=True).str.strip("_")
    from2020 = expected_counts(slug, to19)
    assert from2020 and set(from2020) <= {"MEL", "NV", "BKL"} and "unknown" in set(slug)
    assert counts == {c: counts19[c] + from2020.get(c, 0) for c in tasks.ISIC2019_CLASSES}
    assert total == total19 + sum(from2020.values())


def test_a_class_the_map_does_not_name_stops_the_run_before_it_starts(real, tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text(
        yaml.safe_dump({"source": "isic2019", "target": "isic2017", "map": {"MEL": "melanoma"}})
    )
    bad = {
        str(partial): f"label map {partial} has no entry for class 'NV' of {real['i19']}",
        "isic2017_to_isic2019": f"label map isic2017_to_isic2019 maps isic2017 data, but {real['i19']} holds "
        "task isic2019",
        "no_such_map": "unknown label map 'no_such_map': not a YAML file; shipped maps: isic2017_to_isic2019",
    }
    for lmap, message in bad.items():
        out = tmp_path / f"run-{len(message)}"
        res = subprocess.run(
            [sys.executable, "-m", "lesionkit.cli", "train", "--train", str(real["i17"]), str(real["i19"]),
             "--label-maps", "none", lmap, "--val", str(real["i17v"]), "--model", "customnet",
             "--image-size", "32", "--output-dir", str(out), "--no-wandb"],
            capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not out.exists()
    # a map into classes the validation data does not have; one map per folder; --val required
    with pytest.raises(UsageError, match=r"maps into \['BKL', 'MEL', 'NV'\], which are not classes"):
        labelmaps.merge([real["i17"]], ["isic2017_to_isic2019"], tasks.ISIC2017_CLASSES)
    with pytest.raises(UsageError, match="names 1 map\\(s\\) for 2 --train folder"):
        labelmaps.merge([real["i17"], real["i19"]], ["none"], tasks.ISIC2017_CLASSES)
    from lesionkit.train import check_config

    cfg = TrainConfig(train=[str(real["i17"]), str(real["i19"])], label_maps=["none", "isic2019_to_isic2017"])
    with pytest.raises(ConfigError, match="into the classes of the validation data: give --val, or --fold K"):
        check_config(cfg)
    cfg = TrainConfig(train=[str(real["i17"]), str(real["i19"])], val=[str(real["i17v"])])
    with pytest.raises(UsageError, match="disagree on the classes"):
        check_config(cfg)


def source_shares(folders, weights, epochs: int = 3, world: int = 2) -> tuple[float, int]:
    """Share of samples drawn from the folder whose ids start with A_, over `epochs` epochs of all ranks
    (2 loader workers each), and the batches per rank and epoch."""
    drawn = collections.Counter()
    for rank in range(world):
        loader = train_loader(folders, image_size=32, batch_size=8, workers=2, seed=3, epoch=0, rank=rank,
                              world_size=world, source_weights=weights)  # fmt: skip
        for _ in range(epochs):
            for batch in loader:
                drawn.update(k[:2] for k in batch.keys)
    return drawn["A_"] / sum(drawn.values()), len(loader)


def test_source_weights_set_each_folders_share_of_the_samples_drawn(tmp_path):
    """A small folder (48 samples) beside a big one (240): without weights each sample is drawn once an
    epoch (share 1/6); with --source-weights 1 1 each folder gives half the samples and 1 3 a quarter,
    over the same number of batches, in a 2-rank run."""
    small = make_shards(tmp_path / "small", 48, 4, prefix="A_")
    big = make_shards(tmp_path / "big", 240, 8, prefix="B_", seed=1)
    assert small["num_samples"] + big["num_samples"] == 288
    folders = [tmp_path / "small", tmp_path / "big"]
    plain, batches = source_shares(folders, None)
    assert plain == pytest.approx(48 / 288, abs=0.005)
    equal, batches_equal = source_shares(folders, [1, 1])
    assert equal == pytest.approx(0.5, abs=0.05)
    quarter, _ = source_shares(folders, [1, 3])
    assert quarter == pytest.approx(0.25, abs=0.05)
    assert batches == batches_equal == 18  # 288 samples / 2 ranks / batch 8: the epoch keeps its length
    with pytest.raises(UsageError, match="must be 2 positive numbers"):
        train_loader(folders, image_size=32, batch_size=8, workers=0, seed=0, epoch=0, rank=0, world_size=1,
                     source_weights=[1, 0])  # fmt: skip
    with pytest.raises(UsageError, match="balanced and source_weights"):
        train_loader(folders, image_size=32, batch_size=8, workers=0, seed=0, epoch=0, rank=0, world_size=1,
                     source_weights=[1, 1], balanced=True)  # fmt: skip


def test_source_weights_are_numbers_in_the_config():
    cfg = apply_overrides(TrainConfig(), {"source_weights": ["1", 0.5]}, "flags")
    assert cfg.source_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match="source_weights: expected float, got 'x'"):
        apply_overrides(TrainConfig(), {"source_weights": ["x"]}, "flags")


def test_a_merged_run_trains_in_the_validation_classes_and_records_its_maps(real, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, str(REPO / "lesionkit" / "train.py"), "--train", str(real["i17"]), str(real["i19"]),
         "--label-maps", "none", "isic2019_to_isic2017", "--source-weights", "1", "0.5",
         "--val", str(real["i17v"]), "--model", "customnet", "--image-size", "32", "--batch-size", "4",
         "--workers", "0", "--epochs", "1", "--max-steps-per-epoch", "2", "--output-dir", str(out),
         "--no-wandb", "--mixed-precision", "no"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    merge = labelmaps.merge(
        [real["i17"], real["i19"]], ["none", "isic2019_to_isic2017"], tasks.ISIC2017_CLASSES
    )
    _, counts, total = dataset_info([real["i17"], real["i19"]], merge=merge)
    assert f"train {total} samples" in res.stdout
    gt = real["gt19"].y
    mapped = f"nevus {sum(gt == 'NV')}, melanoma {sum(gt == 'MEL')}, seborrheic_keratosis {sum(gt == 'BKL')}"
    left_out = sum(~gt.isin(["NV", "MEL", "BKL"]))
    assert (
        f"lesionkit: label map isic2019_to_isic2017: {real['i19']} trains as {mapped}; "
        f"{left_out} sample(s) of AK, BCC, DF, SCC, VASC left out"
    ) in res.stdout.splitlines()
    info = json.loads((out / "best" / "info.json").read_text())
    assert info["classes"] == list(tasks.ISIC2017_CLASSES) and info["task"] == "isic2017"
    config = yaml.safe_load((out / "best" / "config.yaml").read_text())
    assert config["label_maps"] == ["none", "isic2019_to_isic2017"] and config["source_weights"] == [1.0, 0.5]
    record = json.loads((out / "run.json").read_text())["segments"][0]["data"]["train"]
    assert [d.get("label_map") for d in record] == [None, "isic2019_to_isic2017"]
    card = (out / "best" / "MODEL_CARD.md").read_text()
    assert "label map `isic2019_to_isic2017`" in card


@pytest.mark.slow
def test_cv_with_a_mapped_release_trains_on_it_whole_and_validates_on_the_held_out_fold_only(
    real, tmp_path, capfd
):
    """`cv --data 2019 --train 2020 --label-maps isic2020_to_isic2019`: each fold trains on the other folds of
    ISIC 2019 plus every mapped ISIC 2020 image, and is scored on its ISIC 2019 fold alone."""
    from lesionkit.cli import run_command

    data = tmp_path / "isic2019"
    shutil.copytree(real["i19"], data)
    assert run_command("split", [str(data), "--by", "lesion", "--folds", "3"]) == 0
    out = tmp_path / "cv"
    argv = ["--data", str(data), "--train", str(real["i20"]), "--label-maps", "isic2020_to_isic2019",
            "--folds", "0", "--output-dir", str(out), "--bootstrap", "100", "--model", "customnet",
            "--image-size", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1",
            "--max-steps-per-epoch", "2", "--no-wandb", "--mixed-precision", "no"]  # fmt: skip
    assert run_command("cv", argv) == 0
    fold_of = json.loads((data / "manifest.json").read_text())["split"]["fold_of"]
    to19 = labelmaps.load("isic2020_to_isic2019").classes
    slug = real["gt20"].diagnosis.str.lower().str.replace(r"[^0-9a-z]+", "_", regex=True).str.strip("_")
    trained = sum(f != 0 for f in fold_of.values()) + sum(to19[s] is not None for s in slug)
    log = capfd.readouterr().out
    assert f"train {trained} samples" in log
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert collections.Counter(oof["image_id"]) == collections.Counter(
        i for i, f in fold_of.items() if f == 0
    )
    config = yaml.safe_load((out / "fold-0" / "last" / "config.yaml").read_text())
    assert config["train"] == [str(data), str(real["i20"])]
    assert config["label_maps"] == ["none", "isic2020_to_isic2019"]
    # the model card counts the mapped release whole, in the classes it trained as, and fold 0 as validation
    card = json.loads((out / "fold-0" / "last" / "card.json").read_text())["training"]
    assert [d["location"] for d in card["train"]] == [str(data), str(real["i20"])]
    assert card["train"][1]["label_map"] == "isic2020_to_isic2019"
    assert card["train"][1]["num_samples"] == sum(to19[s] is not None for s in slug)
    assert [d["location"] for d in card["val"]] == [str(data)]
    assert card["val"][0]["num_samples"] == sum(f == 0 for f in fold_of.values())
