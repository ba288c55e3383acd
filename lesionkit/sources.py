"""Where shard bytes come from: a location is a shard folder, and shards are read front to back as streams,
never seeked, so the tar reader works unchanged on any byte stream.

Locations: a local folder; `http(s)://host/folder/`, `s3://bucket/folder/`, `gs://bucket/folder/` (any
fsspec URL: s3fs/gcsfs do the object stores, credentials and endpoints from their usual environment, e.g.
`AWS_ENDPOINT_URL_S3` for an S3-compatible store); `pipe:COMMAND {shard}`, a shell command writing the
file named by `{shard}` to stdout (an object-store CLI). `open_stream` and `read_bytes` are the only places
that touch the bytes' origin.

A remote shard's manifest entry is untrusted input: `join` refuses names with `/`, `..` or a scheme before
anything is fetched or cached, so a manifest can neither point outside its folder nor smuggle in a `pipe:`
command (those come only from the user's own flags). Remote reads retry dropped connections with
exponential backoff, and a remote shard is checked against the manifest's byte count and sha256 once it
has been read to its end; with a cache folder (`Fetch.cache_dir`) a shard is downloaded once, kept only
when it matches, and fetched again when it does not.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lesionkit.atomic import writing
from lesionkit.errors import CorruptDataError, RunError, UsageError

PIPE = "pipe:"
SHARD = "{shard}"  # where a pipe: command takes the file name
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetch:
    """How remote shards are fetched: `retries` after a dropped or refused connection (waiting
    `backoff_s` x 2^attempt, at most 30 s), an optional `cache_dir` of verified downloads, and the socket
    `timeout_s` after which a stalled HTTP read counts as dropped."""

    cache_dir: str | None = None
    retries: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 60.0


class Address(str):
    """The address of one shard, carrying what its manifest says (`name`, `size` in bytes, `sha256`) and
    how to fetch it. A str, so the shard plan, dict keys and the samples' `__url__` treat it as the URL."""

    name: str
    size: int | None
    sha256: str | None
    fetch: Fetch

    def __new__(cls, url: str, name: str = "", size: int | None = None, sha256=None, fetch=None):
        self = super().__new__(cls, url)
        self.name, self.size, self.sha256, self.fetch = name, size, sha256, fetch or Fetch()
        return self

    def __reduce__(self):  # loader workers started with spawn get the attributes too
        return Address, (str(self), self.name, self.size, self.sha256, self.fetch)


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return "://" in text or text.startswith(PIPE)


def check_name(name, where: str) -> str:
    """A manifest's shard name, refused unless it is a plain file name inside its folder."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise UsageError(
            f"{where}: shard name {name!r} refused: a name with '/', '..' or a scheme would read or "
            "write outside the shard folder (an untrusted manifest?)"
        )
    return name


def join(location: str | Path, name: str) -> str:
    """The address of file `name` inside shard folder `location`."""
    check_name(name, str(location))
    text = str(location)
    if text.startswith(PIPE):
        if SHARD not in text:
            raise UsageError(
                f"{text}: a pipe: location names the file with {SHARD}, e.g. 'pipe:cat /data/{SHARD}'"
            )
        return text.replace(SHARD, name)
    if "://" in text:
        return text.rstrip("/") + "/" + name
    return str(Path(location) / name)


def shard(location: str | Path, record: dict, fetch: Fetch | None = None) -> Address:
    """The `Address` of a shard listed in `location`'s manifest (`record` = its manifest entry)."""
    sha = record.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
        raise UsageError(
            f"{location}: shard {record['name']!r} has a malformed sha256 {sha!r} in its manifest"
        )
    size = record.get("bytes")
    return Address(join(location, record["name"]), record["name"], size, sha, fetch)


def display_name(location: str | Path) -> str:
    """The folder's own name ('val' for `s3://b/isic/val/` or `pipe:cat /data/val/{shard}`)."""
    text = str(location)
    if text.startswith(PIPE):
        text = next((word for word in text.split() if SHARD in word), text).replace(SHARD, "")
    return Path(text.rstrip("/").split("://", 1)[-1]).name or "data"


def exists(url: str) -> bool:
    return not is_remote(url) and Path(url).is_file()


def open_stream(url: str) -> BinaryIO:
    """A binary stream over one shard, read front to back. Remote shards are checked against the manifest
    when the stream ends without an error (`with` block), or downloaded into the cache first."""
    if not is_remote(url):
        return open(url, "rb")
    address = url if isinstance(url, Address) else Address(url)
    if address.fetch.cache_dir:
        return open(_cached(address), "rb")
    return _Checked(address)


def read_bytes(url: str, fetch: Fetch | None = None) -> bytes:
    if not is_remote(url):
        return Path(url).read_bytes()
    with _Checked(Address(url, fetch=fetch)) as f:
        return f.read()


# ------------------------------------------------------------------------------------------ remote reads


def _filesystem(url: str, fetch: Fetch):
    import fsspec

    kwargs = {}
    if url.startswith(("http://", "https://")):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=fetch.timeout_s, sock_read=fetch.timeout_s)
        kwargs = {"client_kwargs": {"timeout": timeout}}
    try:
        return fsspec.core.url_to_fs(url, **kwargs)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its library (s3fs, gcsfs) missing
        raise UsageError(f"{url}: cannot read this location ({exc})") from None


class _Pipe(io.RawIOBase):
    """stdout of a shell command; ending with a non-zero status is an error naming the command."""

    def __init__(self, command: str):
        self.command = command
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._proc.stdout.readinto(b)
        if n == 0 and self._proc.wait() != 0:
            self._stderr.seek(0)
            said = self._stderr.read()[-500:].decode(errors="replace").strip()
            raise OSError(f"`{self.command}` exited with status {self._proc.returncode}: {said}")
        return n

    def close(self) -> None:
        if self._proc.poll() is None:  # stopped early (end of the tar, or an error): stop the command
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()
        super().close()


def _open(address: Address, offset: int):
    """A fresh binary stream over `address` positioned at `offset`. HTTP is one streamed GET per open (no
    HEAD, no range requests: any static file server works); resuming re-reads the prefix, which only a
    retry pays."""
    if address.startswith(PIPE):
        f = _Pipe(address[len(PIPE) :])
    else:
        fs, path = _filesystem(address, address.fetch)
        if address.startswith(("http://", "https://")):
            # a size (any, when unknown) keeps fsspec from a HEAD request first, whose failure it reports as
            # not-found: a refused connection would read as a 404 and never be retried
            f = fs.open(path, "rb", block_size=0, size=address.size or -1)
        else:
            f = fs.open(path, "rb", block_size=8 * _CHUNK, cache_type="readahead")
            if offset:
                f.seek(offset)
                return f
    left = offset
    while left:
        skipped = len(f.read(min(left, _CHUNK)))
        if not skipped:
            raise OSError(f"the stream ended before byte {offset} on reopening")
        left -= skipped
    return f


def _retryable(exc: BaseException) -> bool:
    """Dropped, refused or timed-out connections and server errors are retried; a missing object, a
    refused permission or any other 4xx answer is final."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (OSError, EOFError, TimeoutError)):
        return True
    try:
        import aiohttp

        return isinstance(exc, aiohttp.ClientError)
    except ImportError:
        return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not found (HTTP 404 / no such object)"
    if isinstance(exc, PermissionError):
        return "access denied"
    return str(exc).strip() or type(exc).__name__


class _Remote(io.RawIOBase):
    """The bytes of one remote file, resuming after a dropped connection at the byte where it broke
    (`fetch.retries` times, with backoff), hashing what passes so the end can be checked. Written here
    because neither fsspec's HTTP file nor webdataset's `gopen` (curl) resumes a stream that broke."""

    def __init__(self, address: Address):
        self.address, self.fetch = address, address.fetch
        self.pos, self.digest, self._f = 0, hashlib.sha256(), None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        attempt = 0
        while True:
            try:
                if self._f is None:
                    self._f = _open(self.address, self.pos)
                n = self._f.readinto(b)
                break
            except Exception as exc:
                self._drop()
                if isinstance(exc, UsageError):  # the location itself is wrong (unknown scheme, no s3fs)
                    raise
                if not _retryable(exc):
                    raise RunError(f"{self.address}: {_reason(exc)}") from None
                if attempt >= self.fetch.retries:
                    raise RunError(
                        f"{self.address}: {_reason(exc)} (gave up after {attempt + 1} attempts)"
                    ) from None
                wait = min(self.fetch.backoff_s * 2**attempt, 30.0)
                attempt += 1
                log.warning(
                    "%s: %s at byte %d; retry %d/%d in %.1f s",
                    self.address,
                    _reason(exc),
                    self.pos,
                    attempt,
                    self.fetch.retries,
                    wait,
                )
                time.sleep(wait)
        self.digest.update(memoryview(b)[:n])
        self.pos += n
        return n

    def problem(self) -> str | None:
        """What differs from the manifest once the stream is read to its end (None: it matches)."""
        size, sha = self.address.size, self.address.sha256
        if size is not None and self.pos != size:
            return f"{self.pos} bytes, the manifest says {size}"
        if sha is not None and self.digest.hexdigest() != sha:
            return f"sha256 {self.digest.hexdigest()[:16]}... differs from the manifest's {sha[:16]}..."
        return None

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # closing a broken connection may fail again; it is being replaced
                pass
            self._f = None

    def close(self) -> None:
        self._drop()
        super().close()


class _Checked(io.BufferedReader):
    """A buffered remote stream that, when its `with` block ends without an error, reads the rest (a
    tar's end-of-archive padding) and raises if bytes or sha256 differ from the manifest."""

    def __init__(self, address: Address):
        self.raw_stream = _Remote(address)
        super().__init__(self.raw_stream, buffer_size=_CHUNK)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                while self.read(_CHUNK):
                    pass
                problem = self.raw_stream.problem()
                if problem:
                    raise CorruptDataError(
                        f"shard {self.raw_stream.address} is corrupt: {problem} (changed at the source or "
                        "in transit; `--cache-dir` keeps verified copies and fetches bad ones again)"
                    )
        finally:
            self.close()


def _cached(address: Address) -> Path:
    """The verified local copy of a remote shard, downloaded now if the cache lacks it. A download whose
    bytes or sha256 differ from the manifest is discarded and fetched again; it never enters the cache."""
    if address.sha256 is None or address.size is None:
        raise UsageError(f"{address}: --cache-dir needs the manifest's sha256 and bytes of every shard")
    target = Path(address.fetch.cache_dir) / f"{address.sha256}-{address.name}"
    if target.is_file() and target.stat().st_size == address.size:
        return target
    fetch, attempt = address.fetch, 0
    while True:
        stream = _Remote(address)
        try:
            with writing(target) as out:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
                problem = stream.problem()
                if problem:
                    raise CorruptDataError(f"{problem}")
            return target
        except CorruptDataError as exc:
            if attempt >= fetch.retries:
                raise CorruptDataError(
                    f"shard {address}: every download was corrupt ({exc}, {attempt + 1} tries); refused, "
                    f"nothing cached in {fetch.cache_dir}"
                ) from None
            log.warning("%s: corrupt download (%s); fetching it again", address, exc)
            time.sleep(min(fetch.backoff_s * 2**attempt, 30.0))
            attempt += 1
        finally:
            stream.close()
