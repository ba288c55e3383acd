"""De-duplication (`lesionkit dedup`, `lesionkit.dedup`): the hash stored at pack time, groups between shard
folders, the exclusion list the trainer honours and its warning, on real ISIC images.

Real pairs: isic2019-256 holds 204 isic2017-256 images under the same ISIC ids, stored at another size
(2017: 256x256 squashed; 2019: 256 px shorter side) and encoding. Hashing both folders whole and checking
every pair within 12 bits on the pixels (also mirrored and rotated) finds no other shared image, so the
id-matched pairs are the truth. Planted near-identical but different lesions: the pairs of different
2017/2019 images that the hash puts closest (`HARD_2017`/`HARD_2019`: every such pair within 4 bits, and
those within 8 bits nearest on the pixels), among them the same moles photographed twice
(`REPHOTOGRAPHED`); none may be grouped.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionkit import cli, dedup
from lesionkit.data import exclusion, train_loader
from lesionkit.manifest import dataset_info
from lesionkit.pack import pack

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
I17 = DATA / "isic2017-256"
I19 = DATA / "isic2019-256"
I17_TRAIN, I17_VAL = I17 / "ISIC-2017_Training_Data", I17 / "ISIC-2017_Validation_Data"
I19_IMAGES = I19 / "ISIC_2019_Training_Input"

HARD_2017 = [f"ISIC_{n}" for n in """
    0000028 0000121 0000151 0000225 0000384 0000449 0000536 0004337 0007241 0009885 0009912 0009929 0009998
    0010244 0010251 0010254 0010256 0010317 0010356 0010443 0010593 0010852 0011082 0011083 0011173 0011215
    0012175 0012205 0012303 0012680 0012685 0012721 0012735 0013032 0013086 0013087 0013257 0013287 0013311
    0014093 0014361 0014685 0014778 0014788 0014795 0014818 0014945 0015110 0015124""".split()]  # fmt: skip
HARD_2019 = [f"ISIC_{n}" for n in """
    0000164 0000165 0000171 0000173 0000223 0000536 0024352 0024642 0024704 0024781 0024876 0025000 0025040
    0025064 0025279 0025393 0025592 0025647 0025713 0026150 0026303 0026371 0026711 0026911 0027014 0027198
    0027250 0027443 0027501 0027685 0027756 0027797 0027847 0027848 0027940 0027993 0028010 0028109 0028963
    0029422 0029498 0029559 0029636 0029650 0029699 0030070 0030163 0030431 0030676 0030741 0030859 0031096
    0031247 0031293 0031731 0031933 0032195 0032228 0032405 0032541 0032691 0032824 0033018 0033152 0033229
    0033334 0033409 0033423 0033541 0033598 0033786 0034080 0034206""".split()]  # fmt: skip
# (2017, 2019): one mole photographed again (other framing, light, hairs), 2-4 hash bits apart
REPHOTOGRAPHED = [
    ("ISIC_0015124", "ISIC_0000171"),
    ("ISIC_0015110", "ISIC_0000173"),
    ("ISIC_0014795", "ISIC_0000164"),
    ("ISIC_0014788", "ISIC_0000165"),
]
# (2017, 2019): different lesions, the closest on the pixels of all candidate pairs
DIFFERENT = [
    ("ISIC_0012735", "ISIC_0031731"),
    ("ISIC_0010256", "ISIC_0030741"),
    ("ISIC_0000384", "ISIC_0026371"),
]


def image_2017(i: str) -> Image.Image:
    path = I17_TRAIN / f"{i}.jpg"
    return Image.open(path if path.exists() else I17_VAL / f"{i}.jpg").convert("RGB")


def image_2019(i: str) -> Image.Image:
    return Image.open(I19_IMAGES / f"{i}.jpg").convert("RGB")


def shared_ids() -> list[str]:
    return sorted({p.stem for p in I17_TRAIN.glob("*.jpg")} & {p.stem for p in I19_IMAGES.glob("*.jpg")})


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop(im: Image.Image, left=0.0, top=0.0, right=0.0, bottom=0.0) -> Image.Image:
    w, h = im.size
    return im.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


def centre_square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


LANCZOS = Image.Resampling.LANCZOS
PLANTED = {  # name -> a copy the de-duplication must find
    "q30": lambda im: jpeg(im, 30),
    "q60": lambda im: jpeg(im, 60),
    "half": lambda im: jpeg(im.resize((im.width // 2, im.height // 2), LANCZOS), 90),
    "double": lambda im: jpeg(im.resize((im.width * 2, im.height * 2), LANCZOS), 90),
    "squashed": lambda im: jpeg(im.resize((200, 200), LANCZOS), 90),  # aspect ratio not kept
    "crop2": lambda im: jpeg(crop(im, 0.02, 0.02, 0.02, 0.02), 90),  # 2 % off every side
    "left3": lambda im: jpeg(crop(im, left=0.03), 90),
    "corner2": lambda im: jpeg(crop(im, left=0.02, top=0.02), 75),
    "centre": lambda im: jpeg(centre_square(im), 90),  # HAM10000-style square centre crop
}
ORIGINALS = ["ISIC_0000013", "ISIC_0000199", "ISIC_0024310", "ISIC_0025001"]  # 341x256, 339x256, 2x 256x256


def test_planted_copies_match_and_near_identical_lesions_do_not():
    for i in ORIGINALS:
        original = image_2019(i)
        for name, make in PLANTED.items():
            match = dedup.compare_images(original, make(original))
            assert match.duplicate, (i, name, match)
            assert match.distance <= 6 and match.mad < 2.0, (i, name, match)
    for a, b in REPHOTOGRAPHED + DIFFERENT:
        match = dedup.compare_images(image_2017(a), image_2019(b))
        # candidates by their hashes, told apart only by the pixel check
        assert match.distance <= dedup.MAX_DISTANCE and not match.duplicate, (a, b, match)
        assert match.mad > 4.0, (a, b, match)


def test_views_and_hashes():
    square, wide = image_2019("ISIC_0024310"), image_2019("ISIC_0000013")
    assert len(dedup.views(square)) == 1 and [v.size for v in dedup.views(wide)] == [(341, 256), (256, 256)]
    hashes = dedup.image_hashes(wide)
    assert len(hashes) == 2 and all(len(h) == 16 for h in hashes)
    # the centre view of the wide image is the whole view of its centre square
    assert dedup.image_hashes(centre_square(wide)) == hashes[1:]


# --------------------------------------------------------------------------------- packed real data


def pick(df: pd.DataFrame, column: str, wanted, others: int, seed: int) -> pd.DataFrame:
    rest = df[~df[column].isin(set(wanted))]
    return pd.concat(
        [
            df[df[column].isin(set(wanted))],
            rest.iloc[np.random.default_rng(seed).permutation(len(rest))[:others]],
        ]
    )


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """isic2019 (TRAIN) against isic2017 training + validation, packed at 128 px: the 204 shared images, the
    hard negatives and 100 (30) other images of each folder."""
    root = tmp_path_factory.mktemp("dedup-real")
    shared = shared_ids()
    parts = {
        "i19": (I19_IMAGES, I19 / "ISIC_2019_Training_GroundTruth.csv", "image", shared + HARD_2019, 100),
        "i17": (
            I17_TRAIN,
            I17 / "ISIC-2017_Training_Part3_GroundTruth.csv",
            "image_id",
            shared + HARD_2017,
            100,
        ),
        "i17v": (I17_VAL, I17 / "ISIC-2017_Validation_Part3_GroundTruth.csv", "image_id", HARD_2017, 30),
    }
    out = {}
    for k, (name, (images, labels, column, wanted, others)) in enumerate(parts.items()):
        picked = pick(pd.read_csv(labels), column, wanted, others, seed=k)
        picked.to_csv(root / f"{name}.csv", index=False)
        out[name] = root / name
        pack(images, root / f"{name}.csv", out[name], size=128, shard_size=100, workers=0)
        out[f"{name}_ids"] = set(picked[column])
    out["shared"], out["root"] = shared, root
    return out


def read_csv(path_or_text) -> list[dict]:
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    return list(csv.DictReader(io.StringIO(text)))


def test_real_isic2017_images_in_isic2019_are_found_and_nothing_else(real, capsys):
    assert len(real["shared"]) == 204  # the data README says 253; these folders share 204 ids
    groups, excluded = real["root"] / "groups.csv", real["root"] / "exclude.txt"
    args = ["dedup", str(real["i19"]), "--against", str(real["i17"]), str(real["i17v"])]
    assert cli.main([*args, "--out", str(groups), "--exclude-out", str(excluded)]) == 0
    summary = capsys.readouterr().out
    rows = read_csv(groups)
    assert list(rows[0]) == list(dedup.CSV_COLUMNS)
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    pairs = {
        tuple((m["role"], Path(m["folder"]).name, m["id"]) for m in members) for members in by_group.values()
    }
    assert pairs == {
        (("train", "i19", i), ("against", "i17", i)) for i in real["shared"]
    }  # recall 204/204, 0 false
    # the two releases name the classes differently (melanoma/MEL, seborrheic_keratosis within BKL): all agree
    assert {r["labels_disagree"] for r in rows} == {"false"}
    assert {r["label"] for r in rows if r["role"] == "train"} <= {"MEL", "NV", "BKL"}
    assert dedup.read_exclusion(excluded) == set(real["shared"])
    assert "204 duplicate group(s): 204 training and 204 --against sample(s), 0 group(s)" in summary
    candidates = int(summary.split(" candidate pair(s)")[0].rsplit(" ", 1)[1])
    assert candidates > 204 + len(DIFFERENT + REPHOTOGRAPHED)  # the hash alone would have grouped far more

    # an existing output is not overwritten unasked; the same folder on both sides is refused
    assert cli.main([*args, "--out", str(groups)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli.main(["dedup", str(real["i19"]), "--against", str(real["i19"])]) == 2
    assert "both a TRAIN folder and an --against folder" in capsys.readouterr().err


def test_the_exclusion_list_is_honoured_and_the_trainer_warns(real):
    train, val = [str(real["i19"])], [str(real["i17"]), str(real["i17v"])]
    warning = dedup.leak_warning(train, val)
    assert warning.startswith(
        "warning: 204 validation sample(s) are duplicates of training images (204 group(s)"
    )
    assert f"`lesionkit dedup {real['i19']} --against {' '.join(val)} --exclude-out FILE`" in warning

    ids = frozenset(real["shared"])
    excluded = exclusion(train, ids)
    assert excluded.count == 204
    _, _, before = dataset_info(train)
    _, counts, after = dataset_info(train, exclude=excluded)
    assert before - after == 204 and sum(counts.values()) == after
    kw = {"image_size": 32, "batch_size": 8, "workers": 0, "seed": 0, "epoch": 0, "rank": 0, "world_size": 1}
    loader = train_loader(train, exclude=excluded, **kw)
    seen = {k for batch in loader for k in batch.keys}
    assert seen == real["i19_ids"] - ids


# ------------------------------------------------------------------------------- packed planted copies


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """`originals`: 4 real images + the 2017 photographs of 2 re-photographed moles; `copies`: every
    PLANTED copy of each original (one of them labelled differently) + the 2019 photographs of those moles."""
    root = tmp_path_factory.mktemp("dedup-planted")
    for name in ("originals", "copies"):
        (root / name).mkdir()
    labels = {"originals": {}, "copies": {}}
    for k, i in enumerate(ORIGINALS):
        image = image_2019(i)
        image.save(root / "originals" / f"{i}.jpg", quality=95)
        labels["originals"][i] = "nevus" if k % 2 else "melanoma"
        for name, make in PLANTED.items():
            make(image).save(root / "copies" / f"{i}-{name}.jpg", quality=95)
            labels["copies"][f"{i}-{name}"] = labels["originals"][i]
    labels["copies"][f"{ORIGINALS[0]}-q60"] = "nevus"  # a copy whose label disagrees with its original's
    for a, b in REPHOTOGRAPHED[:2]:
        image_2017(a).save(root / "originals" / f"{a}.jpg", quality=95)
        image_2019(b).save(root / "copies" / f"{b}.jpg", quality=95)
        labels["originals"][a] = labels["copies"][b] = "melanoma"
    out = {}
    for name, rows in labels.items():
        (root / f"{name}.csv").write_text("image_id,label\n" + "".join(f"{i},{y}\n" for i, y in rows.items()))
        out[name] = root / f"{name}-shards"
        pack(root / name, root / f"{name}.csv", out[name], size=128, shard_size=8, workers=0)
    out["root"] = root
    return out


def test_pack_stores_the_hashes_in_the_samples_and_the_manifest(planted):
    manifest = json.loads((planted["originals"] / "manifest.json").read_text())
    assert manifest["phash"]["method"] == dedup.PHASH_METHOD
    stored = manifest["phash"]["of"]
    assert stored[ORIGINALS[0]] == " ".join(dedup.image_hashes(image_2019(ORIGINALS[0])))  # 341x256: 2 views
    assert len(stored[ORIGINALS[2]].split()) == 1  # square: one view
    from lesionkit.data import sample_records

    records = {r["id"]: r for _, r in sample_records(planted["originals"])}
    assert {i: " ".join(r["phash"]) for i, r in records.items()} == stored


def expected_planted_groups() -> set:
    return {(("train", i), *(("against", f"{i}-{name}") for name in sorted(PLANTED))) for i in ORIGINALS}


def groups_of(rows: list[dict]) -> set:
    by_group: dict[str, list] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append((r["role"], r["id"]))
    return {(members[0], *sorted(members[1:])) for members in by_group.values()}


def test_dedup_groups_planted_copies_with_their_originals(planted, capsys):
    assert cli.main(["dedup", str(planted["originals"]), "--against", str(planted["copies"])]) == 0
    out = capsys.readouterr()
    rows = read_csv(out.out)  # no --out: the CSV on standard output, the summary on standard error
    assert groups_of(rows) == expected_planted_groups()
    disagree = {r["group"] for r in rows if r["labels_disagree"] == "true"}
    assert {r["id"] for r in rows if r["group"] in disagree and r["role"] == "train"} == {ORIGINALS[0]}
    assert "4 duplicate group(s): 4 training and 36 --against sample(s), 1 group(s)" in out.err


def test_the_trainer_check_leaves_out_the_excluded_samples(planted):
    train, val = [str(planted["copies"])], [str(planted["originals"])]
    assert dedup.leak_warning(train, val).startswith("warning: 4 validation sample(s) are duplicates")
    copies = {f"{i}-{name}" for i in ORIGINALS for name in PLANTED}
    assert dedup.leak_warning(train, val, exclude=frozenset(copies)) is None  # nothing left to warn about
    some = frozenset(c for c in copies if not c.startswith(ORIGINALS[0]))
    assert dedup.leak_warning(train, val, exclude=some).startswith("warning: 1 validation sample(s)")


def test_shards_packed_without_hashes_get_them_computed(planted, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(planted["originals"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["phash"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["dedup", str(old), "--against", str(planted["copies"])]) == 0
    out = capsys.readouterr()
    assert groups_of(read_csv(out.out)) == expected_planted_groups()
    assert f"note: {old} has no perceptual hashes in its manifest" in out.err
    # the trainer does not hash whole datasets at start-up: it says why it skips its check
    assert "no perceptual hashes" in dedup.leak_warning([str(old)], [str(planted["copies"])])


def test_dedup_usage_errors(planted, capsys):
    copies = str(planted["copies"])
    for argv, says in (
        (["dedup", copies], "--against DIR"),
        (["dedup", copies, "--fold", "0"], "has no folds"),
        (["dedup", copies, "--against", copies, "--fold", "0"], "drop --against"),
        (["dedup", copies, "--against", str(planted["root"] / "nope")], "shard folder not found"),
        (["dedup", copies, "--against", str(planted["originals"]), "--max-distance", "65"], "--max-distance"),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lesionkit dedup: error: ") and says in err and err.count("\n") == 1, err


def test_training_leaves_out_the_list_and_warns_of_the_rest(planted, tmp_path):
    """One tiny epoch: the start says how many samples `--exclude` left out, and warns of the validation
    images still duplicated in the training data."""
    import os
    import subprocess
    import sys

    listed = [f"{ORIGINALS[0]}-{name}" for name in PLANTED]
    (tmp_path / "exclude.txt").write_text("# the copies of one original\n" + "\n".join(listed) + "\n")
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, str(repo / "lesionkit" / "train.py"), "--train", str(planted["copies"]),
         "--val", str(planted["originals"]), "--exclude", str(tmp_path / "exclude.txt"), "--output-dir",
         str(tmp_path / "run"), "--model", "customnet", "--image-size", "32", "--batch-size", "4",
         "--workers", "0", "--epochs", "1", "--max-steps-per-epoch", "1", "--no-wandb",
         "--mixed-precision", "no"],
        capture_output=True, text=True, timeout=240, check=False, cwd=repo,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert f"lesionkit: excluding 9 training sample(s) listed in {tmp_path / 'exclude.txt'}" in lines
    warning = [line for line in lines if "are duplicates of training images" in line]
    assert len(warning) == 1 and warning[0].startswith(
        "lesionkit: warning: 3 validation sample(s) are duplicates of training images (3 group(s)"
    ), warning
    assert "train 29 samples" in res.stdout  # 38 - 9


def test_dedup_fold_against_the_other_folds(planted, tmp_path, capsys):
    from lesionkit.splits import assign_folds

    data = tmp_path / "copies"
    shutil.copytree(planted["copies"], data)
    fold_of = assign_folds(data, k=2, by="none", seed=0)["fold_of"]
    assert cli.main(["dedup", str(data), "--fold", "0"]) == 0
    rows = read_csv(capsys.readouterr().out)
    assert rows and all(fold_of[r["id"]] == (0 if r["role"] == "against" else 1) for r in rows)
    # every copy of one original in fold 0 is grouped with the copies of that original in fold 1
    for original in ORIGINALS:
        mine = {i for i in fold_of if i.startswith(original)}
        grouped = {r["id"] for r in rows if r["id"].startswith(original)}
        assert grouped == (mine if len({fold_of[i] for i in mine}) == 2 else set())
