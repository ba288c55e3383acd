"""Write files and folders so that readers (and crashes) only ever see the old or the complete new
version: build beside the target, flush it to disk, then rename into place (and flush the rename),
so neither a crash nor a power cut leaves a name pointing at half-written bytes."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


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


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Move the finished folder `tmp` to `out`. An existing `out` is renamed away first and deleted after,
    so at every instant `out` is either the complete old or the complete new folder."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
