"""One test per bad input: the error names the culprit, the exit is non-zero, no output folder appears."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionkit import cli

HEADER = "image_id,melanoma,seborrheic_keratosis\n"


def make_images(folder: Path, ids) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (24, 18), (180, 100, 80)).save(folder / f"{i}.jpg")


def noise_jpeg(path: Path) -> bytes:
    """A JPEG with real scan data (noise): cutting it short leaves the header valid, the scan truncated."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path.read_bytes()


def run_pack(tmp_path: Path, csv_text: str, *extra: str) -> tuple[Path, list[str]]:
    (tmp_path / "gt.csv").write_text(csv_text)
    out = tmp_path / "out"
    args = [
        "pack",
        "--images",
        str(tmp_path / "img"),
        "--labels",
        str(tmp_path / "gt.csv"),
        "--out",
        str(out),
        "--size",
        "16",
        "--workers",
        "0",
        *extra,
    ]
    return out, args


def expect_failure(tmp_path: Path, csv_text: str, *fragments: str, workers: int = 0) -> str:
    out, args = run_pack(tmp_path, csv_text, "--workers", str(workers))
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert cli.main(args) == 2
    message = err.getvalue()
    assert message.startswith("lesionkit pack: error:")
    for fragment in fragments:
        assert fragment in message
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]  # no temp left behind
    return message


def test_csv_id_without_image_file(tmp_path):
    make_images(tmp_path / "img", ["a", "b"])
    expect_failure(tmp_path, HEADER + "a,0,0\nb,1,0\nghost,0,1\n", "ghost", "no image file")


def test_many_missing_ids_are_listed_then_counted(tmp_path):
    make_images(tmp_path / "img", ["a"])
    rows = "".join(f"m{i:02d},0,0\n" for i in range(14))
    message = expect_failure(tmp_path, HEADER + "a,0,0\n" + rows, "m00", "m09", "... and 4 more")
    assert "m10" not in message


def test_image_not_in_csv_is_only_a_warning(tmp_path, caplog):
    make_images(tmp_path / "img", ["a", "b", "stray"])
    out, args = run_pack(tmp_path, HEADER + "a,0,0\nb,0,1\n")
    assert cli.main(args) == 0
    assert "stray" in caplog.text and "not in" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 2


def test_truncated_jpeg_aborts_naming_the_file(tmp_path):
    make_images(tmp_path / "img", ["a", "b"])
    data = noise_jpeg(tmp_path / "img" / "broken.jpg")
    (tmp_path / "img" / "broken.jpg").write_bytes(data[: len(data) // 2])
    expect_failure(
        tmp_path, HEADER + "a,0,0\nbroken,1,0\nb,0,0\n", "broken", "broken.jpg", "cannot decode", workers=2
    )  # the error comes back from a worker process


def test_file_that_is_not_an_image(tmp_path):
    make_images(tmp_path / "img", ["a"])
    (tmp_path / "img" / "text.jpg").write_text("not a jpeg at all")
    expect_failure(tmp_path, HEADER + "a,0,0\ntext,0,0\n", "text.jpg", "unreadable image")


def test_duplicate_ids(tmp_path):
    make_images(tmp_path / "img", ["a", "b"])
    expect_failure(tmp_path, HEADER + "a,0,0\nb,1,0\na,0,1\n", "duplicate id", "a")


@pytest.mark.parametrize(
    "row, shown",
    [
        ("a,0.5,0", "melanoma='0.5'"),
        ("a,yes,0", "melanoma='yes'"),
        ("a,0,", "seborrheic_keratosis=''"),
        ("a,2,0", "melanoma='2'"),
    ],
)
def test_label_values_other_than_0_1(tmp_path, row, shown):
    make_images(tmp_path / "img", ["a", "b"])
    expect_failure(tmp_path, HEADER + row + "\nb,0,0\n", "label values other than 0/1", shown, "a")


def test_more_than_one_positive_class(tmp_path):
    make_images(tmp_path / "img", ["a", "b"])
    expect_failure(
        tmp_path,
        HEADER + "a,0,0\nb,1.0,1.0\n",
        "more than one positive class",
        "melanoma+seborrheic_keratosis",
        "b",
    )


def test_onehot_row_without_positive_class(tmp_path):
    make_images(tmp_path / "img", ["a", "b"])
    expect_failure(tmp_path, "image,MEL,NV,BCC\na,0,1,0\nb,0,0,0\n", "no positive class", "b")


@pytest.mark.parametrize(
    "csv_text, fragments",
    [
        ("image_id,melanoma\na,0\n", ["missing column(s): seborrheic_keratosis"]),
        ("name,melanoma,seborrheic_keratosis\na,0,0\n", ["missing id column", "image_id", "name"]),
        ("image_id\na\n", ["missing label columns"]),
    ],
)
def test_missing_columns(tmp_path, csv_text, fragments):
    make_images(tmp_path / "img", ["a"])
    expect_failure(tmp_path, csv_text, *fragments)


@pytest.mark.parametrize("csv_text, fragment", [("", "empty labels CSV"), (HEADER, "no rows")])
def test_empty_csv(tmp_path, csv_text, fragment):
    make_images(tmp_path / "img", ["a"])
    expect_failure(tmp_path, csv_text, "gt.csv", fragment)


def test_id_with_a_dot_would_break_tar_keys(tmp_path):
    make_images(tmp_path / "img", ["a"])
    Image.new("RGB", (20, 20)).save(tmp_path / "img" / "b.v2.jpg")
    expect_failure(tmp_path, HEADER + "a,0,0\nb.v2,0,0\n", "b.v2", "breaks tar member names")


def test_skip_bad_packs_the_rest_and_lists_the_bad(tmp_path):
    make_images(tmp_path / "img", ["good1", "good2", "dup", "two", "half"])
    data = noise_jpeg(tmp_path / "img" / "broken.jpg")
    (tmp_path / "img" / "broken.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "img" / "text.jpg").write_text("nope")
    csv_text = HEADER + (
        "good1,0,0\ngood2,1,0\ndup,0,0\ndup,0,1\ntwo,1,1\nhalf,0.5,0\nghost,0,0\nbroken,0,0\ntext,0,0\n"
    )
    out, args = run_pack(tmp_path, csv_text, "--skip-bad")
    assert cli.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["counts"]["melanoma"] == 1
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"dup", "two", "half", "ghost", "broken", "text"}
    assert "duplicate" in reasons["dup"] and "more than one positive" in reasons["two"]
    assert "other than 0/1" in reasons["half"] and "no image file" in reasons["ghost"]
    assert "cannot decode" in reasons["broken"] and "unreadable" in reasons["text"]


def test_cli_process_exit_code_and_message(tmp_path):
    """The real command: non-zero exit, the culprit on stderr, no traceback, no output folder."""
    make_images(tmp_path / "img", ["a"])
    out, args = run_pack(tmp_path, HEADER + "a,0,0\nISIC_missing,1,0\n")
    done = subprocess.run(
        [sys.executable, "-m", "lesionkit.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode != 0
    assert "ISIC_missing" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
