"""The shard folder contract: `manifest.json` beside `shard-NNNNNN.tar` files, written by `lesionkit pack`
and read by every reader (loader, evaluate, stats). One module, so writer and readers agree on it.

manifest.json holds `format_version`, `classes`, `task`, `num_samples`, `counts` (per class), `shards`
(name, num_samples, counts, bytes, sha256 each), the pack `params` (stored `size`, ...), `sources`,
`skipped`, and summaries of the samples' `groups` (patient/lesion ids) and `metadata`.

`lesionkit split` adds `split` (method, by, folds, seed, per-fold class `counts`, `fold_of`: sample id ->
fold) and to every shard `fold_counts` (per fold, per class), so a reader that selects folds plans its
batches from the manifest alone, exactly as without folds (`shard_selection`).

`pack` also records each sample's perceptual hashes (`phash`: method, views, `of`: sample id -> the views'
64-bit hashes in hex, space-separated), which `lesionkit dedup` and the trainer's duplicate check compare
(`lesionkit.dedup`). A training run's `exclude` list leaves samples out by id (`Exclusion`): selections
then count without them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lesionkit import sources
from lesionkit.errors import RunError, UsageError
from lesionkit.labelmaps import relabel_counts

FORMAT_VERSION = 1  # of the shard layout + manifest; readers refuse any other
MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"


def read_manifest(location: str | Path, fetch: sources.Fetch | None = None) -> dict:
    """manifest.json of a shard folder, checked for the format version this reader understands and for
    shard names that stay inside the folder (a remote manifest is untrusted input)."""
    url = sources.join(location, MANIFEST)
    if not sources.is_remote(location):
        if not Path(location).is_dir():
            raise UsageError(f"shard folder not found: {location}")
        if not Path(url).is_file():
            raise UsageError(f"{url} not found: {location} is not a shard folder written by `lesionkit pack`")
    try:
        manifest = json.loads(sources.read_bytes(url, fetch).decode("utf-8"))
    except RunError as exc:  # remote: not found, refused, or gave up retrying; the message names the URL
        raise UsageError(str(exc)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{url}: unreadable manifest ({exc})") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UsageError(
            f"{url}: shard format_version {version!r} is not supported (this lesionkit reads "
            f"{FORMAT_VERSION}); repack with `lesionkit pack`"
        )
    missing = [k for k in ("classes", "num_samples", "shards") if k not in manifest]
    if missing:
        raise UsageError(f"{url}: manifest lacks {', '.join(missing)}")
    for shard in manifest["shards"]:
        sources.check_name(shard.get("name") if isinstance(shard, dict) else shard, url)
    return manifest


@dataclass(frozen=True)
class Exclusion:
    """Training samples left out by id (`TrainConfig.exclude`; `lesionkit dedup --exclude-out` writes such
    lists): the ids, and where each one that exists was found (folder -> shard name -> ((id, class name),
    ...)), so a selection counts its samples without them (`data.exclusion` finds them)."""

    ids: frozenset
    found: dict

    def of(self, folder, shard: str) -> tuple:
        """((id, class name), ...) of the excluded samples in `shard` of `folder`."""
        return self.found.get(str(folder), {}).get(shard, ())

    @property
    def count(self) -> int:
        return sum(len(v) for shards in self.found.values() for v in shards.values())


def as_list(locations) -> list[str]:
    return [str(locations)] if isinstance(locations, (str, Path)) else [str(d) for d in locations]


def split_of(manifest: dict, location, folds=None) -> dict:
    """The manifest's fold split, checked to hold `folds`; a UsageError naming the fix otherwise."""
    split = manifest.get("split")
    if not split:
        raise UsageError(
            f"{location} has no folds: assign them with `lesionkit split {location} --by lesion`"
        )
    bad = [f for f in folds or () if not 0 <= int(f) < split["folds"]]
    if bad:
        raise UsageError(f"{location} has folds 0..{split['folds'] - 1} (`lesionkit split`), not {bad}")
    return split


def shard_selection(
    manifest: dict, location, folds=None, exclude: Exclusion | None = None, relabel: dict | None = None
) -> tuple[list[tuple[dict, int, dict]], frozenset | None]:
    """([(shard record, samples, counts per class)], ids of the selected samples): every shard whole when
    `folds` is None, else only the samples of `folds` (None for the ids: keep every sample). The counts
    leave out the selected samples that `exclude` lists (the ids still hold them: drop them by id too).
    `relabel` (class -> class or None, a `labelmaps.Merge` entry) counts in the mapped classes, without
    the samples of classes mapped to None."""
    if folds is None:
        picked = [(rec, int(rec["num_samples"]), dict(rec.get("counts", {}))) for rec in manifest["shards"]]
        keys = None
    else:
        split, folds = split_of(manifest, location, folds), {int(f) for f in folds}
        picked = []
        for rec in manifest["shards"]:
            counts = {
                c: sum(int(rec["fold_counts"][f].get(c, 0)) for f in folds) for c in manifest["classes"]
            }
            picked.append((rec, sum(counts.values()), counts))
        keys = frozenset(i for i, f in split["fold_of"].items() if f in folds)
    if exclude is not None:
        for k, (rec, n, counts) in enumerate(picked):
            dropped = [c for i, c in exclude.of(location, rec["name"]) if keys is None or i in keys]
            for c in dropped:
                counts[c] = int(counts.get(c, 0)) - 1
            picked[k] = (rec, n - len(dropped), counts)
    if relabel is not None:
        for k, (rec, n, counts) in enumerate(picked):
            mapped = relabel_counts(counts, relabel)
            left_out = sum(int(v) for v in counts.values()) - sum(mapped.values())
            picked[k] = (rec, n - left_out, mapped)
    return picked, keys


def dataset_info(
    locations,
    folds=None,
    fetch: sources.Fetch | None = None,
    exclude: Exclusion | None = None,
    merge=None,
) -> tuple[list[str], dict[str, int], int]:
    """(classes, counts per class, number of samples) over shard folders that share one class list; with
    `folds`, of those folds of each folder's split only; without the samples `exclude` lists; `fetch` for
    remote folders. With a `labelmaps.Merge`, in its classes: a mapped folder is read whole (its folds
    are not the validation data's) and counted in the classes it maps to."""
    classes, counts, total, first = None, {}, 0, None
    if merge is not None:
        classes, first = list(merge.classes), "the validation data"
        counts = dict.fromkeys(classes, 0)
    for folder in as_list(locations):
        manifest = read_manifest(folder, fetch)
        relabel = merge.of(folder) if merge is not None else None
        if relabel is not None:
            selection = shard_selection(manifest, folder, None, exclude, relabel)[0]
            for _, n, picked_counts in selection:
                for name, k in picked_counts.items():
                    counts[name] += int(k)
                total += int(n)
            continue
        if classes is None:
            classes, first = list(manifest["classes"]), folder
            counts = dict.fromkeys(classes, 0)
        elif list(manifest["classes"]) != classes:
            raise UsageError(
                f"shard folders disagree on the classes: {first} has {classes}, "
                f"{folder} has {manifest['classes']}"
            )
        if folds is None and exclude is None:
            picked = [(manifest["num_samples"], manifest.get("counts", {}))]
        else:
            selection = shard_selection(manifest, folder, folds, exclude)[0]
            picked = [(n, shard_counts) for _, n, shard_counts in selection]
        for n, picked_counts in picked:
            for name, k in picked_counts.items():
                counts[name] += int(k)
            total += int(n)
    if classes is None:
        raise UsageError("no shard folders given")
    return classes, counts, total


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (shards can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: str | Path) -> list[str]:
    """Problems found re-hashing the shards of one folder ([] when every shard matches its manifest)."""
    if sources.is_remote(folder):
        raise UsageError(
            f"{folder}: --verify re-hashes local folders; remote shards are checked as they are read"
        )
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {shard['bytes']}")
        elif sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted)")
    if sum(s["num_samples"] for s in manifest["shards"]) != manifest["num_samples"]:
        problems.append(f"{folder}/manifest.json: shard sample counts do not add up to num_samples")
    return problems
