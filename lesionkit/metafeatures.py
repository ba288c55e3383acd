"""Patient metadata as model input (`TrainConfig.metadata`): which fields, and how each becomes numbers.

The shards already hold each sample's metadata under one vocabulary (`ingest.META_NAMES`: `age`, `sex`,
`site`, whatever the release called the column). A `MetaSpec` turns a sample's `meta` into a fixed-length
float vector, the same way in the loader workers, in `evaluate` and in `predict`:

- age: (age - 50) / 20 (about the ISIC populations' mean and spread, so fixed constants serve every
  release and need no statistics from the training set), 0 when missing, plus a missing-age indicator;
- sex: one-hot over female, male, and missing;
- site: one-hot over the ISIC anatomic sites of 2019 and 2020 (2020 says `torso` where 2019 says
  anterior/posterior/lateral torso; both are kept), and missing. A site outside the list counts as
  missing (`MetaSpec.unknown` lists such values so callers can say so).

The spec is saved in the checkpoint's info.json (`meta_features`), so inference needs no flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lesionkit.errors import ConfigError, UsageError

FIELDS = ("age", "sex", "site")
SEXES = ("female", "male")
SITES = (
    "anterior torso",
    "head/neck",
    "lateral torso",
    "lower extremity",
    "oral/genital",
    "palms/soles",
    "posterior torso",
    "torso",
    "upper extremity",
)
AGE_CENTER, AGE_SCALE = 50.0, 20.0
# the CSV columns `ingest.META_NAMES` reads for each field, for messages about a missing column
COLUMNS = {
    "age": "age_approx, age_approximate or age",
    "sex": "sex or gender",
    "site": "anatom_site_general or anatom_site_general_challenge",
}


@dataclass(frozen=True)
class MetaSpec:
    """The metadata fields a model takes and their encoding; callable on a sample's JSON record (what the
    loaders' `features` hook gets), picklable for the loader workers."""

    fields: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        """One name per feature, in vector order (model cards, debugging)."""
        out: list[str] = []
        for f in self.fields:
            if f == "age":
                out += ["age", "age_missing"]
            elif f == "sex":
                out += [f"sex={s}" for s in SEXES] + ["sex_missing"]
            else:
                out += [f"site={s}" for s in SITES] + ["site_missing"]
        return out

    @property
    def size(self) -> int:
        return len(self.names)

    def encode(self, meta: Mapping) -> list[float]:
        out: list[float] = []
        for f in self.fields:
            value = meta.get(f)
            if f == "age":
                known = isinstance(value, (int, float)) and value == value  # not NaN
                out += [(float(value) - AGE_CENTER) / AGE_SCALE if known else 0.0, 0.0 if known else 1.0]
            else:
                vocab = SEXES if f == "sex" else SITES
                hot = vocab.index(value) if value in vocab else len(vocab)
                out += [1.0 if i == hot else 0.0 for i in range(len(vocab) + 1)]
        return out

    def __call__(self, record: Mapping) -> list[float]:
        return self.encode(record.get("meta") or {})

    def unknown(self, meta: Mapping) -> list[str]:
        """Values present but outside the vocabulary (encoded as missing; `api.Model.features` warns)."""
        return [
            f"{f}={meta[f]!r}"
            for f, vocab in (("sex", SEXES), ("site", SITES))
            if f in self.fields and meta.get(f) is not None and meta[f] not in vocab
        ]

    def serving(self) -> dict:
        """How a client outside Python builds the vector (an exported model's JSON): names in order and
        the encoding rules above, with their constants."""
        return {
            "fields": list(self.fields),
            "features": self.names,
            "encoding": {
                "age": f"(age - {AGE_CENTER:g}) / {AGE_SCALE:g}, 0 when missing; age_missing 1 when missing",
                "sex": "one-hot over sex=...; sex_missing when missing or another value",
                "site": "one-hot over site=...; site_missing when missing or another value",
            },
            "age_center": AGE_CENTER,
            "age_scale": AGE_SCALE,
        }

    def to_info(self) -> dict:
        return {"fields": list(self.fields), "names": self.names}

    @classmethod
    def from_info(cls, info: Mapping) -> MetaSpec | None:
        """The spec a checkpoint's info.json records, or None for an image-only model."""
        saved = info.get("meta_features")
        return cls(tuple(saved["fields"])) if saved else None


def parse(text: str) -> MetaSpec | None:
    """`age,sex,site` (any of them, any order: the order is fixed) -> MetaSpec; "" -> None."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        return None
    bad = [n for n in names if n not in FIELDS]
    if bad:
        raise ConfigError(f"--metadata {','.join(bad)}: unknown field(s); valid fields: {', '.join(FIELDS)}")
    return MetaSpec(tuple(f for f in FIELDS if f in names))


def check_folders(spec: MetaSpec, folders, fetch=None, flag: str = "--metadata") -> None:
    """ConfigError naming the folder and field when a shard folder's manifest records no value at all for
    a field of `spec` (it was packed without that metadata: every sample would read as missing)."""
    from lesionkit.manifest import read_manifest

    for folder in folders:
        summary = read_manifest(folder, fetch).get("metadata") or {}
        absent = [f for f in spec.fields if not (summary.get(f) or {}).get("present")]
        if absent:
            has = ", ".join(f for f in FIELDS if (summary.get(f) or {}).get("present")) or "none"
            raise ConfigError(
                f"{flag} {','.join(spec.fields)}: {folder} has no {', '.join(absent)} values (its metadata: "
                f"{has}); pack it with --metadata CSV, or leave those fields out"
            )


def read_csv(path: str | Path, spec: MetaSpec) -> dict[str, dict]:
    """id -> metadata from a CSV (the release's own metadata file works as is) for `predict --images`;
    a field of `spec` with no column in the file is a UsageError naming the columns it looks for."""
    import pandas as pd

    from lesionkit.ingest import META_NAMES, read_metadata

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--metadata {path}: no such file")
    header = set(pd.read_csv(path, nrows=0).columns)
    present = {META_NAMES[c] for c in header if c in META_NAMES}
    missing = [f for f in spec.fields if f not in present]
    if missing:
        raise UsageError(
            f"--metadata {path}: no column for {', '.join(missing)} "
            f"(the model takes {','.join(spec.fields)}; "
            + "; ".join(f"{f}: {COLUMNS[f]}" for f in missing)
            + ")"
        )
    return read_metadata(path)[0]
