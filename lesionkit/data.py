"""Read packed shards: the training stream (equal batches on every rank) and the evaluation reader.

Layout of a job: every process (rank) runs a DataLoader with W workers, so there are
world_size x W streams ("slots"). Each slot reads whole shards, decodes JPEG bytes to uint8 CHW
tensors at the training size and collates full batches itself; the main process only pins and
hands them on.

Why not `wds.split_by_node` / `wds.split_by_worker`: they deal shards out by position
(`islice(urls, rank, None, world)`), so ranks get different numbers of samples and a DDP job hangs
in the first all-reduce that one rank never reaches. Here every process computes the same plan
from the manifest: shards -> slots (largest first into the emptiest slot, a seeded shuffle per
epoch decides which of the equally sized shards go where), and from the per-shard counts the
number of batches each slot makes. `len(loader)` is identical on all ranks; slots that run short
cycle over their shards again (padding), so an epoch still shows every sample at least once.

Never pass these loaders through `accelerator.prepare`: Accelerate would wrap them in its own
sharding (each rank keeps every world_size-th batch of what is already its own share), silently
dropping half of the data on 2 ranks, and its even_batches logic knows nothing of our padding.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import json
import logging
import math
import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from lesionkit import seeds, sources
from lesionkit.errors import CorruptDataError, UsageError
from lesionkit.manifest import MANIFEST, Exclusion, as_list, dataset_info, read_manifest, shard_selection

DRAFT_FACTOR = 2  # stored shorter side >= 2x the training size: decode with PIL draft (DCT scaling)

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    """What every reader yields: uint8 images [B,3,S,S], int64 labels [B], sample ids, and per-sample
    metadata features float32 [B, M] when the stream was given a `features` function (else None)."""

    images: torch.Tensor | Encoded
    labels: torch.Tensor
    keys: list[str]
    meta: torch.Tensor | None = None


class _Jpeg(NamedTuple):
    """One sample's JPEG bytes and the origin of its size x size crop (after the resize to `size`)."""

    data: torch.Tensor
    top: int
    left: int
    size: int


@dataclass
class Encoded:
    """A batch still in JPEG bytes, for `decode="device"`: the loader workers only walk the tars, read each
    JPEG header and pick the crop (the same draws as a worker-side decode), and `pixels` decodes the batch
    on the training device (nvJPEG on a GPU), so the loader's CPU cost per image drops to the tar walk."""

    data: torch.Tensor  # uint8 [total bytes]: the batch's JPEG files back to back
    offsets: torch.Tensor  # int64 [B + 1]: sample i is data[offsets[i]:offsets[i + 1]]
    crops: torch.Tensor  # int64 [B, 2]: (top, left) of each crop
    size: int

    @classmethod
    def of(cls, jpegs: Sequence[_Jpeg]) -> Encoded:
        lengths = torch.tensor([0] + [len(j.data) for j in jpegs], dtype=torch.int64)
        return cls(
            torch.cat([j.data for j in jpegs]),
            lengths.cumsum(0),
            torch.tensor([[j.top, j.left] for j in jpegs], dtype=torch.int64),
            jpegs[0].size,
        )

    def __len__(self) -> int:
        return len(self.crops)

    def pin_memory(self) -> Encoded:  # the DataLoader's pin_memory thread calls this on CUDA
        return Encoded(self.data.pin_memory(), self.offsets, self.crops, self.size)

    def blobs(self) -> list[torch.Tensor]:
        bounds = self.offsets.tolist()
        return [self.data[a:b] for a, b in itertools.pairwise(bounds)]


def _decode_on(device, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One batched `decode_jpeg` on `device`. On CUDA it runs under a side stream: nvJPEG writes its outputs
    before the work queued on the caller's stream has run, into blocks the caching allocator recycled from
    that stream, so it overwrote tensors the previous training step was still reading (non-finite loss at
    step 2 of `bench e2e --decode device` on an H200; pytorch/vision#9606). Outputs allocated from the side
    stream's own pool, and marked as used by the caller's stream, only reuse memory nothing still reads."""
    device = torch.device(device)
    if device.type != "cuda":
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    caller, side = torch.cuda.current_stream(device), _side_stream(device)
    with torch.cuda.stream(side):
        decoded = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    caller.wait_stream(side)
    for image in decoded:
        image.record_stream(caller)  # freed later: not reused until the caller's stream is past its reads
    return decoded


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def pixels(batch: Batch, device) -> torch.Tensor:
    """The batch's uint8 images [B, 3, S, S] on `device`, contiguous: moved there (the workers' batches are
    channels_last, the layout their decoder writes; the transpose happens here, on the device), or, for an
    `Encoded` batch, decoded there in one batched `decode_jpeg` call, then resized and cropped as a worker
    would have (on the CPU the pixels equal the worker path's). An undecodable sample raises naming its id."""
    images = batch.images
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True).contiguous()
    blobs = images.blobs()
    try:
        decoded = _decode_on(device, blobs)
    except RuntimeError:
        for key, blob in zip(batch.keys, blobs):  # the batched call does not say which one: find it
            try:
                _decode_on(device, [blob])
            except RuntimeError as exc:
                raise CorruptDataError(
                    f"corrupt sample {key!r}: JPEG decode on {device} failed: {exc}"
                ) from exc
        raise
    size = images.size
    out = torch.empty((len(decoded), 3, size, size), dtype=torch.uint8, device=decoded[0].device)
    for i, (image, (top, left)) in enumerate(zip(decoded, images.crops.tolist())):
        if min(image.shape[-2:]) != size:
            image = TF.resize(image, [size], antialias=True)
        out[i] = image[:, top : top + size, left : left + size]
    return out


@dataclass(frozen=True)
class _Shard:
    url: str
    num_samples: int
    counts: tuple[int, ...]  # per class, in the class order
    stored_size: int  # shorter side the images were packed at
    keys: frozenset | None = None  # ids of the selected folds' samples (None: every sample of the shard)
    drop: frozenset = frozenset()  # ids of its samples left out (`exclude`)
    relabel: tuple[int, ...] | None = None  # label -> label in the merged classes, -1: left out (label maps)
    source: int = 0  # index of its folder among the training folders (source weights)


def _shards(
    dirs, folds=None, fetch: sources.Fetch | None = None, exclude: Exclusion | None = None, merge=None
) -> tuple[list[str], list[_Shard]]:
    """The shards to read; with `folds`, each counts only those folds' samples (the manifest's per-shard
    fold counts), so plans and quotas stay exact, and the stream drops the other samples by id; likewise
    without the samples `exclude` lists. A `labelmaps.Merge` relabels its mapped folders (read whole) into
    its classes. Each url is a `sources.Address` (what to expect, how to fetch it)."""
    classes, _, _ = dataset_info(dirs, folds, fetch, exclude, merge)
    shards = []
    for source, folder in enumerate(as_list(dirs)):
        manifest = read_manifest(folder, fetch)
        stored = int(manifest.get("params", {}).get("size", 0))
        relabel = None if merge is None else merge.of(folder)
        index = None if merge is None else merge.index(folder, manifest["classes"])
        picked, keys = shard_selection(manifest, folder, None if relabel else folds, exclude, relabel)
        for rec, num_samples, shard_counts in picked:
            url = sources.shard(folder, rec, fetch)
            if not sources.is_remote(url) and not sources.exists(url):
                raise UsageError(f"shard {url} listed in {sources.join(folder, MANIFEST)} is missing")
            counts = tuple(int(shard_counts.get(c, 0)) for c in classes)
            if num_samples > 0:
                drop = frozenset(i for i, _ in exclude.of(folder, rec["name"])) if exclude else frozenset()
                shards.append(_Shard(url, num_samples, counts, stored, keys, drop, index, source))
    return classes, shards


def _plan(
    shards: list[_Shard], world_size: int, workers: int, order_seed: int | None
) -> list[list[list[int]]]:
    """plan[rank][worker] = shard indices. Largest shard first into the emptiest slot (ties: lowest slot,
    and slot k belongs to rank k % world_size so ranks alternate). The slot loads depend only on the
    shard sizes, so they are the same every epoch; `order_seed` only permutes equally sized shards."""
    order = list(range(len(shards)))
    if order_seed is not None:
        random.Random(order_seed).shuffle(order)
    order.sort(key=lambda i: -shards[i].num_samples)  # stable: the shuffle survives among equals
    nslots = world_size * workers
    loads, slots = [0] * nslots, [[] for _ in range(nslots)]
    for i in order:
        k = min(range(nslots), key=lambda s: (loads[s], s))
        slots[k].append(i)
        loads[k] += shards[i].num_samples
    return [[slots[w * world_size + r] for w in range(workers)] for r in range(world_size)]


def _quotas(loads: list[list[int]], batch_size: int, max_batches: int) -> tuple[int, list[list[int]]]:
    """Batches per rank (the same for all) and per (rank, worker). A worker batches its own stream, so it
    needs ceil(load / B) batches to show every sample; the rank with most needs sets the epoch length
    and the others pad: the extra batches go round-robin to their workers, which cycle their shards."""
    natural = [[math.ceil(n / batch_size) for n in rank] for rank in loads]
    per_rank = max(sum(r) for r in natural)
    if max_batches > 0:
        per_rank = min(per_rank, max_batches)
    quotas = []
    for nat in natural:
        q, left = [0] * len(nat), per_rank
        active = [w for w, n in enumerate(nat) if n > 0]
        while left:  # first up to each worker's natural count (spread evenly when capped), then pad
            short = [w for w in active if q[w] < nat[w]] or active
            for w in short[:left]:
                q[w] += 1
            left -= len(short[:left])
        quotas.append(q)
    return per_rank, quotas


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _decode(
    sample: dict,
    size: int,
    stored: dict[str, int],
    rng: random.Random | None,
    features: Callable[[dict], Sequence[float]] | None = None,
):
    """Raw sample -> (uint8 [3,size,size], label, key, metadata features or None). Shorter side to `size`
    (a no-op when packed at the training size), then a random (train) or centre (eval) square crop along
    the longer side. `features` maps the sample's JSON record to its metadata feature vector."""
    data = sample["jpg"]
    if stored.get(sample["__url__"], 0) >= DRAFT_FACTOR * size:
        # A big stored image: PIL decodes straight at 1/2..1/8 scale, far cheaper than a full decode.
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    else:
        # torchvision's libjpeg-turbo decode straight to CHW: ~1.8x PIL decode + array conversion.
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if min(image.shape[-2:]) != size:
        image = TF.resize(image, [size], antialias=True)
    top, left = _crop_origin(*image.shape[-2:], size, rng)
    meta = None if features is None else features(json.loads(sample["json"]))
    return image[:, top : top + size, left : left + size], int(sample["cls"]), sample["__key__"], meta


def _encode(
    sample: dict,
    size: int,
    stored: dict[str, int],
    rng: random.Random | None,
    features: Callable[[dict], Sequence[float]] | None = None,
):
    """`_decode` for `decode="device"`: the JPEG bytes and the crop `_decode` would take (the same random
    draws), from the header alone; the image is decoded later by `pixels`."""
    data = sample["jpg"]
    with Image.open(io.BytesIO(data)) as im:  # parses the header only
        if im.format != "JPEG":
            raise ValueError(f"not a JPEG but {im.format}")
        w, h = im.size
    if min(h, w) != size:  # torchvision's resize of the shorter side: the longer one is truncated
        h, w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    top, left = _crop_origin(h, w, size, rng)
    meta = None if features is None else features(json.loads(sample["json"]))
    jpeg = _Jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), top, left, size)
    return jpeg, int(sample["cls"]), sample["__key__"], meta


def _crop_origin(h: int, w: int, size: int, rng: random.Random | None) -> tuple[int, int]:
    """(top, left) of the square crop: random in training, centred in evaluation."""
    if rng is None:
        return (h - size) // 2, (w - size) // 2
    return rng.randint(0, h - size), rng.randint(0, w - size)


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 [B, 3, S, S] in channels_last memory, the decoders' own HWC layout: each image goes in as row
    copies, where `torch.stack` into the default layout transposed every pixel (0.25 vs 0.04 CPU ms per
    224 px image on a 2-core EPYC: the largest cost after the decode; docs/performance.md). Inside a
    worker the batch is allocated in shared memory, as default_collate does: no copy on the way out."""
    c, h, w = images[0].shape
    shape = (len(images), h, w, c)
    if get_worker_info() is None:
        out = torch.empty(shape, dtype=torch.uint8)
    else:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    out = out.permute(0, 3, 1, 2)
    for slot, image in zip(out, images):
        slot.copy_(image)
    return out


def _collate(samples: list[tuple]) -> Batch:
    images, labels, keys, meta = zip(*samples)
    return Batch(
        Encoded.of(images) if isinstance(images[0], _Jpeg) else _stack(images),
        torch.tensor(labels, dtype=torch.int64),
        list(keys),
        None if meta[0] is None else torch.tensor(np.asarray(meta, dtype=np.float32)),
    )


def _tar_samples(url: str) -> Iterator[dict]:
    """Samples of one shard, `{"__key__", "__url__", ext: bytes}` as wds groups them (key = member name up
    to the first dot of its base name). A lean ustar/pax walk over a stream read front to back, one member
    in memory at a time: wds's generic tarfile pipeline costs ~1.5 ms per sample, as much as decoding the
    JPEG itself, and this ~0.1 ms (`lesionkit bench loader` shows both). Truncated or garbled shards raise
    naming the shard."""
    with sources.open_stream(url) as f:
        off, sample, long_name = 0, None, None
        while True:
            header = f.read(512)
            if not header or header[0] == 0:  # end of the stream, or end-of-archive blocks
                break
            if len(header) < 512:
                raise CorruptDataError(
                    f"shard {url} is truncated: a tar header ends at byte {off + len(header)}"
                )
            try:
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
                name = (
                    header[345:500].split(b"\0", 1)[0] + b"/"
                    if header[345] and header[257:262] == b"ustar"
                    else b""
                ) + header[:100].split(b"\0", 1)[0]
            except ValueError:
                raise CorruptDataError(f"shard {url} is corrupt: bad tar header at byte {off}") from None
            kind, padded = header[156:157], (size + 511) // 512 * 512
            block = f.read(padded)
            off += 512 + len(block)
            if len(block) < padded:  # a tar member always fills its 512-byte blocks
                raise CorruptDataError(
                    f"shard {url} is truncated: member {name.decode(errors='replace')} ends past byte {off}"
                )
            payload = block[:size]
            if kind == b"x":  # pax extended header: only a long `path` matters here
                for record in payload.split(b"\n"):
                    if b" path=" in record:
                        long_name = record.split(b" path=", 1)[1]
                continue
            if kind == b"L":  # GNU long name
                long_name = payload.rstrip(b"\0")
                continue
            if long_name is not None:
                name, long_name = long_name, None
            if kind not in (b"0", b"\0", b"7"):
                continue
            name = name.decode("utf-8")
            folder, _, base = name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = payload
    if sample is not None:
        yield sample


def _read(urls: list[str], skip_bad: bool = False) -> Iterator[dict]:
    """Raw samples of `urls` in this order (the plan already split and ordered the shards). With
    `skip_bad` an unreadable shard is logged and the rest of it skipped instead of raising."""
    for url in urls:
        try:
            yield from _tar_samples(url)
        except (OSError, ValueError, CorruptDataError) as exc:
            if not skip_bad:
                raise
            log.warning("skipped the rest of shard %s: %s", url, exc)


def shard_samples(location, fetch: sources.Fetch | None = None) -> Iterator[tuple[str, dict]]:
    """(shard name, raw sample `{"__key__", "jpg", "json", ...}`) of every sample of a shard folder, shard
    by shard; `fetch` for a remote folder (retries, the cache, sha256 checks)."""
    for rec in read_manifest(location, fetch)["shards"]:
        for sample in _tar_samples(sources.shard(location, rec, fetch)):
            yield rec["name"], sample


def sample_records(location, fetch: sources.Fetch | None = None) -> Iterator[tuple[str, dict]]:
    """(shard name, JSON record) of every sample of a shard folder, shard by shard: what `lesionkit split`
    reads to learn each sample's label and group ids without decoding an image."""
    for name, sample in shard_samples(location, fetch):
        yield name, json.loads(sample["json"])


def exclusion(dirs, ids, fetch: sources.Fetch | None = None) -> Exclusion:
    """The training samples of `dirs` whose id is in `ids` (`TrainConfig.exclude`), found by reading every
    sample's JSON record once (shard and class per id), so the loader plans its batches without them."""
    ids = frozenset(ids)
    found: dict[str, dict[str, list]] = {}
    for folder in as_list(dirs):
        for shard, record in sample_records(folder, fetch):
            if record["id"] in ids:
                found.setdefault(folder, {}).setdefault(shard, []).append(
                    (record["id"], record["label_name"])
                )
    return Exclusion(ids, {f: {s: tuple(v) for s, v in shards.items()} for f, shards in found.items()})


def read_with_webdataset(urls: list[str], skip_bad: bool = False) -> Iterator[dict]:
    """The same samples through `wds.WebDataset` (shards split and ordered by the plan already, so no
    splitters and shardshuffle=False): the reference `_tar_samples` is tested and benchmarked against."""
    handler = wds.warn_and_continue if skip_bad else wds.reraise_exception
    return iter(
        wds.WebDataset(
            urls,
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            handler=handler,
            empty_check=False,
        )
    )


def _cycle(
    read: Callable,
    urls: list[str],
    rng: random.Random,
    skip_bad: bool,
    buffer: int,
    select: Callable | None = None,
) -> Iterator[dict]:
    """The worker's shards over and over, each pass in a new shard order and shuffled through a buffer of
    `buffer` samples. Shuffling within a pass keeps the first pass a permutation: every sample once."""
    urls = list(urls)
    while True:
        rng.shuffle(urls)
        samples = read(urls, skip_bad)
        if select is not None:
            samples = filter(select, samples)
        count = 0
        for sample in wds.shuffle(buffer, buffer, rng=rng)(samples):
            count += 1
            yield sample
        if not count:
            raise CorruptDataError(f"no readable samples in shards {urls}")


def _source_mix(holdings: list[list[int]], quotas: list[int], weights: list[float]) -> list[list[float]]:
    """mix[slot][source]: the probability that loader slot `slot` draws its next sample from `source`, so
    that all slots together (slot k yields quotas[k] batches) draw each source with the share
    weights[s] / sum(weights). A slot can only draw the sources it holds shards of (`holdings[k][s]`
    samples), so one factor per source is fitted (iterative proportional fitting) instead of giving every
    slot the target shares: with few shards per source, many slots hold one source only."""
    nsources, total = len(weights), sum(quotas) or 1
    target = [w / sum(weights) for w in weights]
    factor = [1.0 if w > 0 else 0.0 for w in weights]

    def mix() -> list[list[float]]:
        rows = []
        for held in holdings:
            raw = [factor[s] * held[s] for s in range(nsources)]
            norm = sum(raw)
            rows.append([r / norm if norm else 0.0 for r in raw])
        return rows

    for _ in range(200):
        rows = mix()
        got = [sum(q * row[s] for q, row in zip(quotas, rows)) / total for s in range(nsources)]
        if max(abs(g - t) for g, t in zip(got, target)) < 1e-6:
            break
        factor = [f * t / g if g > 0 else f for f, t, g in zip(factor, target, got)]
    return mix()


def _weighted_mix(streams: list[Iterator], weights: list[float], rng: random.Random) -> Iterator:
    """wds.RandomMix with a seeded generator: the next sample comes from stream i with p ~ weights[i]."""
    cum = list(itertools.accumulate(weights))
    while True:
        yield next(streams[bisect.bisect_right(cum, rng.random() * cum[-1])])


class _Stream(IterableDataset):
    """One (rank, worker) slot's batches; the same object serves training and evaluation."""

    read = staticmethod(_read)  # urls, skip_bad -> raw samples; `lesionkit bench loader` swaps in wds

    def __init__(
        self,
        shards: list[_Shard],
        classes: list[str],
        *,
        train: bool,
        image_size: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        workers: int,
        shuffle_buffer: int = 0,
        class_weights: list[float] | None = None,
        batch_transform: Callable | None = None,
        skip_corrupt: bool = False,
        max_batches: int = 0,
        features: Callable[[dict], Sequence[float]] | None = None,
        decode: str = "workers",
        source_weights: list[float] | None = None,
    ):
        super().__init__()
        self.shards, self.classes, self.train = shards, classes, train
        self.image_size, self.batch_size, self.seed, self.epoch = image_size, batch_size, seed, epoch
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers)
        self.shuffle_buffer, self.class_weights = shuffle_buffer, class_weights
        self.batch_transform, self.skip_corrupt, self.max_batches = batch_transform, skip_corrupt, max_batches
        self.features = features
        self.prepare = _decode if decode == "workers" else _encode  # "device": JPEG bytes to `pixels`
        self.stored = {s.url: s.stored_size for s in shards}
        self.keys = {s.url: s.keys for s in shards}  # fold selection: the ids to keep per shard
        self.drop = {s.url: s.drop for s in shards}  # `exclude`: the ids to leave out per shard
        self.relabel = {s.url: s.relabel for s in shards}  # label maps: label -> merged label (-1: out)
        self.source_weights = source_weights
        # Samples skipped as corrupt, shared with the loader workers so the trainer can report the count.
        self.skipped = multiprocessing.Value("q", 0)
        loads = [
            [sum(shards[i].num_samples for i in slot) for slot in rank_slots]
            for rank_slots in self.plan(epoch)
        ]
        if train:
            self.num_batches, self.all_quotas = _quotas(loads, batch_size, max_batches)
            self.quotas = self.all_quotas[rank]
        else:  # every sample once: each worker ends with its own partial batch
            self.quotas = [math.ceil(n / batch_size) for n in loads[rank]]
            self.num_batches = sum(self.quotas)

    def plan(self, epoch: int) -> list[list[list[int]]]:
        return _plan(
            self.shards,
            self.world_size,
            self.workers,
            seeds.derive(seeds.PLAN, self.seed, epoch) if self.train else None,
        )

    def __iter__(self):
        worker, num_workers = _worker()
        if num_workers != self.workers:
            raise RuntimeError(f"stream planned for {self.workers} workers runs in {num_workers}")
        epoch = self.epoch
        self.epoch += 1  # persistent workers keep this copy: the next pass is the next epoch
        urls = [self.shards[i].url for i in self.plan(epoch)[self.rank][worker]]
        quota = self.quotas[worker]
        if not quota:
            return
        if not self.train:
            samples = self._decoded(self._selected(urls), None, urls)
            batches = wds.batched(self.batch_size, collation_fn=_collate, partial=True)(samples)
            yield from self._transformed(batches, (-1, 0, self.rank, worker))
            return
        rng = seeds.rng(seeds.SHUFFLE, self.seed, epoch, self.rank, worker)
        if self.class_weights is not None:
            raw = self._balanced(urls, rng)
        elif self.source_weights is not None:
            raw = self._by_source(epoch, worker, rng)
        else:
            raw = _cycle(self._read_counted, urls, rng, self.skip_corrupt, self.shuffle_buffer)
        batches = wds.batched(self.batch_size, collation_fn=_collate, partial=False)(
            self._decoded(raw, rng, urls)
        )
        yield from self._transformed(itertools.islice(batches, quota), (self.seed, epoch, self.rank, worker))

    def _balanced(self, urls: list[str], rng: random.Random) -> Iterator[dict]:
        """Per-class streams over this worker's shards mixed by class weight: the stream counterpart of
        WeightedRandomSampler (minority classes are oversampled by cycling, majority ones undersampled).
        A worker draws class c with p ~ weight_c x (its share of all class-c samples), so the workers
        together hit the weights even when shards do not mix classes evenly."""
        mine = [s for s in self.shards if s.url in urls]
        totals = [sum(s.counts[c] for s in self.shards) for c in range(len(self.classes))]
        mix = {
            c: self.class_weights[c] * sum(s.counts[c] for s in mine) / totals[c]
            for c in range(len(self.classes))
            if totals[c]
        }
        present = [c for c, w in mix.items() if w > 0]
        if not present:
            raise UsageError(f"shards {urls} hold no sample of a class with a positive weight")
        buffer = max(1, self.shuffle_buffer // len(present))
        streams = [
            _cycle(
                self._read_counted,
                urls,
                random.Random(rng.random()),
                self.skip_corrupt,
                buffer,
                lambda s, c=c: _label(s) == c,
            )
            for c in present
        ]
        return _weighted_mix(streams, [mix[c] for c in present], rng)

    def _by_source(self, epoch: int, worker: int, rng: random.Random) -> Iterator[dict]:
        """Per-source streams over this worker's shards, mixed so that all workers together draw each
        training folder with its `source_weights` share (`_source_mix`): a small release is cycled, a
        big one undersampled, and the epoch keeps its length."""
        plan = self.plan(epoch)
        nsources = len(self.source_weights)
        slots = [slot for rank_slots in plan for slot in rank_slots]
        holdings = [[0] * nsources for _ in slots]
        for k, slot in enumerate(slots):
            for i in slot:
                holdings[k][self.shards[i].source] += self.shards[i].num_samples
        quotas = [q for rank_quotas in self.all_quotas for q in rank_quotas]
        mine = plan[self.rank][worker]
        mix = _source_mix(holdings, quotas, self.source_weights)[self.rank * self.workers + worker]
        present = [s for s in range(nsources) if mix[s] > 0]
        buffer = max(1, self.shuffle_buffer // len(present))
        streams = [
            _cycle(
                self._read_counted,
                [self.shards[i].url for i in mine if self.shards[i].source == s],
                random.Random(rng.random()),
                self.skip_corrupt,
                buffer,
            )
            for s in present
        ]
        return _weighted_mix(streams, [mix[s] for s in present], rng)

    def _selected(self, urls: list[str], skip_bad: bool = False) -> Iterator[dict]:
        """`read`, keeping only the selected folds' samples (all of them when no folds were selected) that
        are not excluded, with labels mapped into the merged classes (`labelmaps`)."""
        if all(self.keys[url] is None and not self.drop[url] and self.relabel[url] is None for url in urls):
            yield from self.read(urls, skip_bad)
            return
        for url in urls:
            keys, drop, relabel = self.keys[url], self.drop[url], self.relabel[url]
            for s in self.read([url], skip_bad):
                if (keys is not None and s["__key__"] not in keys) or s["__key__"] in drop:
                    continue
                if relabel is not None:
                    label = _label(s)
                    label = relabel[label] if 0 <= label < len(relabel) else -1
                    if label < 0:
                        continue
                    s = {**s, "cls": str(label).encode()}
                yield s

    def _read_counted(self, urls: list[str], skip_bad: bool) -> Iterator[dict]:
        """`read`, counting the samples an unreadable rest of a shard cost (skip_bad skips it)."""
        expected = {s.url: s.num_samples for s in self.shards}
        for url in urls:
            n = 0
            for sample in self._selected([url], skip_bad):
                n += 1
                yield sample
            self._count_skipped(expected[url] - n)

    def _count_skipped(self, n: int) -> int:
        with self.skipped.get_lock():
            self.skipped.value += max(n, 0)
            return self.skipped.value

    def _decoded(self, raw: Iterator[dict], rng: random.Random | None, urls: list[str]) -> Iterator[tuple]:
        """Decode the stream; a corrupt sample raises naming shard and key, or (skip_corrupt) is logged
        and skipped: the cycling stream then supplies another, so the batch count stays the same."""
        limit = sum(s.num_samples for s in self.shards if s.url in urls)
        failures = 0
        for sample in raw:
            try:
                item = self.prepare(sample, self.image_size, self.stored, rng, self.features)
            except Exception as exc:
                where = f"sample {sample.get('__key__')!r} in shard {sample.get('__url__')}"
                if not self.skip_corrupt:
                    hint = " (skip_corrupt skips such samples)" if self.train else ""
                    raise CorruptDataError(f"corrupt {where}: {exc}{hint}") from exc
                failures += 1
                log.warning(
                    "skipped corrupt %s: %s (%d skipped by this process)", where, exc, self._count_skipped(1)
                )
                if failures > limit:
                    raise CorruptDataError(f"no decodable samples in shards {urls}") from exc
                continue
            failures = 0
            yield item

    def _transformed(self, batches: Iterable[Batch], stream_id: tuple[int, ...]) -> Iterator[Batch]:
        """Apply `batch_transform`, with torch's RNG seeded from (stream, batch index) so a worker-side
        random augmentation depends on nothing but the epoch plan: a resumed run replays it exactly."""
        for index, batch in enumerate(batches):
            if self.batch_transform is not None and isinstance(batch.images, Encoded):
                raise UsageError("augmentation in the loader workers needs decode='workers'")
            if self.batch_transform is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seeds.derive(seeds.WORKER_BATCH, *stream_id, index))
                    batch = batch._replace(images=self.batch_transform(batch.images))
            yield batch


def _label(sample: dict) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        return -1  # no class stream selects it; a sample without a label never reaches training


class ShardLoader:
    """What train_loader/eval_loader return: iterate once per epoch; `len()` is the batches per epoch.

    Each pass over a training loader is the next epoch (a new shard plan and shuffle); `set_epoch(e)`
    jumps to epoch e (e.g. after a resume) and is a no-op when e is the epoch the next pass reads.
    """

    def __init__(self, stream: _Stream, workers: int, prefetch_factor: int):
        self.stream, self.workers, self.prefetch_factor = stream, workers, prefetch_factor
        self.next_epoch = stream.epoch
        self._loader = self._build()

    def _build(self):
        kw = {"persistent_workers": True, "prefetch_factor": self.prefetch_factor} if self.workers > 0 else {}
        return wds.WebLoader(
            self.stream, batch_size=None, num_workers=self.workers, pin_memory=torch.cuda.is_available(), **kw
        )

    def __len__(self) -> int:
        return self.stream.num_batches

    @property
    def skipped(self) -> int:
        """Corrupt samples this process's workers have skipped so far (training with skip_corrupt)."""
        return self.stream.skipped.value

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.next_epoch:  # worker copies count epochs themselves: restart them at `epoch`
            self.stream.epoch = self.next_epoch = epoch
            self._loader = self._build()

    def __iter__(self):
        self.next_epoch += 1
        return iter(self._loader)


DECODE = ("workers", "device")


def _checked_decode(decode: str) -> str:
    if decode not in DECODE:
        raise UsageError(f"decode must be one of {', '.join(DECODE)}, got {decode!r}")
    return decode


def _check_common(image_size: int, batch_size: int, workers: int, rank: int, world_size: int) -> None:
    for name, value, low in (
        ("image_size", image_size, 1),
        ("batch_size", batch_size, 1),
        ("workers", workers, 0),
        ("world_size", world_size, 1),
    ):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is outside world_size {world_size}")


def train_loader(
    dirs,
    *,
    image_size: int,
    batch_size: int,
    workers: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    shuffle_buffer: int = 500,
    balanced: bool = False,
    class_weights: Sequence[float] | None = None,
    batch_transform: Callable | None = None,
    skip_corrupt: bool = False,
    max_batches: int = 0,
    prefetch_factor: int = 2,
    features: Callable[[dict], Sequence[float]] | None = None,
    folds: Sequence[int] | None = None,
    fetch: sources.Fetch | None = None,
    decode: str = "workers",
    exclude: Exclusion | None = None,
    merge=None,
    source_weights: Sequence[float] | None = None,
) -> ShardLoader:
    """Training `Batch`es, full batches only, `len()` equal on all ranks.

    `balanced` draws classes with `class_weights` (default: equal); `batch_transform` runs in the
    worker on the uint8 batch (picklable); `skip_corrupt` skips undecodable samples with a warning
    instead of failing; `max_batches` > 0 caps the epoch (smoke runs); `features` (picklable) turns each
    sample's JSON record into its metadata features (`Batch.meta`); `folds` reads only those folds of
    each folder's split (`lesionkit split`); `fetch` says how remote shards are fetched (retries, cache);
    `decode="device"` yields `Encoded` batches for `pixels` to decode on the training device; `exclude`
    leaves samples out by id (`data.exclusion`; the dedup list of `TrainConfig.exclude`); `merge` (a
    `labelmaps.Merge`) maps folders of other releases into one label space; `source_weights` (one per
    folder, > 0) draws each folder with that share of the samples.
    """
    _check_common(image_size, batch_size, workers, rank, world_size)
    classes, shards = _shards(dirs, folds, fetch, exclude, merge)
    if source_weights is not None:
        source_weights = [float(w) for w in source_weights]
        if len(source_weights) != len(as_list(dirs)) or min(source_weights) <= 0:
            raise UsageError(
                f"source_weights {source_weights} must be {len(as_list(dirs))} positive numbers, one per "
                f"training folder ({', '.join(as_list(dirs))})"
            )
        if balanced:
            raise UsageError("balanced and source_weights both decide what is drawn: use one of them")
        empty = [d for i, d in enumerate(as_list(dirs)) if not any(s.source == i for s in shards)]
        if empty:
            raise UsageError(f"source_weights: {', '.join(empty)} has no training samples to draw")
    slots = world_size * max(1, workers)
    if len(shards) < slots:
        total = sum(s.num_samples for s in shards)
        raise UsageError(
            f"{len(shards)} shard(s) in {', '.join(as_list(dirs))} but {world_size} process(es) x "
            f"{max(1, workers)} loader worker(s) need at least {slots} (each worker streams whole shards); "
            f"repack with a smaller --shard-size (at most {max(1, total // slots)} for {total} samples) "
            f"or use fewer workers"
        )
    weights = None
    if balanced:
        weights = [1.0] * len(classes) if class_weights is None else [float(w) for w in class_weights]
        if len(weights) != len(classes) or min(weights) < 0 or sum(weights) <= 0:
            raise UsageError(
                f"class_weights {list(class_weights)} must be {len(classes)} non-negative "
                f"numbers (classes {classes}), not all zero"
            )
    stream = _Stream(
        shards,
        classes,
        train=True,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        workers=workers,
        shuffle_buffer=max(1, shuffle_buffer),
        class_weights=weights,
        batch_transform=batch_transform,
        skip_corrupt=skip_corrupt,
        max_batches=max_batches,
        features=features,
        decode=_checked_decode(decode),
        source_weights=source_weights,
    )
    return ShardLoader(stream, workers, prefetch_factor)


def eval_loader(
    dirs,
    *,
    image_size: int,
    batch_size: int,
    workers: int,
    rank: int,
    world_size: int,
    prefetch_factor: int = 2,
    features: Callable[[dict], Sequence[float]] | None = None,
    folds: Sequence[int] | None = None,
    fetch: sources.Fetch | None = None,
    decode: str = "workers",
) -> ShardLoader:
    """Evaluation `Batch`es: in shard order, centre crop, every sample (of `folds`, when given)
    exactly once across all ranks and workers (batch counts may differ per rank: gather by key at the
    end, never per batch). Corrupt samples raise, naming shard and key. `decode` as in `train_loader`."""
    _check_common(image_size, batch_size, workers, rank, world_size)
    classes, shards = _shards(dirs, folds, fetch)
    stream = _Stream(
        shards,
        classes,
        train=False,
        image_size=image_size,
        batch_size=batch_size,
        seed=0,
        epoch=0,
        rank=rank,
        world_size=world_size,
        workers=workers,
        features=features,
        decode=_checked_decode(decode),
    )
    return ShardLoader(stream, workers, prefetch_factor)
