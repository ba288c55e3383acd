"""Grouped cross-validation folds of a shard folder, recorded in its manifest (the shards stay as they are).

Images of one lesion (HAM10000 / ISIC 2019 `lesion_id`) or of one patient (ISIC 2020 `patient_id`) on
both sides of a split inflate validation scores, so folds come from scikit-learn's
`StratifiedGroupKFold`: every group lies in exactly one fold, and each fold keeps the class mix as far as
the groups allow. A sample without a group id is a group of its own.

`assign_folds` reads every sample's JSON record (label, group ids), assigns the folds and rewrites
manifest.json atomically with `split` (`fold_of`: id -> fold, per-fold class counts) and each shard's
`fold_counts`, which is what lets the loader (`data`, `folds=`) plan equal batches per rank and read
every selected sample exactly once.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from lesionkit import sources, tasks
from lesionkit.atomic import write_json
from lesionkit.errors import CorruptDataError, UsageError
from lesionkit.manifest import MANIFEST, read_manifest

GROUP_BY = ("lesion", "patient", "none")  # "none": every sample its own group (plain stratified k-fold)
METHOD = "StratifiedGroupKFold"


def stratified_group_folds(strata, groups, k: int, seed: int) -> np.ndarray:
    """Fold index per sample from `StratifiedGroupKFold(k, shuffle=True, random_state=seed)`."""
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(strata), -1)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only n members": reported by `split`
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, held_out) in enumerate(splitter.split(np.zeros(len(strata)), strata, groups)):
            fold[held_out] = f
    return fold


def assign_folds(location, k: int = 5, by: str = "lesion", seed: int = 0, force: bool = False) -> dict:
    """Assign `k` grouped folds to the samples of a local shard folder and record them in its manifest;
    returns the new `split` entry. An existing split is replaced only with `force`."""
    from lesionkit.data import sample_records  # torch: only for this command

    if sources.is_remote(location):
        raise UsageError(f"{location}: folds are written into manifest.json, so the folder must be local")
    manifest = read_manifest(location)
    if manifest.get("split") and not force:
        old = manifest["split"]
        raise UsageError(
            f"{location} already has {old['folds']} folds by {old['by']} (seed {old['seed']}); pass --force "
            "to replace them (runs trained on the old folds then no longer match)"
        )
    if by not in GROUP_BY:
        raise UsageError(f"--by {by!r}: choose one of {', '.join(GROUP_BY)}")
    if k < 2:
        raise UsageError(f"--folds must be >= 2, got {k}")
    records = sorted(sample_records(location), key=lambda r: r[1]["id"])  # independent of the shard layout
    expected = {s["name"]: int(s["num_samples"]) for s in manifest["shards"]}
    found = Counter(name for name, _ in records)
    if found != Counter({n: c for n, c in expected.items() if c}):
        raise CorruptDataError(f"{location}: the shards hold other samples than manifest.json lists; repack")
    ids = [r["id"] for _, r in records]
    names = [r["label_name"] for _, r in records]
    known = [(r.get("groups") or {}).get(by) if by != "none" else None for _, r in records]
    if by != "none" and not any(known):
        have = ", ".join(manifest.get("groups") or {}) or "none"
        raise UsageError(
            f"{location}: no sample has a {by} id (group ids in this folder: {have}); pack with a CSV that "
            f"has {by}_id (e.g. --metadata), or pass --by none"
        )
    groups = [g if g is not None else f"sample:{i}" for g, i in zip(known, ids)]
    if len(set(groups)) < k:
        raise UsageError(f"{location}: {len(set(groups))} {by} group(s) cannot fill {k} folds")
    fold = stratified_group_folds(tasks.for_manifest(manifest).strata(names), groups, k, seed)
    classes = manifest["classes"]
    shard_counts = {s["name"]: [dict.fromkeys(classes, 0) for _ in range(k)] for s in manifest["shards"]}
    for (shard, _), name, f in zip(records, names, fold):
        shard_counts[shard][f][name] += 1
    for s in manifest["shards"]:
        s["fold_counts"] = shard_counts[s["name"]]
    per_fold = [{c: sum(shard_counts[s][f][c] for s in shard_counts) for c in classes} for f in range(k)]
    manifest["split"] = {
        "method": METHOD,
        "by": by,
        "folds": k,
        "seed": seed,
        "groups": len(set(groups)),
        "ungrouped": sum(g is None for g in known) if by != "none" else len(ids),
        "counts": per_fold,
        "fold_of": {i: int(f) for i, f in zip(ids, fold)},
    }
    write_json(Path(location) / MANIFEST, manifest)
    return manifest["split"]


def fold_table(split: dict, classes: list[str]) -> str:
    """Samples per fold and class, as `lesionkit split` prints it."""
    rows = [["fold", *classes, "total"]]
    for f, counts in enumerate(split["counts"]):
        rows.append([str(f), *(str(counts[c]) for c in classes), str(sum(counts.values()))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)
