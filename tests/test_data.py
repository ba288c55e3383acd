"""The shard reader in one process: shapes, epoch length, coverage, balancing, errors."""

import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, make_shards

from lesionkit.data import eval_loader, train_loader
from lesionkit.errors import CorruptDataError, UsageError
from lesionkit.manifest import dataset_info, read_manifest

# torchvision 0.29 marks its JPEG decoder deprecated (in favour of TorchCodec); it is still the fastest here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)


def _ids(n):
    return {f"ISIC_{i:07d}" for i in range(n)}


def _label_of(key):  # make_shards labels round-robin by index
    return int(key[-7:]) % 3


def _halve(images):  # a worker-side batch transform (module level: picklable)
    return images.float() / 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, 60, 5)  # 5 shards of 12 samples, 32x40 images
    return folder


def test_train_batches_are_full_uint8_cover_the_data_and_reshuffle_each_epoch(shards):
    loader = train_loader(
        shards,
        image_size=32,
        batch_size=8,
        workers=2,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        shuffle_buffer=16,
    )
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader) == 8  # workers hold 24 + 36 samples: 3 + 5 batches
        for images, labels, keys, _ in batches:
            assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
            assert labels.dtype == torch.int64 and labels.tolist() == [_label_of(k) for k in keys]
        keys = [k for batch in batches for k in batch.keys]
        assert set(keys) == _ids(60) and len(keys) == 64  # 4 padding samples
        epochs.append(keys)
    assert epochs[0] != epochs[1]


def test_train_resizes_and_crops_to_the_training_size(shards):
    images = next(
        iter(
            train_loader(
                shards, image_size=20, batch_size=4, workers=0, seed=0, epoch=0, rank=0, world_size=1
            )
        )
    ).images
    assert images.shape == (4, 3, 20, 20)


def test_same_seed_and_epoch_give_the_same_stream_and_set_epoch_jumps(shards):
    def keys(loader):
        return [k for b in loader for k in b.keys]

    kw = {
        "image_size": 32,
        "batch_size": 8,
        "workers": 0,
        "seed": 3,
        "rank": 0,
        "world_size": 1,
        "shuffle_buffer": 16,
    }
    at3 = keys(train_loader(shards, epoch=3, **kw))
    assert keys(train_loader(shards, epoch=3, **kw)) == at3
    loader = train_loader(shards, epoch=0, **kw)
    first = keys(loader)
    loader.set_epoch(3)
    assert keys(loader) == at3 != first


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_batch_counts_and_together_cover_every_sample(tmp_path, world_size):
    make_shards(tmp_path, 70, 7)  # unequal shards (10 each) over 2 or 3 ranks: some ranks pad
    seen, lengths = [], []
    for rank in range(world_size):
        loader = train_loader(
            tmp_path,
            image_size=32,
            batch_size=4,
            workers=0,
            seed=1,
            epoch=2,
            rank=rank,
            world_size=world_size,
        )
        batches = list(loader)
        lengths += [len(loader), len(batches)]
        seen += [k for b in batches for k in b.keys]
    assert len(set(lengths)) == 1
    assert set(seen) == _ids(70)


def test_max_batches_caps_the_epoch_on_every_rank(shards):
    for rank in range(2):
        loader = train_loader(
            shards,
            image_size=32,
            batch_size=4,
            workers=0,
            seed=0,
            epoch=0,
            rank=rank,
            world_size=2,
            max_batches=3,
        )
        assert len(loader) == 3 == len(list(loader))


def test_batch_transform_runs_in_the_workers(shards):
    loader = train_loader(
        shards,
        image_size=32,
        batch_size=8,
        workers=2,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        batch_transform=_halve,
    )
    images = next(iter(loader)).images
    assert images.dtype == torch.float32 and images.max() <= 127.5


@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_reads_every_sample_exactly_once_with_workers(shards, world_size):
    keys, total_batches = Counter(), 0
    for rank in range(world_size):
        loader = eval_loader(shards, image_size=24, batch_size=5, workers=2, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        total_batches += len(batches)
        for images, labels, ks, _ in batches:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24)
            assert labels.tolist() == [_label_of(k) for k in ks]
            keys.update(ks)
    assert keys == Counter(_ids(60))


def test_balanced_mode_draws_classes_equally_or_by_weight(tmp_path):
    labels = [0] * 140 + [1] * 40 + [2] * 20  # 70/20/10 %, shuffled as `lesionkit pack` does
    random.Random(0).shuffle(labels)
    make_shards(tmp_path, 200, 4, size=16, labels=labels, seed=1)
    kw = {
        "image_size": 16,
        "batch_size": 16,
        "workers": 2,
        "seed": 0,
        "epoch": 0,
        "rank": 0,
        "world_size": 1,
        "balanced": True,
    }
    loader = train_loader(tmp_path, **kw)
    drawn = Counter(y for _ in range(2) for b in loader for y in b.labels.tolist())
    total = sum(drawn.values())  # 2 epochs x 13 batches x 16 = 416 draws: sd of a share ~0.023
    assert all(abs(drawn[c] / total - 1 / 3) < 0.1 for c in range(3)), drawn
    weighted = Counter(
        y
        for _, ls, _, _ in train_loader(tmp_path, **{**kw, "workers": 0, "class_weights": [1, 0, 3]})
        for y in ls.tolist()
    )
    assert weighted[1] == 0 and 2 < weighted[2] / weighted[0] < 4.5, weighted


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(tmp_path):
    make_shards(tmp_path, 12, 3)
    with pytest.raises(
        ValueError,
        match=r"3 shard\(s\).*2 process\(es\) x 2 loader worker\(s\) need at least 4"
        r".*--shard-size \(at most 3 for 12 samples\)",
    ):
        train_loader(tmp_path, image_size=32, batch_size=2, workers=2, seed=0, epoch=0, rank=0, world_size=2)


def test_missing_folder_manifest_or_wrong_version_name_the_path(tmp_path):
    with pytest.raises(UsageError, match="shard folder not found: .*nowhere"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(UsageError, match=r"manifest.json not found"):
        train_loader(tmp_path, image_size=32, batch_size=2, workers=0, seed=0, epoch=0, rank=0, world_size=1)
    make_shards(tmp_path / "v2", 4, 1)
    path = tmp_path / "v2" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 2}))
    with pytest.raises(ValueError, match=r"manifest.json: shard format_version 2 is not supported"):
        eval_loader(tmp_path / "v2", image_size=32, batch_size=2, workers=0, rank=0, world_size=1)


def test_dataset_info_sums_folders_and_rejects_different_classes(tmp_path):
    make_shards(tmp_path / "a", 6, 1)
    make_shards(tmp_path / "b", 3, 1, prefix="B_")
    assert dataset_info([tmp_path / "a", tmp_path / "b"]) == (CLASSES, dict.fromkeys(CLASSES, 3), 9)
    make_shards(tmp_path / "c", 2, 1, classes=["benign", "malignant"])
    with pytest.raises(ValueError, match=r"disagree on the classes: .*a has .*, .*c has"):
        dataset_info([tmp_path / "a", tmp_path / "c"])


def test_corrupt_sample_raises_naming_it_unless_skipped(tmp_path, caplog):
    make_shards(tmp_path, 16, 2, corrupt={5})
    kw = {"image_size": 32, "batch_size": 4, "workers": 0, "rank": 0, "world_size": 1}
    with pytest.raises(CorruptDataError, match=r"corrupt sample 'ISIC_0000005' in shard .*shard-000000.tar"):
        list(train_loader(tmp_path, seed=0, epoch=0, **kw))
    with pytest.raises(CorruptDataError, match=r"corrupt sample 'ISIC_0000005' in shard .*shard-000000.tar"):
        list(eval_loader(tmp_path, **kw))
    with caplog.at_level(logging.WARNING, logger="lesionkit.data"):
        loader = train_loader(tmp_path, seed=0, epoch=0, skip_corrupt=True, **kw)
        keys = [k for batch in loader for k in batch.keys]
    assert len(keys) == 4 * len(loader) == 16 and "ISIC_0000005" not in keys
    assert set(keys) == _ids(16) - {"ISIC_0000005"}
    assert "skipped corrupt sample 'ISIC_0000005'" in caplog.text


ISIC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "isic2017-256"
ISIC_VAL_CSV = ISIC / "ISIC-2017_Validation_Part3_GroundTruth.csv"


@pytest.fixture(scope="module")
def isic_val(tmp_path_factory):
    """The real ISIC 2017 validation split (150 images) packed at 32 px into 4 shards."""
    from lesionkit.pack import pack

    out = tmp_path_factory.mktemp("isic") / "val"
    pack(ISIC / "ISIC-2017_Validation_Data", ISIC_VAL_CSV, out, size=32, shard_size=40, workers=0)
    return out


def test_real_isic_validation_split_packed_then_read_back(isic_val):
    from lesionkit.ingest import read_labels

    csv = ISIC_VAL_CSV
    table, classes = read_labels(csv)
    truth = dict(zip(table["id"], table["label"]))
    assert dataset_info(isic_val) == (classes, {"nevus": 78, "melanoma": 30, "seborrheic_keratosis": 42}, 150)
    read = {}
    for rank in range(2):
        for images, labels, keys, _ in eval_loader(
            isic_val, image_size=32, batch_size=16, workers=2, rank=rank, world_size=2
        ):
            assert images.shape[1:] == (3, 32, 32) and images.float().std() > 10  # real pixels, not blank
            read.update(zip(keys, labels.tolist()))
    assert read == truth
    seen = {
        k
        for batch in train_loader(
            isic_val, image_size=28, batch_size=16, workers=2, seed=0, epoch=0, rank=0, world_size=1
        )
        for k in batch.keys
    }
    assert seen == set(truth)


def test_own_tar_reader_matches_webdataset_and_names_a_truncated_shard(shards, tmp_path):
    from lesionkit.data import _read, read_with_webdataset

    urls = sorted(str(p) for p in shards.glob("*.tar"))
    theirs = [{k: v for k, v in s.items() if k != "__local_path__"} for s in read_with_webdataset(urls)]
    assert list(_read(urls)) == theirs and len(theirs) == 60
    data = (shards / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDataError, match=r"shard .*cut.tar is truncated"):
        list(_read([str(tmp_path / "cut.tar")]))


def test_bench_loader_prints_shards_next_to_the_per_file_baseline(isic_val, tmp_path, capsys):
    from lesionkit.cli import main

    out = tmp_path / "bench.jsonl"
    assert (
        main(
            [
                "bench",
                "loader",
                str(isic_val),
                "--workers",
                "2",
                "--batch-size",
                "10",
                "--repeats",
                "1",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert record["bench"] == "loader" and record["params"]["num_samples"] == 150
    assert record["params"]["image_size"] == 32  # default: the size the shards were packed at
    assert set(record["cases"]) == {
        "shards",
        "shards over HTTP (loopback)",
        "shards, wds tar reader",
        "shards, no workers, 1 thread",
        "shards, decode on cpu",
        "files (seed)",
        "decode only, PIL (1 core)",
        "decode only, torchvision (1 core)",
    }
    assert record["cases"]["shards over HTTP (loopback)"]["items"] == 150
    # the decode limit: every image of the shards decoded once per repeat, its CPU ms beside the stream's
    limit = record["params"]["decode_limit_cpu_ms_per_image"]
    for k in ("PIL", "torchvision"):
        assert record["cases"][f"decode only, {k} (1 core)"]["items"] == 150
        assert limit[k] == record["cases"][f"decode only, {k} (1 core)"]["cpu_ms_per_item"] > 0
    params = record["params"]  # the CPU cost of decode + collate and the cores a GPU's rate would need
    assert (
        params["decode_collate_cpu_ms_per_image"]
        == record["cases"]["shards, no workers, 1 thread"]["cpu_ms_per_item"]
        > 0
    )
    assert params["loader_cores_needed"] == round(8000 * params["decode_collate_cpu_ms_per_image"] / 1e3, 1)
    assert record["cases"]["shards, decode on cpu"]["items"] == 150
    assert params["decode_device"] == "cpu" and params["device_decode_max_abs_diff"] == 0
    assert record["cases"]["files (seed)"]["ratio"] == 1.0
    assert record["cases"]["shards"]["items"] == 150 and record["cases"]["files (seed)"]["items"] == 150
    printed = capsys.readouterr().out
    assert "files (seed)" in printed and "decode limit on the same bytes, one core: PIL" in printed
    assert main(["bench", "loader", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("image_size", [32, 28])  # packed size (crop only), and a resize on the way
def test_decode_on_the_device_gives_the_workers_pixels(isic_val, image_size):
    """decode="device" (workers read bytes, `pixels` decodes the batch): on the CPU the very pixels, crops,
    labels and order of the worker-side decode, in training (random crops) and evaluation."""
    from lesionkit.data import Encoded, pixels

    kw = {"image_size": image_size, "batch_size": 16, "workers": 2, "rank": 0, "world_size": 1}
    for make in (
        lambda **k: train_loader(isic_val, seed=3, epoch=1, **kw, **k),
        lambda **k: eval_loader(isic_val, **kw, **k),
    ):
        theirs, ours = list(make()), list(make(decode="device"))
        assert len(ours) == len(theirs) > 0
        for a, b in zip(theirs, ours):
            assert isinstance(b.images, Encoded) and len(b.images) == len(a.images)
            assert b.keys == a.keys and torch.equal(b.labels, a.labels)
            assert torch.equal(pixels(b, "cpu"), a.images)


def test_decode_on_the_device_names_a_corrupt_sample(tmp_path):
    from lesionkit.data import pixels

    make_shards(tmp_path / "bytes", 16, 2, corrupt={5})  # not a JPEG at all: the worker's header check
    kw = {"image_size": 32, "batch_size": 4, "workers": 0, "rank": 0, "world_size": 1, "decode": "device"}
    with pytest.raises(CorruptDataError, match=r"corrupt sample 'ISIC_0000005' in shard .*shard-000000.tar"):
        list(train_loader(tmp_path / "bytes", seed=0, epoch=0, **kw))
    make_shards(tmp_path / "scan", 8, 1)  # a valid header over a truncated scan: only the decode finds it
    shard = tmp_path / "scan" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == "ISIC_0000002.jpg":
                data = data[: data.find(b"\xff\xda") + 14] + bytes(8)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    batches = list(eval_loader(tmp_path / "scan", **kw))
    assert pixels(batches[1], "cpu").shape == (4, 3, 32, 32)
    with pytest.raises(CorruptDataError, match=r"corrupt sample 'ISIC_0000002': JPEG decode on cpu failed"):
        pixels(batches[0], "cpu")
