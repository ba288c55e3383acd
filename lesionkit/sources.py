"""Where shard bytes come from: a location is a shard folder (a local path today) and shards are read
front to back as streams, never seeked, so the tar reader works unchanged on any byte stream.

This is the seam for shards that are not local files (an `http(s)://` folder, `s3://`, the output of a
`pipe:` command): `open_stream` and `read_bytes` are the only places that touch the bytes' origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from lesionkit.errors import UsageError


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return "://" in text or text.startswith("pipe:")


def join(location: str | Path, name: str) -> str:
    """The address of file `name` inside shard folder `location`."""
    return str(Path(location) / name)


def _local(url: str) -> Path:
    if is_remote(url):
        raise UsageError(
            f"{url}: remote shard locations are not supported by this lesionkit; copy the shard "
            "folder to local or shared disk"
        )
    return Path(url)


def open_stream(url: str) -> BinaryIO:
    """A binary stream over one shard, read front to back."""
    return open(_local(url), "rb")


def read_bytes(url: str) -> bytes:
    return _local(url).read_bytes()


def exists(url: str) -> bool:
    return not is_remote(url) and Path(url).is_file()
