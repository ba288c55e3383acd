"""`lesionkit download isic2017` against a local HTTP server (127.0.0.1) serving zips built here."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import zipfile
from pathlib import Path

import pytest

from lesionkit import cli
from lesionkit.download import PARTS, DownloadError, download_isic2017, fetch
from lesionkit.errors import UsageError

THUMBS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "isic2017-256"
VAL_IDS = ["ISIC_0001769", "ISIC_0001852", "ISIC_0001871", "ISIC_0003462"]


class Server(http.server.ThreadingHTTPServer):
    """Serves files from `root`, honours `Range: bytes=N-`, logs requests, can cut bodies short."""

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.requests, self.truncate = root, [], False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/2017/"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server: Server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = server.root / self.path.removeprefix("/2017/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 3] if server.truncate else body)
        self.close_connection = True

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Official-looking ISIC 2017 files for train and val, built from real thumbnails."""
    files = tmp_path / "served"
    files.mkdir()
    for part in ("train", "val"):
        zip_name, csv_name = PARTS[part]
        folder = zip_name.removesuffix(".zip")
        with zipfile.ZipFile(files / zip_name, "w", zipfile.ZIP_DEFLATED) as zf:
            for i in VAL_IDS:
                zf.write(THUMBS / "ISIC-2017_Validation_Data" / f"{i}.jpg", f"{folder}/{i}.jpg")
            zf.writestr(f"{folder}/{i}_superpixels.png", b"not a sample")
        (files / csv_name).write_text(
            "image_id,melanoma,seborrheic_keratosis\n"
            "ISIC_0001769,0.0,0.0\nISIC_0001852,0.0,0.0\n"
            "ISIC_0001871,1.0,0.0\nISIC_0003462,0.0,1.0\n"
        )
    srv = Server(files)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_unpacks_official_layout_then_packs(server, tmp_path, capsys):
    root = tmp_path / "isic"
    assert (
        cli.main(
            [
                "download",
                "isic2017",
                "--root",
                str(root),
                "--base-url",
                server.url,
                "--parts",
                "train,val",
                "--retries",
                "0",
            ]
        )
        == 0
    )
    for part in ("train", "val"):
        zip_name, csv_name = PARTS[part]
        images = root / zip_name.removesuffix(".zip")
        assert sorted(p.stem for p in images.glob("*.jpg")) == VAL_IDS
        assert (root / csv_name).read_bytes() == (server.root / csv_name).read_bytes()
        assert (root / zip_name).read_bytes() == (server.root / zip_name).read_bytes()
    hint = capsys.readouterr().out
    assert "lesionkit pack --images" in hint and "ISIC-2017_Training_Part3_GroundTruth.csv" in hint
    assert not [p for p in root.rglob("*") if p.name.endswith((".part", "-tmp"))]

    seen = len(server.requests)
    download_isic2017(root, ["train", "val"], base_url=server.url, retries=0)
    assert len(server.requests) == seen  # idempotent: nothing fetched again

    out = tmp_path / "shards"
    assert (
        cli.main(
            [
                "pack",
                "--images",
                str(root / "ISIC-2017_Training_Data"),
                "--labels",
                str(root / "ISIC-2017_Training_Part3_GroundTruth.csv"),
                "--out",
                str(out),
                "--workers",
                "0",
                "--size",
                "32",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"nevus": 2, "melanoma": 1, "seborrheic_keratosis": 1}


def test_partial_file_is_resumed_with_a_range_request(server, tmp_path):
    name = PARTS["train"][0]
    data = (server.root / name).read_bytes()
    dest = tmp_path / name
    dest.with_name(name + ".part").write_bytes(data[:1000])
    fetch(server.url + name, dest, sha256=hashlib.sha256(data).hexdigest(), retries=0)
    assert dest.read_bytes() == data
    assert server.requests == [(f"/2017/{name}", "bytes=1000-")]
    assert not dest.with_name(name + ".part").exists()


def test_complete_part_file_is_finished_without_refetching(server, tmp_path):
    name = PARTS["val"][1]
    data = (server.root / name).read_bytes()
    dest = tmp_path / name
    dest.with_name(name + ".part").write_bytes(data)
    fetch(server.url + name, dest, retries=0)
    assert dest.read_bytes() == data


def test_truncated_download_is_a_clear_error_and_resumable(server, tmp_path, capsys):
    server.truncate = True
    root = tmp_path / "isic"
    assert (
        cli.main(
            [
                "download",
                "isic2017",
                "--root",
                str(root),
                "--base-url",
                server.url,
                "--parts",
                "val",
                "--retries",
                "0",
            ]
        )
        == 1
    )
    message = capsys.readouterr().err
    assert "ISIC-2017_Validation_Part3_GroundTruth.csv" in message
    assert "connection ended at" in message and "run the command again to resume" in message
    assert not (root / PARTS["val"][1]).exists()
    server.truncate = False
    download_isic2017(root, ["val"], base_url=server.url, retries=0)  # the rerun completes it
    assert (root / PARTS["val"][1]).read_bytes() == (server.root / PARTS["val"][1]).read_bytes()


def test_checksum_mismatch_deletes_the_part_file(server, tmp_path):
    name = PARTS["val"][0]
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_isic2017(tmp_path, ["val"], base_url=server.url, retries=0, checksums={name: "0" * 64})
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()


def test_corrupt_zip_is_named_and_deleted(server, tmp_path):
    zip_path = server.root / PARTS["val"][0]
    data = bytearray(zip_path.read_bytes())
    data[200:260] = bytes(60)  # inside the first member's compressed data: CRC/inflate fails
    zip_path.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="corrupt zip") as failed:
        download_isic2017(tmp_path, ["val"], base_url=server.url, retries=0)
    assert PARTS["val"][0] in str(failed.value)
    assert not (tmp_path / PARTS["val"][0]).exists()
    assert not (tmp_path / "ISIC-2017_Validation_Data").exists()


def test_missing_file_and_unknown_part(server, tmp_path):
    with pytest.raises(DownloadError, match=r"ISIC-2017_Test_v2_Part3_GroundTruth\.csv: HTTP 404"):
        download_isic2017(tmp_path, ["test"], base_url=server.url, retries=0)
    with pytest.raises(UsageError, match="unknown part.*bogus"):
        download_isic2017(tmp_path, ["bogus"], base_url=server.url)
