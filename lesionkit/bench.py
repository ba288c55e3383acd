"""`lesionkit bench`: throughput benchmarks, each next to the baseline it replaces, in one run.

Every benchmark is one function `bench_<name>(args) -> int` that times a few cases with
`measure()` (median over --repeats, after one untimed warm-up) and hands the rows to `report()`,
which prints a table with each case's ratio to the baseline and one JSON line (also appended to
--out) so numbers in the README can be traced to the exact command.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def measure(run: Callable[[], int], repeats: int, warmup: int = 1) -> dict:
    """Call `run` (returns items processed) warmup + repeats times; median items/s of the timed calls."""
    for _ in range(warmup):
        run()
    rates, items = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        items = run()
        rates.append(items / (time.perf_counter() - start))
    return {"items_per_s": statistics.median(rates), "runs": [round(r, 1) for r in rates], "items": items}


def report(bench: str, cases: dict[str, dict], baseline: str, params: dict, out: str | None,
           unit: str = "images/s") -> dict:
    """Print `case  unit  ratio-to-baseline` and a JSON line; append the line to `out` when given."""
    base = cases[baseline]["items_per_s"]
    width = max(len(name) for name in cases)
    print(f"{'case':<{width}}  {unit:>12}  {'vs ' + baseline:>12}  runs")
    for name, row in cases.items():
        row["ratio"] = round(row["items_per_s"] / base, 3)
        print(f"{name:<{width}}  {row['items_per_s']:12.1f}  {row['ratio']:11.2f}x  {row['runs']}")
    record = {"bench": bench, "unit": unit, "baseline": baseline, "cases": cases, "params": params,
              "host": platform.node(), "python": platform.python_version(), "time": time.strftime("%FT%T%z")}
    line = json.dumps(record)
    print(line)
    if out:
        with open(out, "a", encoding="utf-8") as sink:
            sink.write(line + "\n")
    return record


# --- loader: shard stream vs the seed's per-file PIL Dataset ---------------------------------------

class _PilFiles:
    """The seed-style baseline: a map-style Dataset that opens each original JPEG with PIL and resizes it
    to the training size, per sample (torch's default collate batches the results)."""

    def __init__(self, paths: list[str], labels: list[int], size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            image = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), self.labels[i]


def _count_images(loader, epochs: int) -> int:
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch[0])
    return n


def bench_loader(args) -> int:
    import torch

    from lesionkit.data import read_manifest, read_with_webdataset, train_loader
    from lesionkit.ingest import collect

    manifest = read_manifest(args.dir)
    images = args.images or manifest["sources"]["images"]
    labels = args.labels or manifest["sources"]["labels"]
    size = args.image_size or int(manifest["params"]["size"])
    table = collect(images, labels, skip_bad=True).table
    table = table[table["id"].isin(_shard_ids(manifest))]  # the same images as the shards hold
    if len(table) != manifest["num_samples"]:
        raise SystemExit(f"lesionkit bench loader: error: {args.dir} holds {manifest['num_samples']} samples "
                         f"but only {len(table)} of them are in {images} + {labels}")

    def shards(read=None) -> int:
        loader = train_loader(args.dir, image_size=size, batch_size=args.batch_size, workers=args.workers,
                              seed=0, epoch=0, rank=0, world_size=1)
        if read is not None:  # same stream, tars parsed by wds.WebDataset: why data.py has its own reader
            loader.stream.read = read
        return _count_images(loader, args.epochs)

    def files() -> int:
        dataset = _PilFiles(list(table["path"]), list(table["label"]), size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0)
        return _count_images(loader, args.epochs)

    cases = {"shards": measure(shards, args.repeats),
             "shards, wds tar reader": measure(lambda: shards(read_with_webdataset), args.repeats),
             "files (seed)": measure(files, args.repeats)}
    params = {"dir": str(args.dir), "images": str(images), "num_samples": len(table), "image_size": size,
              "stored_size": manifest["params"].get("size"), "batch_size": args.batch_size,
              "workers": args.workers, "epochs": args.epochs, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads()}
    report("loader", cases, "files (seed)", params, args.out)
    return 0


def _shard_ids(manifest: dict) -> set[str]:
    """Ids in the shards, from the manifest's sources minus what pack skipped (no need to read the tars)."""
    from lesionkit.ingest import read_labels

    table, _ = read_labels(manifest["sources"]["labels"])
    return set(table["id"]) - {s["id"] for s in manifest.get("skipped", [])}


# --- aug: each augmentation preset beside a resnet18 training step; where to run it -------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _augmented_batches(batch, aug):
    """An endless stream of one uint8 batch pushed through `aug` in a loader worker (the "workers"
    placement: augmentation overlaps the training step in another process)."""
    import torch

    class AugmentedBatches(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield aug(batch)

    return AugmentedBatches()


def bench_aug(args) -> int:
    import itertools

    import torch
    import torchvision

    from lesionkit.augment import PRESETS, build_augment, choose_placement

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu)")
    if args.image_size < 32 or args.placement_batches < 1 or args.workers < 1:
        raise ValueError("--image-size must be >= 32, --placement-batches and --workers >= 1")
    presets = args.presets or list(PRESETS)
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = torch.device(args.device), args.device == "cuda"
    size, bs = args.image_size, args.batch_size
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (bs,), generator=gen).to(device)
    stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet, as resnet18 expects

    model = torchvision.models.resnet18(num_classes=3).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(images) -> None:
        images = images.to(device, non_blocking=True)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn):
        def run() -> int:
            fn()
            _sync(device)
            return 1
        return run

    on_device = batch.to(device)
    normalized = build_augment("none", size, *stats).to(device).eval()(on_device)
    cases = {}
    for preset in presets:
        aug = build_augment(preset, size, *stats).to(device).train()
        cases[preset] = measure(timed(lambda aug=aug: aug(on_device)), args.repeats)
    cases["resnet18 step"] = measure(timed(lambda: step(normalized)), args.repeats)
    step_ms = 1000 / cases["resnet18 step"]["items_per_s"]
    for row in cases.values():
        row["ms_per_batch"] = round(1000 / row["items_per_s"], 2)
        row["share_of_step"] = round(row["ms_per_batch"] / step_ms, 3)
    params = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor(),
              "batch_size": bs, "image_size": size, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
              "step": "resnet18 fwd+bwd+SGD" + (", bf16 autocast, channels_last" if cuda else ", fp32")}
    report("aug", cases, "resnet18 step", params, args.out, unit="batches/s")
    for name, row in cases.items():
        print(f"{name:<14} {row['ms_per_batch']:9.1f} ms/batch  {100 * row['share_of_step']:6.1f} % of a step")

    # Placement: k training steps per run, augmenting in the main process vs in loader workers.
    preset, k = args.placement_preset, args.placement_batches
    aug = build_augment(preset, size, *stats).train()
    device_aug = build_augment(preset, size, *stats).to(device).train()

    def serial() -> int:
        for _ in range(k):
            step(device_aug(on_device))
        _sync(device)
        return k

    loader = torch.utils.data.DataLoader(_augmented_batches(batch, aug), batch_size=None, num_workers=args.workers,
                                         prefetch_factor=2, pin_memory=cuda)
    stream = iter(loader)

    def workers() -> int:
        for images in itertools.islice(stream, k):
            step(images)
        _sync(device)
        return k

    def step_only() -> int:
        for _ in range(k):
            step(normalized)
        _sync(device)
        return k

    placements = {"step only": measure(step_only, args.repeats), "device": measure(serial, args.repeats),
                  "workers": measure(workers, args.repeats)}
    for row in placements.values():
        row["ms_per_batch"] = round(1000 / row["items_per_s"], 2)
    faster = min(("device", "workers"), key=lambda name: placements[name]["ms_per_batch"])
    chosen = choose_placement(device.type, preset)
    report("aug-placement", placements, "step only", {**params, "preset": preset, "batches_per_run": k,
           "workers": args.workers, "faster": faster, "choose_placement": chosen}, args.out, unit="batches/s")
    for name, row in placements.items():
        print(f"{name:<10} {row['ms_per_batch']:9.1f} ms per training batch ({preset})")
    print(f"faster here: {faster}; choose_placement({device.type!r}, {preset!r}) = {chosen!r}")
    return 0


# --- command line -------------------------------------------------------------------------------------

def _add_common(parser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    parser.add_argument("--out", help="append the JSON result line to this file")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = sub.add_parser("loader", help="images/s of the shard stream vs a per-file PIL Dataset on the same images")
    p.add_argument("dir", type=Path, help="shard folder written by `lesionkit pack`")
    p.add_argument("--images", help="folder of the original images (default: the manifest's source)")
    p.add_argument("--labels", help="labels CSV of the original images (default: the manifest's source)")
    p.add_argument("--workers", type=int, default=2, help="loader workers, the same for both cases")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=0,
                   help="training size (default: the size the shards were packed at, so no resize)")
    p.add_argument("--epochs", type=int, default=1, help="passes per timed run (more for tiny folders)")
    _add_common(p)
    p.set_defaults(func=bench_loader)

    p = sub.add_parser("aug", help="ms/batch of each augmentation preset beside a resnet18 training step; "
                                   "augmenting on the device vs in loader workers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--presets", nargs="+", metavar="PRESET", help="default: all")
    p.add_argument("--placement-preset", default="derm", help="preset for the device-vs-workers comparison")
    p.add_argument("--placement-batches", type=int, default=3, help="training batches per timed placement run")
    p.add_argument("--workers", type=int, default=2, help="loader workers for the workers placement")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the main process (default: torch's); 1 on a busy shared CPU")
    _add_common(p)
    p.set_defaults(func=bench_aug, repeats=5)


def run(args) -> int:
    for flag in ("repeats", "batch_size", "epochs"):
        if getattr(args, flag, 1) < 1:
            raise SystemExit(f"lesionkit bench {args.bench}: error: --{flag.replace('_', '-')} must be >= 1")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"lesionkit bench {args.bench}: error: {exc}", file=sys.stderr)
        return 2
