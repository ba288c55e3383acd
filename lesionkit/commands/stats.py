"""`lesionkit stats`: class distribution of packed shard folders, read from their manifests; `--verify`
re-hashes every shard against the manifest (size + sha256, `manifest.verify`) to catch truncated copies
or bit rot before a long training run does.
"""

from __future__ import annotations

from pathlib import Path

from lesionkit.errors import RunError, UsageError
from lesionkit.manifest import read_manifest, verify


def class_table(folders: list[str | Path]) -> str:
    """Counts and percentages per class: one column per folder, plus a total column when several."""
    manifests = [read_manifest(f) for f in folders]
    classes = manifests[0]["classes"]
    for folder, m in zip(folders[1:], manifests[1:]):
        if m["classes"] != classes:
            raise UsageError(f"{folder}: classes {m['classes']} differ from {classes} in {folders[0]}")
    names = [Path(f).name or str(f) for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    columns = [(name, m["counts"], m["num_samples"]) for name, m in zip(names, manifests)]
    if len(manifests) > 1:
        total = {c: sum(m["counts"][c] for m in manifests) for c in classes}
        columns.append(("total", total, sum(total.values())))

    def cell(n: int, of: int) -> str:
        return f"{n} ({100 * n / of:.1f}%)" if of else "0"

    rows = [["class"] + [name for name, _, _ in columns]]
    rows += [[c] + [cell(counts[c], n) for _, counts, n in columns] for c in classes]
    rows.append(["total"] + [str(n) for _, _, n in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )


def add_arguments(parser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="shard folder(s) written by `lesionkit pack`")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every shard and compare size + sha256 with the manifest",
    )


def run(args) -> int:
    print(class_table(args.dirs))
    if not args.verify:
        return 0
    problems = []
    for folder in args.dirs:
        found = verify(folder)
        problems += found
        if not found:
            print(f"verified {folder}: {len(read_manifest(folder)['shards'])} shard(s) match the manifest")
    if problems:
        raise RunError(f"{len(problems)} shard problem(s):\n  " + "\n  ".join(problems))
    return 0
