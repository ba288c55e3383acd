"""Write files and folders so that readers (and crashes) only ever see the old or the complete new
version: build beside the target, flush it to disk, then rename into place (and flush the rename),
so neither a crash nor a power cut leaves a name pointing at half-written bytes.

Every command that writes results goes through here: `write_bytes` / `write_text` / `write_json` for
files, `replacing` for a file a library writes by path, `staged_dir` for a folder (shards, evaluation
reports, synthetic datasets).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and folder below `root` (before renaming it into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """`with replacing(path) as tmp:` have a library write the file `tmp` (an ONNX or TorchScript export);
    on success it is flushed and renamed to `path`, on any error (a failed check of what was written) it is
    removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # several writers may race
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


@contextmanager
def writing(path: str | Path) -> Iterator[BinaryIO]:
    """`with writing(path) as f:` write `f`, with `replacing`'s guarantees. For files too big to hold in
    memory (downloaded shards)."""
    with replacing(path) as tmp, open(tmp, "xb") as f:
        yield f


def write_bytes(path: str | Path, data: bytes) -> Path:
    with writing(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Move the finished folder `tmp` to `out`. An existing `out` is renamed away first and deleted after,
    so at every instant `out` is either the complete old or the complete new folder."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync(out.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """`with staged_dir(out) as tmp:` fill `tmp`; on success it is flushed and swapped in for `out` (an
    existing `out` is replaced: callers decide beforehand whether that is allowed); on any error the
    temp folder is removed and `out` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700
        fsync_tree(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
