"""Duplicate images across shard folders: a perceptual hash stored at pack time, candidates by Hamming
distance, every candidate confirmed on the pixels.

Why: the ISIC Archive reuses images across challenges (204 isic2019-256 images are isic2017-256 images,
stored at another size and JPEG encoding), so merging releases, or validating on one while training on
another, puts the same image on both sides and inflates the validation score.

The hash (`image_hashes`, computed by the pack workers on the decoded image as stored): imagehash's pHash
(the 8x8 lowest frequencies of the DCT of the 32x32 grey image, each above or below their median: 64 bits)
of two views: the whole image squashed to a square, and, for a non-square image, its centre square. The
whole view survives resizes that keep the aspect ratio or not (ISIC 2017's 256x256 thumbnails against
ISIC 2019's 256 px shorter side), re-encoding, and crops of a few percent; the centre view matches a
square centre crop of a non-square image at any size (as HAM10000's 256x256 crops of its 600x450 images
are, when taken of the whole height; a crop of a smaller centre is a zoom, which is not matched). `pack`
stores the hashes in each sample's JSON record (`phash`) and in the manifest (`phash.of`: id -> hex per
view).

Candidates: a training and an --against sample whose closest views are at most `MAX_DISTANCE` bits apart,
over all pairs (exact Hamming distances, no approximate index). Measured on isic2017-256 x isic2019-256
(every image hashed): the 204 shared images are at 0-4 bits; re-encodings (JPEG quality 30-95) and resizes
(0.5x, 2x, squashed) at 0-4; crops of up to 3 % per side at 0-10 (178 of 180 random ones within 8); but 98
pairs of different images are within 4 bits too and 1484 within 8 (dermoscopy images are alike at 32x32),
so a hash match alone is no proof.

Confirmation (each candidate compared exactly): the mean absolute difference of the two views' 64x64 grey
thumbnails, in grey levels, after the best crop of either of up to `CROP_MAX` per side (`CROP_STEP` steps,
coordinate search), must be at most `MAX_MAD`. Measured: the 204 shared images 0.3-0.6, re-encodings and
resizes <= 1.5, crops of up to 3 % per side <= 2.4; different lesions >= 4.3 (the closest of 1,900
candidate pairs), and different photographs of one lesion (the same mole photographed again, e.g.
ISIC_0015124 / ISIC_0000171) 8.1 and more. Consecutive near-identical shots of one lesion (five HAM10000
pairs) come out at 1.5-2.1 and are grouped: they leak as much as a copy does. Mirrored or rotated copies
are not found (their hashes differ).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit import sources, tasks
from lesionkit.errors import UsageError
from lesionkit.manifest import as_list, read_manifest, split_of

PHASH_METHOD = "imagehash.phash 64 bits (8x8 DCT of the 32x32 grey image); views: whole, centre square"
VIEWS = ("whole", "centre")  # the centre square only for a non-square image
MAX_DISTANCE = 8  # bits: candidates
MAX_MAD = 3.0  # grey levels: the confirmation
ALIGN_BELOW = 16.0  # grey levels: candidates further apart than this unaligned are not searched for a crop
THUMB, BASE = 64, 128  # compared thumbnail; the grey base image it is resampled (and cropped) from
CROP_STEP, CROP_MAX = 0.005, 0.04  # crop search per side, as a fraction of the side
_CHUNK = 256  # hash rows per block of the all-pairs distance matrix
ROLES = ("train", "against")


# ------------------------------------------------------------------------------------------------ the hash


def views(image: Image.Image) -> list[Image.Image]:
    """The views an image is hashed and compared by: the whole image, and its centre square if not square."""
    w, h = image.size
    if w == h:
        return [image]
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return [image, image.crop((left, top, left + s, top + s))]


def image_hashes(image: Image.Image) -> list[str]:
    """The 64-bit pHash of each view, in hex (what `pack` stores per sample)."""
    import imagehash

    return [str(imagehash.phash(v)) for v in views(image)]


def manifest_entry(hashes: dict[str, list[str]]) -> dict:
    """The manifest's `phash`: the method and id -> the views' hashes, space-separated."""
    return {"method": PHASH_METHOD, "views": list(VIEWS), "of": {i: " ".join(h) for i, h in hashes.items()}}


def stored_hashes(manifest: dict) -> dict[str, tuple[int, ...]] | None:
    """id -> the views' hashes as ints, from a manifest written by this method; None when it has none."""
    entry = manifest.get("phash")
    if not isinstance(entry, dict) or entry.get("method") != PHASH_METHOD:
        return None
    return {i: tuple(int(h, 16) for h in text.split()) for i, text in entry["of"].items()}


def _decode(jpeg: bytes, base: bool = False) -> Image.Image:
    with Image.open(io.BytesIO(jpeg)) as im:
        if base:  # the thumbnails need no more than 2x their base: decode big JPEGs at reduced scale
            im.draft("RGB", (2 * BASE, 2 * BASE))
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------- the confirmation


def _thumb(base: Image.Image, box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)) -> np.ndarray:
    """The THUMB x THUMB grey thumbnail of `base` (mode F) cropped by `box` (left, top, right, bottom
    fractions)."""
    left, top, right, bottom = (b * BASE for b in box)
    region = (left, top, BASE - right, BASE - bottom)
    return np.asarray(base.resize((THUMB, THUMB), Image.Resampling.LANCZOS, box=region))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def _aligned(base: Image.Image, target: np.ndarray) -> float:
    """The smallest thumbnail difference to `target` over crops of `base` of up to CROP_MAX per side:
    coordinate descent in CROP_STEP steps from no crop (a few dozen resizes of a 128 px image)."""
    box = [0.0, 0.0, 0.0, 0.0]
    best = _mad(_thumb(base), target)
    improved = True
    while improved:
        improved = False
        for side in range(4):
            for step in (CROP_STEP, -CROP_STEP):
                trial = list(box)
                trial[side] = round(trial[side] + step, 6)
                if not 0.0 <= trial[side] <= CROP_MAX:
                    continue
                mad = _mad(_thumb(base, tuple(trial)), target)
                if mad < best - 1e-6:
                    best, box, improved = mad, trial, True
    return best


@dataclass
class Pixels:
    """The grey bases and uncropped thumbnails of one image's views."""

    bases: list[Image.Image]
    thumbs: list[np.ndarray]

    @classmethod
    def of(cls, image: Image.Image) -> Pixels:
        bases = []
        for v in views(image):
            grey = np.asarray(v.convert("L").resize((BASE, BASE), Image.Resampling.LANCZOS), np.float32)
            bases.append(Image.fromarray(grey, "F"))
        return cls(bases, [_thumb(b) for b in bases])


def pixel_distance(a: Pixels, b: Pixels, max_mad: float = MAX_MAD) -> float:
    """The confirmation's distance of two images (grey levels): over their pairs of views, the thumbnails'
    mean absolute difference, after the best crop of either when it is not at most `max_mad` unaligned."""
    best = math.inf
    for base_a, thumb_a in zip(a.bases, a.thumbs):
        for base_b, thumb_b in zip(b.bases, b.thumbs):
            mad = _mad(thumb_a, thumb_b)
            if mad > max_mad and mad <= ALIGN_BELOW:
                mad = min(mad, _aligned(base_a, thumb_b), _aligned(base_b, thumb_a))
            if mad <= max_mad:
                return mad
            best = min(best, mad)
    return best


def hash_distance(a: Iterable[int], b: Iterable[int]) -> int:
    """Bits between the closest views of two images' hashes."""
    return min(bin(x ^ y).count("1") for x in a for y in b)


@dataclass(frozen=True)
class Match:
    distance: int  # bits between the closest views' hashes
    mad: float  # the confirmation's distance (inf when not a candidate)
    duplicate: bool


def compare_images(a: Image.Image, b: Image.Image, max_distance=MAX_DISTANCE, max_mad=MAX_MAD) -> Match:
    """Two images as `find` compares a pair of samples: hash distance, then the pixel check."""
    a, b = a.convert("RGB"), b.convert("RGB")
    ha = tuple(int(h, 16) for h in image_hashes(a))
    hb = tuple(int(h, 16) for h in image_hashes(b))
    distance = hash_distance(ha, hb)
    if distance > max_distance:
        return Match(distance, math.inf, False)
    mad = pixel_distance(Pixels.of(a), Pixels.of(b), max_mad)
    return Match(distance, mad, mad <= max_mad)


# ------------------------------------------------------------------------------------- finding duplicates


@dataclass(frozen=True)
class Member:
    role: str  # "train" | "against"
    folder: str
    id: str
    label: str


@dataclass
class Group:
    members: list[Member]

    @property
    def labels_disagree(self) -> bool:
        labels = sorted({m.label for m in self.members})
        return any(not tasks.same_diagnosis(a, b) for k, a in enumerate(labels) for b in labels[k + 1 :])


@dataclass
class Result:
    groups: list[Group]
    candidates: int  # pairs within MAX_DISTANCE bits
    pairs: list[tuple[Member, Member, int, float]]  # confirmed: (train, against, bits, grey levels)
    computed: list[str] = field(default_factory=list)  # folders whose hashes were computed, not stored

    @property
    def duplicated(self) -> dict[str, set[tuple[str, str]]]:
        """role -> the (folder, id) of its samples that are in a group."""
        out = {role: set() for role in ROLES}
        for g in self.groups:
            for m in g.members:
                out[m.role].add((m.folder, m.id))
        return out


@dataclass(frozen=True)
class _Entry:
    folder: str
    id: str
    hashes: tuple[int, ...]


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1)


def candidate_pairs(left: list, right: list, max_distance: int) -> dict[tuple[int, int], int]:
    """(i, j) -> bits for every pair of `left[i].hashes`, `right[j].hashes` whose closest views are within
    `max_distance` bits (exact distances over all pairs, in blocks of rows)."""

    def flat(entries):
        values = [h for e in entries for h in e.hashes]
        owners = [k for k, e in enumerate(entries) for _ in e.hashes]
        return np.array(values, dtype=np.uint64), np.array(owners, dtype=np.int64)

    (lv, li), (rv, ri) = flat(left), flat(right)
    found: dict[tuple[int, int], int] = {}
    if not len(lv) or not len(rv):
        return found
    for start in range(0, len(lv), _CHUNK):
        bits = _popcount(lv[start : start + _CHUNK, None] ^ rv[None, :])
        rows, cols = np.nonzero(bits <= max_distance)
        for r, c, d in zip(rows.tolist(), cols.tolist(), bits[rows, cols].tolist()):
            key = (int(li[start + r]), int(ri[c]))
            found[key] = min(d, found.get(key, d))
    return found


def _hashes(folder: str, fetch, note: Callable[[str], None]) -> tuple[dict[str, tuple[int, ...]], bool]:
    """(id -> hashes, whether they were computed): the manifest's, else computed from the shard images."""
    manifest = read_manifest(folder, fetch)
    stored = stored_hashes(manifest)
    if stored is not None:
        return stored, False
    from lesionkit.data import shard_samples  # torch: only where shards are read

    note(
        f"{folder} has no perceptual hashes in its manifest (packed by an older lesionkit): computing them "
        f"from its {manifest['num_samples']} images (repack to store them)"
    )
    out = {}
    for _, sample in shard_samples(folder, fetch):
        out[sample["__key__"]] = tuple(int(h, 16) for h in image_hashes(_decode(sample["jpg"])))
    return out, True


def _read_pixels(needed: dict[str, set[str]], fetch) -> dict[tuple[str, str], tuple[str, Pixels]]:
    """(folder, id) -> (label name, Pixels) of the `needed` samples, read from their shards (each folder's
    walk stops once it has them all)."""
    from lesionkit.data import shard_samples

    out = {}
    for folder, ids in needed.items():
        left = set(ids)
        for _, sample in shard_samples(folder, fetch):
            key = sample["__key__"]
            if key in left:
                record = json.loads(sample["json"])
                out[(folder, key)] = (record["label_name"], Pixels.of(_decode(sample["jpg"], base=True)))
                left.discard(key)
                if not left:
                    break
    return out


def find(
    train,
    against,
    *,
    train_keep: Callable[[str, str], bool] | None = None,
    against_keep: Callable[[str, str], bool] | None = None,
    max_distance: int = MAX_DISTANCE,
    max_mad: float = MAX_MAD,
    fetch: sources.Fetch | None = None,
    note: Callable[[str], None] = lambda _: None,
) -> Result:
    """Duplicate groups between the samples of the `train` and `against` shard folders (those for which
    `*_keep(folder, id)` holds): candidate pairs by hash distance, each confirmed by `pixel_distance`,
    joined into groups (connected components) that hold both sides. A sample is never its own duplicate
    (one folder on both sides, with disjoint `keep`s: the trainer's folds)."""
    if max_distance < 0 or max_distance > 64:
        raise UsageError(f"--max-distance must be in [0, 64] bits, got {max_distance}")
    if max_mad < 0:
        raise UsageError(f"--max-mad must be >= 0 grey levels, got {max_mad}")
    sides, computed = [], []
    for folders, keep in ((as_list(train), train_keep), (as_list(against), against_keep)):
        entries = []
        for folder in folders:
            hashes, was_computed = _hashes(folder, fetch, note)
            if was_computed:
                computed.append(folder)
            entries += [
                _Entry(folder, i, h) for i, h in sorted(hashes.items()) if keep is None or keep(folder, i)
            ]
        sides.append(entries)
    left, right = sides
    found = {
        (i, j): d
        for (i, j), d in candidate_pairs(left, right, max_distance).items()
        if (left[i].folder, left[i].id) != (right[j].folder, right[j].id)
    }
    needed: dict[str, set[str]] = {}
    for i, j in found:
        for e in (left[i], right[j]):
            needed.setdefault(e.folder, set()).add(e.id)
    pixels = _read_pixels(needed, fetch)
    pairs = []
    for (i, j), bits in sorted(found.items()):
        a, b = (left[i].folder, left[i].id), (right[j].folder, right[j].id)
        mad = pixel_distance(pixels[a][1], pixels[b][1], max_mad)
        if mad <= max_mad:
            pairs.append((Member("train", *a, pixels[a][0]), Member("against", *b, pixels[b][0]), bits, mad))
    return Result(_groups(pairs, [*as_list(train), *as_list(against)]), len(found), pairs, computed)


def _groups(pairs, folder_order: list[str]) -> list[Group]:
    """Connected components of the confirmed pairs, members and groups in a stable order."""
    parent: dict[Member, Member] = {}

    def root(m: Member) -> Member:
        while parent.setdefault(m, m) != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for a, b, _, _ in pairs:
        parent[root(a)] = root(b)
    components: dict[Member, list[Member]] = {}
    for m in parent:
        components.setdefault(root(m), []).append(m)
    order = {f: k for k, f in reversed(list(enumerate(folder_order)))}

    def key(m: Member):
        return ROLES.index(m.role), order.get(m.folder, len(order)), m.folder, m.id

    groups = [Group(sorted(members, key=key)) for members in components.values()]
    return sorted(groups, key=lambda g: key(g.members[0]))


# ------------------------------------------------------------------------------------------------ outputs

CSV_COLUMNS = ("group", "role", "folder", "id", "label", "labels_disagree")


def groups_csv(result: Result) -> str:
    """One row per (group, member): group number, train/against, folder, sample id, label, and whether the
    labels of the group disagree (`tasks.same_diagnosis`)."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for n, group in enumerate(result.groups, 1):
        disagree = "true" if group.labels_disagree else "false"
        for m in group.members:
            writer.writerow([n, m.role, m.folder, m.id, m.label, disagree])
    return buf.getvalue()


def exclusion_text(result: Result, train, against) -> str:
    """The exclusion list: the ids of the training samples that have a duplicate in `against`, one a line,
    after comment lines that say where it came from (`read_exclusion` skips them)."""
    ids = sorted({i for _, i in result.duplicated["train"]})
    head = [
        "# lesionkit dedup: training samples with a duplicate in the --against data; train with",
        "# --exclude THIS_FILE to leave them out (ids match in every --train folder)",
        f"# train: {' '.join(as_list(train))}",
        f"# against: {' '.join(as_list(against))}",
    ]
    return "\n".join(head + ids) + "\n"


def read_exclusion(path: str | os.PathLike) -> frozenset[str]:
    """The ids of an exclusion list: one a line; blank lines and `#` comments skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"exclude list {path}: cannot read it ({exc})") from None
    return frozenset(s for line in text.splitlines() if (s := line.split("#", 1)[0].strip()))


# -------------------------------------------------------------------------------------- the trainer's check


def selection(folders, folds=None, drop: frozenset = frozenset(), fetch=None, whole=()) -> Callable | None:
    """`find`'s `keep` for the samples of `folds` of each folder's split (all when None; all of the folders
    in `whole`) not in `drop`."""
    if folds is None and not drop:
        return None
    fold_of = {}
    if folds is not None:
        folds = {int(f) for f in folds}
        for folder in as_list(folders):
            if folder not in whole:
                fold_of[folder] = split_of(read_manifest(folder, fetch), folder, folds)["fold_of"]

    def keep(folder: str, sample_id: str) -> bool:
        in_folds = folds is None or folder not in fold_of or fold_of[folder].get(sample_id) in folds
        return sample_id not in drop and in_folds

    return keep


def leak_warning(
    train, val, *, train_folds=None, val_folds=None, exclude: frozenset = frozenset(), fetch=None, whole=()
) -> str | None:
    """The trainer's one line at the start of a run: how many validation samples have a duplicate among the
    training samples it reads (the selected folds, but all of the label-mapped folders in `whole`, without
    the excluded ids), from the stored hashes and the pixel check of the few candidates; a note when a
    folder has no stored hashes; None when all is well."""
    folders = dict.fromkeys([*as_list(train), *as_list(val)])
    missing = [f for f in folders if stored_hashes(read_manifest(f, fetch)) is None]
    if missing:
        return (
            f"no duplicate check of validation against training data: {', '.join(missing)} "
            f"{'has' if len(missing) == 1 else 'have'} no perceptual hashes (repack with this lesionkit, or "
            "run `lesionkit dedup`)"
        )
    result = find(
        train,
        val,
        train_keep=selection(train, train_folds, exclude, fetch, whole),
        against_keep=selection(val, val_folds, fetch=fetch),
        fetch=fetch,
    )
    if not result.groups:
        return None
    examples = ", ".join(f"{a.id} = {b.id}" for a, b, _, _ in result.pairs[:3])
    more = ", ..." if len(result.pairs) > 3 else ""
    how = f"--fold {val_folds[0]}" if val_folds else f"--against {' '.join(as_list(val))}"
    n = len(result.duplicated["against"])
    return (
        f"warning: {n} validation sample(s) are duplicates of training images "
        f"({len(result.groups)} group(s); train = val: {examples}{more}): validation scores will be "
        f"optimistic; `lesionkit dedup {' '.join(as_list(train))} {how} --exclude-out FILE` lists them, "
        "--exclude FILE trains without them"
    )
