"""Label maps: train on several releases at once by mapping each one's classes into one label space.

A map is a small YAML file (`source` task, `target` task, `map`: source class -> target class, or null to
leave that class out). Shipped maps live in `lesionkit/maps/` (`isic2017_to_isic2019`, ...); a path to a
YAML file works the same way. `TrainConfig.label_maps` names one map per `--train` folder (`none` for a
folder already in the target label space); `merge` checks them against the manifests before any process
starts, so a class the map does not name stops the run naming the class and the folder.

The result, a `Merge`, is what the data layer reads: `manifest.dataset_info`/`shard_selection` count the
target classes from the manifests, and the loader rewrites each sample's label as it streams it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from lesionkit.errors import UsageError

MAPS_DIR = Path(__file__).parent / "maps"
NONE = "none"  # a --label-maps entry for a folder already in the target label space


@dataclass(frozen=True)
class LabelMap:
    name: str  # shipped name or the YAML path
    source: str | None  # task of the folders it maps (checked against their manifests when given)
    target: str | None  # task of the label space it maps into
    classes: dict  # source class -> target class, or None: left out


@dataclass(frozen=True)
class Merge:
    """The training folders' label space: `classes`, and for each mapped folder its map, resolved to source
    class -> target class (None: the samples of that class are left out). Folders not in `maps` already
    have `classes`."""

    classes: tuple[str, ...]
    maps: dict  # folder -> {source class: target class | None}
    names: dict  # folder -> map name (records, model card)

    def of(self, folder) -> dict | None:
        return self.maps.get(str(folder))

    def index(self, folder, source_classes) -> tuple[int, ...] | None:
        """Source class index -> target class index (-1: left out) for `folder`; None when unmapped."""
        mapping = self.of(folder)
        if mapping is None:
            return None
        return tuple(-1 if mapping[c] is None else self.classes.index(mapping[c]) for c in source_classes)


def relabel_counts(counts: dict, mapping: dict) -> dict:
    """Class counts in the classes `mapping` (class -> class or None) gives them; None classes dropped."""
    out: dict[str, int] = {}
    for c, n in counts.items():
        if mapping.get(c) is not None:
            out[mapping[c]] = out.get(mapping[c], 0) + int(n)
    return out


def shipped() -> list[str]:
    return sorted(p.stem for p in MAPS_DIR.glob("*.yaml"))


def load(name_or_path: str) -> LabelMap:
    """A shipped map by name or a YAML file; one clear UsageError for anything malformed."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = MAPS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UsageError(
                f"unknown label map {name_or_path!r}: not a YAML file; shipped maps: {', '.join(shipped())}"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    mapping = data.get("map") if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"{path}: a label map needs `map:` (source class: target class or null)")
    bad = [k for k, v in mapping.items() if v is not None and not isinstance(v, str)]
    if bad:
        raise UsageError(f"{path}: map values must be class names or null, not those of {bad}")
    return LabelMap(
        name_or_path, data.get("source"), data.get("target"), {str(k): v for k, v in mapping.items()}
    )


def resolve(lmap: LabelMap, folder, manifest: dict, target: tuple[str, ...]) -> dict:
    """`lmap` checked against `folder`'s manifest and the target classes: every class of the folder named
    (a class the map does not name is a UsageError naming it and the folder), every target in `target`."""
    task = manifest.get("task")
    if lmap.source and task and task != lmap.source:
        raise UsageError(f"label map {lmap.name} maps {lmap.source} data, but {folder} holds task {task}")
    unmapped = [c for c in manifest["classes"] if c not in lmap.classes]
    if unmapped:
        raise UsageError(
            f"label map {lmap.name} has no entry for class {unmapped[0]!r} of {folder}"
            + (f" (nor {unmapped[1:]})" if unmapped[1:] else "")
            + ": map it to a class or to null (left out)"
        )
    foreign = sorted({v for v in lmap.classes.values() if v is not None and v not in target})
    if foreign:
        raise UsageError(
            f"label map {lmap.name} maps into {foreign}, which are not classes of the validation data "
            f"{list(target)}"
        )
    return {c: lmap.classes[c] for c in manifest["classes"]}


def mapped(folders, label_maps) -> dict:
    """folder -> map name of the folders `label_maps` maps (one entry per folder, `none`: unmapped)."""
    folders = [str(f) for f in folders]
    if not label_maps:
        return {}
    if len(label_maps) != len(folders):
        raise UsageError(
            f"--label-maps names {len(label_maps)} map(s) for {len(folders)} --train folder(s): give one "
            f"per folder, `{NONE}` for a folder already in the validation classes"
        )
    return {f: name for f, name in zip(folders, label_maps) if name != NONE}


def validation_folders(cfg) -> list[str]:
    """Where a run (a `TrainConfig`) validates: --val, else (`--fold`) the --train folders without a label
    map, whose split's fold it holds out; a mapped folder is extra training data, read whole."""
    return list(cfg.val) or [d for d in cfg.train if d not in mapped(cfg.train, cfg.label_maps)]


def merge(folders, label_maps, target, fetch=None) -> Merge | None:
    """The `Merge` of training `folders` into the `target` classes with `label_maps` (`mapped`), checked
    against their manifests; None when no folder is mapped."""
    from lesionkit.manifest import read_manifest

    names = mapped(folders, label_maps)
    maps = {f: resolve(load(name), f, read_manifest(f, fetch), tuple(target)) for f, name in names.items()}
    return Merge(tuple(target), maps, names) if maps else None


def summary(merge: Merge, fetch=None) -> list[str]:
    """One line per mapped folder for the start of a run: what its samples count as, and how many of its
    samples the map leaves out."""
    from lesionkit.manifest import read_manifest

    lines = []
    for folder, name in merge.names.items():
        manifest = read_manifest(folder, fetch)
        counts = relabel_counts(manifest.get("counts", {}), merge.maps[folder])
        left_out = int(manifest["num_samples"]) - sum(counts.values())
        out = sorted(c for c, t in merge.maps[folder].items() if t is None)
        trains_as = ", ".join(f"{c} {counts.get(c, 0)}" for c in merge.classes)
        lines.append(
            f"label map {name}: {folder} trains as {trains_as}"
            + (f"; {left_out} sample(s) of {', '.join(out)} left out" if out else "")
        )
    return lines
