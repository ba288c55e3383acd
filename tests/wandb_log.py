"""Read what an offline W&B run logged, straight from its `run-*.wandb` transaction log.

Offline runs write no summary JSON and wandb ships no reader for this file, so the tests decode it:
a LevelDB-style log (32 KiB blocks of checksummed record fragments) of `wandb_internal_pb2.Record`s.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # crc32 (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the tail of a block too small for a header is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec


def logged(path: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of a run file; values are JSON-decoded."""
    config, history = {}, []
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            for item in rec.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
    return config, history


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def summary(path: Path) -> dict:
    """The run summary as the records of the file leave it (later updates win); values JSON-decoded."""
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                out[_key(item)] = json.loads(item.value_json)
    return out


def run_record(path: Path):
    """The file's `run` record (id, display name, group, tags, ...)."""
    return next(rec.run for rec in records(path) if rec.WhichOneof("record_type") == "run")


def artifacts(path: Path) -> list[dict]:
    """Artifacts logged by the run: name, type, aliases, metadata and the files in their manifest."""
    out = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "artifact":
            a = rec.artifact
            out.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": list(a.aliases),
                    "metadata": json.loads(a.metadata or "{}"),
                    "files": {c.path: c.local_path for c in a.manifest.contents},
                }
            )
    return out
