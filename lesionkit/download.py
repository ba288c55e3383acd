"""Fetch the official ISIC 2017 archives and unpack them in the official layout.

Meant to be run once on a cluster login node. Every step is resumable and idempotent:
- a file is downloaded to `<name>.part` and, if interrupted, resumed with an HTTP Range request;
- it gets its final name only after its size (Content-Length) and, when known, sha256 check out;
- a zip is extracted to a temp folder, moved into place, and marked `.<zip>.unpacked`; a rerun
  skips whatever is done.
"""

from __future__ import annotations

import http.client
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from lesionkit.errors import RunError, UsageError
from lesionkit.manifest import sha256_file

BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2017/"
PARTS: dict[str, tuple[str, str]] = {
    "train": ("ISIC-2017_Training_Data.zip", "ISIC-2017_Training_Part3_GroundTruth.csv"),
    "val": ("ISIC-2017_Validation_Data.zip", "ISIC-2017_Validation_Part3_GroundTruth.csv"),
    "test": ("ISIC-2017_Test_v2_Data.zip", "ISIC-2017_Test_v2_Part3_GroundTruth.csv"),
}
# Known sha256 per file name; files not listed are checked by size (Content-Length) only.
CHECKSUMS: dict[str, str] = {}
BLOCK = 1 << 20


class DownloadError(RunError):
    """A failed or corrupt download; the message names the file and says what to do."""


class _Resumable(DownloadError):
    """A transfer that stopped early; trying again continues it."""


def _total_from_content_range(value: str | None) -> int | None:
    """`bytes 100-199/1234` or `bytes */1234` -> 1234."""
    match = re.search(r"/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of `url` to `part` (Range from its current size); raise if the body falls short."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        total = _total_from_content_range(e.headers.get("Content-Range"))
        if e.code == 416 and total == offset:
            return  # the .part already holds the whole file
        if e.code == 416:
            part.unlink()  # .part is longer than the file: start afresh
            raise _Resumable(f"{url}: partial file {part} was longer than the file; deleted it") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    with response:
        if offset and response.status == 206:
            total = _total_from_content_range(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the server ignored the Range header, so start from the beginning
            length = response.headers.get("Content-Length")
            total, offset, mode = (int(length) if length else None), 0, "wb"
        from tqdm import tqdm

        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            for block in iter(lambda: response.read(BLOCK), b""):
                f.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Resumable(
            f"{url}: connection ended at {size} of {total} bytes; run the command again to resume from {part}"
        )


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = False,
) -> Path:
    """Download `url` to `dest` (skipped if dest exists), resuming `dest.part`; checks size and sha256.

    Dropped connections are resumed up to `retries` times; HTTP errors (404, 403) fail at once.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, progress)
            break
        except _Resumable as e:
            failure = e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            failure = DownloadError(f"{url}: {e}; run the command again to resume")
        if attempt == retries:
            raise failure
        time.sleep(min(2**attempt, 30))
    if sha256 is not None and sha256_file(part) != sha256:
        part.unlink()
        raise DownloadError(f"{url}: sha256 mismatch (corrupt download); deleted {part}, run again")
    part.rename(dest)
    return dest


def unpack(archive: str | Path, root: str | Path) -> None:
    """Extract a zip into root (its top-level folders land in root), once; a corrupt zip is deleted."""
    archive, root = Path(archive), Path(root)
    marker = root / f".{archive.name}.unpacked"
    if marker.exists():
        return
    tmp = root / f".{archive.stem}.unpack-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX/")]
            zf.extractall(tmp, members)  # CRC checked while reading: a corrupt member raises
        for entry in sorted(tmp.iterdir()):
            target = root / entry.name
            if target.exists():  # left by an earlier interrupted unpack (no marker was written)
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            entry.rename(target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{archive}: corrupt zip ({e}); deleted it, run the command again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker.touch()


def download_isic2017(
    root: str | Path,
    parts=("train", "val", "test"),
    base_url: str = BASE_URL,
    checksums: dict[str, str] | None = None,
    retries: int = 3,
    remove_zips: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Path]]:
    """Fetch + unpack the chosen parts; return {part: {"images": folder, "labels": csv}}."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise UsageError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    checksums = CHECKSUMS if checksums is None else checksums
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    layout = {}
    for part in parts:
        zip_name, csv_name = PARTS[part]
        for name in (csv_name, zip_name):
            if name == zip_name and (root / f".{zip_name}.unpacked").exists():
                continue
            fetch(base_url + name, root / name, checksums.get(name), retries=retries, progress=progress)
        unpack(root / zip_name, root)
        if remove_zips:
            (root / zip_name).unlink(missing_ok=True)
        layout[part] = {"images": root / zip_name.removesuffix(".zip"), "labels": root / csv_name}
    return layout
