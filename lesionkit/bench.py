"""`lesionkit bench`: throughput benchmarks, each next to the baseline it replaces, in one run.

Every benchmark is one function `bench_<name>(args) -> int` that times a few cases with
`measure()` (median over --repeats, after one untimed warm-up) and hands the rows to `report()`,
which prints a table with each case's ratio to the baseline and one JSON line (also appended to
--out) so numbers in the README can be traced to the exact command.
"""
from __future__ import annotations

import gc
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (loader workers, once shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(run: Callable[[], int], repeats: int, warmup: int = 1) -> dict:
    """Call `run` (returns items processed) warmup + repeats times; median items/s of the timed calls, and
    median CPU ms per item over all processes: the number that holds on a machine shared with others."""
    for _ in range(warmup):
        run()
    rates, cpu, items = [], [], 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        items = run()
        rates.append(items / (time.perf_counter() - start))
        gc.collect()  # finish off loaders so their workers' CPU time is counted
        cpu.append(1e3 * (_cpu_seconds() - start_cpu) / items)
    return {"items_per_s": statistics.median(rates), "runs": [round(r, 1) for r in rates], "items": items,
            "cpu_ms_per_item": round(statistics.median(cpu), 3)}


def report(bench: str, cases: dict[str, dict], baseline: str, params: dict, out: str | None,
           unit: str = "images/s") -> dict:
    """Print `case  unit  ratio-to-baseline` and a JSON line; append the line to `out` when given."""
    base = cases[baseline]["items_per_s"]
    width = max(len(name) for name in cases)
    print(f"{'case':<{width}}  {unit:>12}  {'vs ' + baseline:>12}  {'CPU ms/item':>11}  runs")
    for name, row in cases.items():
        row["ratio"] = round(row["items_per_s"] / base, 3)
        print(f"{name:<{width}}  {row['items_per_s']:12.1f}  {row['ratio']:11.2f}x  "
              f"{row.get('cpu_ms_per_item', float('nan')):11.2f}  {row['runs']}")
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

    from lesionkit.data import read_with_webdataset, train_loader
    from lesionkit.ingest import collect
    from lesionkit.pack import read_manifest

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


class _AugmentedBatches:
    """Map-style dataset whose every item is one uint8 batch pushed through `aug` in a loader worker (the
    "workers" placement: augmentation overlaps the training step in another process)."""

    def __init__(self, batch, aug, length: int = 10**6):
        self.batch, self.aug, self.length = batch, aug, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.aug(self.batch)


def _kornia_derm(size: int):
    """The baseline `derm` replaces: the same ops as stock Kornia augmentations in an AugmentationSequential
    (each geometric op resamples; elastic blurs a full-size noise field with a 63 px kernel)."""
    import kornia.augmentation as K
    import torch

    kernel = min(63, size // 2 * 2 - 1)
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.6, 1.0), p=0.7), K.RandomHorizontalFlip(),
        K.RandomVerticalFlip(), K.RandomRotation(180.0, p=0.75),
        K.RandomAffine(0.0, translate=(0.1, 0.1), scale=(0.9, 1.1), p=0.5),
        K.RandomElasticTransform(kernel_size=(kernel, kernel), p=0.25),
        K.ColorJitter(0.2, 0.2, 0.2, 0.05, p=0.8), K.RandomEqualize(p=0.1), K.RandomGrayscale(p=0.05),
        K.RandomGaussianNoise(std=0.03, p=0.2),
        K.Normalize(torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))))


def bench_aug(args) -> int:
    import torch

    from lesionkit.augment import PRESETS

    device = _device(args.device)
    if args.image_size < 32 or args.placement_batches < 1 or args.workers < 1:
        raise ValueError("--image-size must be >= 32, --placement-batches and --workers >= 1")
    presets = args.presets or list(PRESETS)
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    threads = torch.get_num_threads()
    _threads(args.threads)
    try:
        return _bench_aug(args, device, presets)
    finally:
        torch.set_num_threads(threads)  # the process (a test, say) goes on with its own setting


def _bench_aug(args, device, presets) -> int:
    import itertools

    import torch
    import torchvision

    from lesionkit.augment import build_augment, choose_placement

    cuda = device.type == "cuda"
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
    if "derm" in presets:
        kornia_derm = _kornia_derm(size).to(device)
        cases["derm, stock kornia"] = measure(timed(lambda: kornia_derm(on_device.float() / 255)), args.repeats)
    cases["resnet18 step"] = measure(timed(lambda: step(normalized)), args.repeats)
    step_ms = 1000 / cases["resnet18 step"]["items_per_s"]
    for row in cases.values():
        row["ms_per_batch"] = round(1000 / row["items_per_s"], 2)
        row["share_of_step"] = round(row["ms_per_batch"] / step_ms, 3)
    params = {**_machine(device), "batch_size": bs, "image_size": size, "repeats": args.repeats,
              "step": "resnet18 fwd+bwd+SGD" + (", bf16 autocast, channels_last" if cuda else ", fp32")}
    report("aug", cases, "resnet18 step", params, args.out, unit="batches/s")
    for name, row in cases.items():  # CPU ms: the steadier number on a shared machine
        print(f"{name:<18} {row['ms_per_batch']:9.1f} ms/batch  {100 * row['share_of_step']:6.1f} % of a step"
              f"  (CPU {row['cpu_ms_per_item']:.0f} ms)")

    # Placement: k training steps per run, augmenting in the main process vs in loader workers.
    preset, k = args.placement_preset, args.placement_batches
    aug = build_augment(preset, size, *stats).train()
    device_aug = build_augment(preset, size, *stats).to(device).train()

    def serial() -> int:
        for _ in range(k):
            step(device_aug(on_device))
        _sync(device)
        return k

    def workers() -> int:
        # A loader per run, so its workers exit and their CPU time is counted; the time includes filling
        # the pipeline (the first batch is not overlapped), as at the start of every epoch.
        loader = torch.utils.data.DataLoader(_AugmentedBatches(batch, aug), batch_size=None,
                                             num_workers=args.workers, prefetch_factor=2, pin_memory=cuda)
        for images in itertools.islice(loader, k):
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
        print(f"{name:<10} {row['ms_per_batch']:9.1f} ms per training batch ({preset}; "
              f"CPU {row['cpu_ms_per_item']:.0f} ms, all processes)")
    print(f"faster here: {faster}; choose_placement({device.type!r}, {preset!r}) = {chosen!r}")
    return 0


# --- step / e2e: the training step alone vs the real loop (shards -> loader -> augment -> step) -------

PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def measure_interleaved(cases: dict[str, Callable[[], int]], repeats: int, warmup: int = 1,
                        optional: set[str] = frozenset()) -> tuple[dict[str, dict], dict[str, str]]:
    """`measure` for several cases taking turns within each repeat, so load that drifts during the run (a
    shared machine) hits every case alike and the ratios stay fair. A case in `optional` that fails its
    warm-up (e.g. torch.compile without a working compiler) is dropped: returned in the second dict."""
    failed = {}
    for name, run in list(cases.items()):
        try:
            for _ in range(warmup):
                run()
        except Exception as exc:  # any failure of an optional case is reported, not raised
            if name not in optional:
                raise
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    live = {name: run for name, run in cases.items() if name not in failed}
    rates: dict[str, list[float]] = {name: [] for name in live}
    cpu: dict[str, list[float]] = {name: [] for name in live}
    items: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in live.items():
            start, start_cpu = time.perf_counter(), _cpu_seconds_with_workers()
            items[name] = run()
            rates[name].append(items[name] / (time.perf_counter() - start))
            cpu[name].append(1e3 * (_cpu_seconds_with_workers() - start_cpu) / items[name])
    rows = {name: {"items_per_s": statistics.median(r), "runs": [round(x, 1) for x in r], "items": items[name],
                   "cpu_ms_per_item": round(statistics.median(cpu[name]), 3)} for name, r in rates.items()}
    return rows, failed


def _cpu_seconds_with_workers() -> float:
    """`_cpu_seconds` plus the live child processes (persistent loader workers are never reaped mid-run)."""
    import psutil  # an accelerate dependency

    total = _cpu_seconds()
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # ended meanwhile: now in RUSAGE_CHILDREN (or lost: a slight undercount)
            pass
    return total


def _device(name: str | None):
    import torch

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu)")
    return torch.device(name)


def _threads(threads: int) -> None:
    """--threads: on a CPU shared with other jobs, torch's default (one thread per core) spins in OpenMP
    barriers while its threads wait for a core; 1 thread can be 20x faster there."""
    import torch

    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def _machine(device) -> dict:
    """Where a number was measured: enough to compare JSON lines across machines (and to see the load)."""
    import os

    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    if not name:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.is_file() else []
        name = models[0] if models else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def _precision(choice: str, device) -> str:
    """auto: bf16 on a GPU that has it, else fp32 (CPUs without AMX run bf16 slower than fp32)."""
    import torch

    if choice == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 needs a GPU; on a CPU use fp32 or bf16")
    if choice != "auto":
        return choice
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _step_runner(model_name: str, device, batch: int, size: int, precision: str, channels_last: bool,
                 compile: bool, steps: int) -> Callable[[], int]:
    """`steps` training steps (forward, loss, backward, Adam) of a fresh model on one normalized float batch
    that is already on the device: the throughput ceiling any input pipeline is judged against."""
    import torch
    import torch.nn.functional as F

    from lesionkit.config import TrainConfig
    from lesionkit.models import create_model, prepare_model
    from lesionkit.optim import build_optimizer

    torch.manual_seed(0)
    model = prepare_model(create_model(model_name).to(device), channels_last=channels_last, compile=compile)
    model.train()
    optimizer = build_optimizer(TrainConfig(model=model_name), model)
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 3, (batch,), device=device)
    dtype = getattr(torch, PRECISIONS[precision]) if PRECISIONS[precision] else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def run() -> int:
        for _ in range(steps):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(images).float(), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return steps * batch

    return run


def bench_step(args) -> int:
    from lesionkit.models import list_models

    if args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}; valid models: {', '.join(list_models())}")
    device = _device(args.device)
    _threads(args.threads)
    cuda = device.type == "cuda"
    precisions = args.precisions or ["fp32", "bf16"] + (["fp16"] if cuda else [])
    if "fp16" in precisions and not cuda:
        raise ValueError("--precisions fp16 needs a GPU")
    if "fp32" not in precisions:
        raise ValueError("--precisions must include fp32, the baseline")
    variants = [(p, False, False) for p in precisions] + [(p, True, False) for p in precisions]
    if args.compile:
        variants += [("fp32", False, True), ("bf16" if cuda else "fp32", cuda, True)]
    cases, optional = {}, set()
    for precision, channels_last, compiled in dict.fromkeys(variants):
        name = ", ".join([precision + " autocast" * (precision != "fp32")] + ["channels_last"] * channels_last
                         + ["compile"] * compiled)
        cases[name] = _step_runner(args.model, device, args.batch_size, args.image_size, precision, channels_last,
                                   compiled, args.steps)
        if compiled:
            optional.add(name)
    rows, failed = measure_interleaved(cases, args.repeats, optional=optional)
    params = {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
              "steps": args.steps, "repeats": args.repeats, "optimizer": "adam", "compile_failed": failed,
              **_machine(device)}
    report("step", rows, "fp32", params, args.out)
    for name, why in failed.items():
        print(f"{name}: not measured ({why})")
    return 0


class _SameBatch:
    """The step baseline's loader for `train_one_epoch`: one batch already on the device, `n` times."""

    skipped = 0  # what ShardLoader reports for --skip-corrupt: nothing here

    def __init__(self, batch: tuple, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


def _e2e_rank(args) -> dict:
    """This process's part of `bench e2e`: the trainer's own `train_one_epoch`, over one fixed normalized batch
    already on the device (the step baseline) and over the real shard loader + augmentation, in turns."""
    import types

    import torch

    from lesionkit import train as trainer
    from lesionkit.augment import build_augment, choose_placement
    from lesionkit.config import TrainConfig
    from lesionkit.data import dataset_info, train_loader
    from lesionkit.models import create_model, input_stats, prepare_model
    from lesionkit.optim import build_optimizer

    device = _device(args.device)
    _threads(args.threads)
    precision = _precision(args.precision, device)
    channels_last = args.channels_last
    cfg = TrainConfig(train=[str(args.data)], model=args.model, image_size=args.image_size,
                      batch_size=args.batch_size, workers=args.workers, augment=args.preset,
                      channels_last=channels_last, compile=args.compile, max_steps_per_epoch=args.steps,
                      mixed_precision={"fp32": "no"}.get(precision, precision), cpu=device.type == "cpu",
                      wandb=False)
    accelerator = trainer.make_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    classes, _, _ = dataset_info(cfg.train)
    torch.manual_seed(0)
    model = prepare_model(create_model(cfg.model, num_classes=len(classes)), cfg.channels_last, cfg.compile)
    optimizer = build_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    mean, std = input_stats(cfg.model)
    placement = choose_placement(device.type, cfg.augment) if args.placement == "auto" else args.placement
    augment = build_augment(cfg.augment, cfg.image_size, mean, std)
    loader = train_loader(cfg.train, image_size=cfg.image_size, batch_size=cfg.batch_size, workers=cfg.workers,
                          seed=cfg.seed, epoch=0, rank=rank, world_size=world, shuffle_buffer=cfg.shuffle_buffer,
                          batch_transform=augment if placement == "workers" else None, max_batches=args.steps)
    device_augment = None if placement == "workers" else augment.to(device)
    generator = torch.Generator().manual_seed(rank)
    raw = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                        generator=generator)
    fixed = build_augment("none", cfg.image_size, mean, std).to(device).eval()(raw.to(device))
    labels = torch.randint(0, len(classes), (cfg.batch_size,), generator=generator).to(device)
    synthetic = _SameBatch((fixed, labels, [""] * cfg.batch_size), len(loader))
    stop = types.SimpleNamespace(requested=False)
    totals: dict[str, list[dict]] = {"step": [], "e2e": []}

    def epoch(name: str, batches, aug) -> Callable[[], int]:
        def run() -> int:
            done = trainer.train_one_epoch(cfg, accelerator, model, optimizer, batches, aug, None, None,
                                           trainer.LoopState(), stop, None, 0, None)
            _sync(device)
            totals[name].append(done)
            return done["n"]
        return run

    rows, _ = measure_interleaved({"step": epoch("step", synthetic, None),
                                   "e2e": epoch("e2e", loader, device_augment)}, args.repeats)
    for name, row in rows.items():
        timed = totals[name][-args.repeats:]  # the warm-up pass also starts the loader workers
        row["data_wait"] = round(statistics.median(t["data_s"] / max(t["data_s"] + t["compute_s"], 1e-9)
                                                   for t in timed), 3)
    result = {"rank": rank, "world": world, "rows": rows, "placement": placement, "precision": precision,
              "channels_last": channels_last, "batches_per_pass": len(loader), **_machine(device)}
    if world > 1:
        from accelerate.utils import gather_object

        result = gather_object([result])
    accelerator.end_training()
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ranks(args, world: int) -> list[dict]:
    """`bench e2e` again in `world` CPU processes through the cpu_ddp accelerate config (gloo DDP: the
    gradient all-reduce is part of every step); the ranks' results come back through a file."""
    import os
    import subprocess
    import tempfile

    config = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu_ddp.yaml"
    launcher = Path(sys.executable).with_name("accelerate")
    if not config.is_file() or not launcher.exists():
        raise FileNotFoundError(f"--world {world} needs {config} and {launcher} (a source checkout with its venv)")
    with tempfile.TemporaryDirectory(prefix="lk-bench-e2e-") as tmp:
        result = Path(tmp) / "ranks.json"
        cmd = [str(launcher), "launch", "--config_file", str(config), "--num_processes", str(world),
               "--main_process_port", str(_free_port()), "-m", "lesionkit.cli", "bench", "e2e", args.model,
               "--data", str(args.data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--workers", str(args.workers), "--preset", args.preset,
               "--placement", args.placement, "--precision", args.precision, "--device", "cpu",
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--world", str(world), "--result-file", str(result),
               "--channels-last" if args.channels_last else "--no-channels-last"] + (["--compile"] * args.compile)
        done = subprocess.run(cmd, env=dict(os.environ, ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                              check=False)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"the {world}-process run failed (exit {done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
        return json.loads(result.read_text())


def bench_e2e(args) -> int:
    import os

    from lesionkit.augment import PRESETS
    from lesionkit.models import list_models
    from lesionkit.pack import read_manifest

    if args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}; valid models: {', '.join(list_models())}")
    if args.preset not in PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    if args.world < 1 or args.steps < 1 or args.workers < 0:
        raise ValueError("--world and --steps must be >= 1, --workers >= 0")
    manifest = read_manifest(args.data)  # a missing or foreign folder fails here, naming it
    if args.result_file:  # a rank of a --world N run started by `_launch_ranks`
        ranks = _e2e_rank(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result_file).write_text(json.dumps(ranks))
        return 0
    if args.world > 1 and _device(args.device).type != "cpu":
        raise ValueError("--world N runs CPU processes (cpu_ddp config); on GPUs use `accelerate launch` yourself")
    one = _e2e_rank(args)
    cases = {"step": one["rows"]["step"], "e2e": one["rows"]["e2e"]}
    if args.world > 1:
        try:
            ranks = _launch_ranks(args, args.world)
        except RuntimeError as exc:
            print(f"lesionkit bench e2e: error: {exc}", file=sys.stderr)
            return 1
        for name in ("step", "e2e"):
            per_rank = [r["rows"][name] for r in ranks]
            cases[f"{name}, {args.world} procs, per rank"] = {
                "items_per_s": statistics.mean(r["items_per_s"] for r in per_rank),
                "runs": [r["runs"] for r in per_rank], "items": per_rank[0]["items"],
                "cpu_ms_per_item": statistics.mean(r["cpu_ms_per_item"] for r in per_rank),
                "data_wait": max(r["data_wait"] for r in per_rank)}
        total = cases[f"e2e, {args.world} procs, per rank"]
        cases[f"e2e, {args.world} procs, all ranks"] = {**total, "items_per_s": total["items_per_s"] * args.world}
    params = {"model": args.model, "data": str(args.data), "num_samples": manifest["num_samples"],
              "stored_size": manifest.get("params", {}).get("size"), "steps": args.steps,
              "batches_per_pass": one["batches_per_pass"], "batch_size": args.batch_size,
              "image_size": args.image_size, "workers": args.workers, "preset": args.preset,
              "placement": one["placement"], "precision": one["precision"], "channels_last": one["channels_last"],
              "compile": args.compile, "world": args.world, "repeats": args.repeats,
              **{k: one[k] for k in ("device", "device_name", "torch", "cpus", "torch_threads", "loadavg_1m")}}
    record = report("e2e", cases, "step", params, args.out)
    print(f"{'case':<28} {'data wait':>9}")
    for name, row in record["cases"].items():
        print(f"{name:<28} {100 * row['data_wait']:8.1f}%")
    print(f"e2e / step: {cases['e2e']['ratio']:.2f}x (goal >= 0.9x: the pipeline does not starve the model)")
    return 0


# --- pack: draft decoding vs full decode + resize; memory that does not grow with the data ------------

def _peak_rss_mb() -> dict:
    """Peak resident memory so far of this process and of its largest finished child (pool, loader workers)."""
    import resource

    kib = 1024  # ru_maxrss is in KiB on Linux
    return {"rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 1),
            "children_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib, 1)}


def _in_fresh_process(fn: Callable, *args):
    """fn(*args) (JSON in, JSON out) in a new interpreter, so its peak memory is its own and not this
    process's history. A plain `python -c`, as users run `lesionkit`: a multiprocessing spawn child would
    make the pack pool and loader workers spawn too, each re-importing torch."""
    import subprocess

    code = (f"import json, sys; from {fn.__module__} import {fn.__name__} as fn; "
            "print(json.dumps(fn(*json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{fn.__name__}{args} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def pack_probe(images: str, labels: str, out: str, size: int, workers: int, shard_size: int, draft: bool) -> dict:
    """One `pack` into `out` (removed after) in this process: seconds, images and peak memory."""
    import shutil

    import webdataset  # noqa: F401 - pack imports it (and torch) lazily: seconds that are not packing

    from lesionkit.pack import pack

    start = time.perf_counter()
    manifest = pack(images, labels, out, size=size, workers=workers, shard_size=shard_size, draft=draft,
                    force=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"seconds": seconds, "images": manifest["num_samples"], **_peak_rss_mb()}


def bench_pack(args) -> int:
    import tempfile

    from lesionkit.pack import default_workers

    workers = default_workers() if args.workers is None else args.workers
    for path in (args.images, args.labels):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    cases = {}
    with tempfile.TemporaryDirectory(prefix="lk-bench-pack-") as tmp:
        runs: dict[str, list[dict]] = {"draft": [], "full decode": []}
        for _ in range(args.repeats):  # cases in turns, each pack in a fresh process (own peak memory)
            for name, done in runs.items():
                try:
                    done.append(_in_fresh_process(pack_probe, str(args.images), str(args.labels),
                                                  f"{tmp}/shards", args.size, workers, 1000, name == "draft"))
                except RuntimeError as exc:
                    print(f"lesionkit bench pack: error: {exc}", file=sys.stderr)
                    return 1
    for name, done in runs.items():
        rates = [d["images"] / d["seconds"] for d in done]
        cases[name] = {"items_per_s": statistics.median(rates), "runs": [round(r, 1) for r in rates],
                       "items": done[0]["images"], "rss_mb": max(d["rss_mb"] for d in done),
                       "children_rss_mb": max(d["children_rss_mb"] for d in done)}
    params = {"images": str(args.images), "labels": str(args.labels), "size": args.size, "workers": workers,
              "repeats": args.repeats, **_machine(_device("cpu"))}
    params.pop("device")
    report("pack", cases, "full decode", params, args.out)
    print(f"{'case':<12} {'peak RSS main':>14} {'largest worker':>15}")
    for name, row in cases.items():
        print(f"{name:<12} {row['rss_mb']:11.0f} MB {row['children_rss_mb']:12.0f} MB")
    return 0


def memory_probe(images: str, labels: str, shards: str, size: int, workers: int, shard_size: int,
                 batch_size: int) -> dict:
    """Pack a folder, then stream the shards once through `train_loader`; peak memory after each phase."""
    import gc

    from lesionkit.data import train_loader
    from lesionkit.pack import pack

    start = time.perf_counter()
    manifest = pack(images, labels, shards, size=size, workers=workers, shard_size=shard_size, force=True)
    result = {"samples": manifest["num_samples"], "pack_s": time.perf_counter() - start,
              "pack": _peak_rss_mb()}
    start = time.perf_counter()
    loader = train_loader(shards, image_size=size, batch_size=batch_size, workers=workers, seed=0, epoch=0,
                          rank=0, world_size=1)
    seen = sum(len(labels) for _, labels, _ in loader)
    del loader
    gc.collect()  # shuts the persistent workers down, so RUSAGE_CHILDREN counts them
    result.update(streamed=seen, stream_s=time.perf_counter() - start, stream=_peak_rss_mb())
    return result


def _tile(images: Path, labels: Path, out: Path, n: int) -> tuple[Path, Path]:
    """`n` images under new ids, hard links to the synthesized ones taken round robin: synthesis costs
    ~10 ms an image, and what is measured is how memory scales with the number of samples."""
    import csv
    import os

    with open(labels, newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), list(reader)
    folder = out / "images"
    folder.mkdir(parents=True)
    tiled = []
    for i in range(n):
        row = rows[i % len(rows)]
        new_id = f"ISIC_{i:07d}"
        os.link(images / f"{row[0]}.jpg", folder / f"{new_id}.jpg")
        tiled.append([new_id, *row[1:]])
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(tiled)
    return folder, out / "labels.csv"


def bench_memory(args) -> int:
    import shutil
    import tempfile

    from lesionkit.synth import synthesize

    if not 1 <= args.small < args.large:
        raise ValueError(f"need 1 <= --small < --large, got {args.small} and {args.large}")
    work = Path(tempfile.mkdtemp(prefix="lk-bench-memory-", dir=args.workdir))
    try:
        synthesize(work / "synth", args.small, 0, size=args.size, workers=max(1, args.workers))
        synth = work / "synth"
        source = (synth / "ISIC-2017_Training_Data", synth / "ISIC-2017_Training_Part3_GroundTruth.csv")
        results = {}
        for n in (args.small, args.large):
            images, labels = _tile(*source, work / f"n{n}", n)
            try:
                results[n] = _in_fresh_process(memory_probe, str(images), str(labels),
                                               str(work / f"n{n}" / "shards"), args.size, args.workers,
                                               args.shard_size, args.batch_size)
            except RuntimeError as exc:
                print(f"lesionkit bench memory: error: {exc}", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = results[args.small], results[args.large]
    ratios = {f"{phase} {kind}": round(large[phase][kind] / small[phase][kind], 3)
              for phase in ("pack", "stream") for kind in ("rss_mb", "children_rss_mb") if small[phase][kind]}
    print(f"{'samples':>8} {'pack s':>7} {'stream s':>8} {'peak main':>10} {'peak worker':>12}")
    for n, r in results.items():
        print(f"{n:>8} {r['pack_s']:7.1f} {r['stream_s']:8.1f} {r['stream']['rss_mb']:7.0f} MB "
              f"{max(r['pack']['children_rss_mb'], r['stream']['children_rss_mb']):9.0f} MB")
    worst = max(ratios.values())
    print(f"peak RSS {args.large} / {args.small} samples: {worst:.2f}x at most "
          f"({', '.join(f'{k} {v:.2f}x' for k, v in ratios.items())}); goal <= 1.5x")
    record = {"bench": "memory", "unit": "MB peak RSS", "results": {str(n): r for n, r in results.items()},
              "ratios": ratios, "max_ratio": worst,
              "params": {"small": args.small, "large": args.large, "size": args.size, "workers": args.workers,
                         "shard_size": args.shard_size, "batch_size": args.batch_size, **_machine(_device("cpu"))},
              "host": platform.node(), "python": platform.python_version(), "time": time.strftime("%FT%T%z")}
    record["params"].pop("device")
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as sink:
            sink.write(line + "\n")
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

    import argparse
    p = sub.add_parser("step", help="training images/s of a model alone on synthetic device tensors: fp32 vs "
                                    "bf16/fp16 autocast, channels_last, torch.compile")
    p.add_argument("model", help="model name (lesionkit.models.list_models())")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed run")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile (optional rows; its warm-up compiles, minutes on a CPU)")
    p.add_argument("--precisions", nargs="+", choices=tuple(PRECISIONS), metavar="P",
                   help="fp32 (the baseline) and any of bf16 fp16 (default: all the device has; bf16 runs "
                        "~7x slower than fp32 on CPUs without AMX)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: torch's); 1 on a busy shared CPU")
    _add_common(p)
    p.set_defaults(func=bench_step)

    p = sub.add_parser("e2e", help="the real loop (shards -> loader -> device -> augment -> step) vs the step "
                                   "alone, with the share of time waiting for data; --world N for CPU DDP")
    p.add_argument("model", help="model name (lesionkit.models.list_models())")
    p.add_argument("--data", type=Path, required=True, help="shard folder written by `lesionkit pack`")
    p.add_argument("--steps", type=int, default=20, help="training steps per timed pass (an epoch capped at N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="loader workers per process")
    p.add_argument("--preset", default="derm", help="augmentation preset")
    p.add_argument("--placement", choices=("auto", "device", "workers"), default="auto",
                   help="where augmentation runs (auto: lesionkit.augment.choose_placement)")
    p.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                   help="auto: bf16 on GPUs that have it, fp32 on CPUs")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last model and batches (default on: 1.4-1.6x on CPUs too, see `bench step`)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--world", type=int, default=1,
                   help="N > 1: also run N CPU processes (accelerate_configs/cpu_ddp.yaml) for per-rank throughput")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (default: torch's; accelerate gives ranks 1); 1 on a busy CPU")
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # set for the ranks of a --world N run
    _add_common(p)
    p.set_defaults(func=bench_e2e)

    p = sub.add_parser("pack", help="packing images/s and peak memory: draft decoding vs full decode + resize")
    p.add_argument("images", type=Path, help="folder of images")
    p.add_argument("--labels", type=Path, required=True, help="labels CSV")
    p.add_argument("--size", type=int, default=256, help="stored shorter side, as `lesionkit pack --size`")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all CPUs)")
    _add_common(p)
    p.set_defaults(func=bench_pack)

    p = sub.add_parser("memory", help="peak RSS of packing + streaming --small vs --large synthetic images")
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--size", type=int, default=32, help="image size (tiny: what matters is the count)")
    p.add_argument("--workers", type=int, default=2, help="pack processes and loader workers")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workdir", default=None, help="where the temporary data goes (default: the system temp)")
    p.add_argument("--out", help="append the JSON result line to this file")
    p.set_defaults(func=bench_memory)


def run(args) -> int:
    for flag in ("repeats", "batch_size", "epochs"):
        if getattr(args, flag, 1) < 1:
            raise SystemExit(f"lesionkit bench {args.bench}: error: --{flag.replace('_', '-')} must be >= 1")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"lesionkit bench {args.bench}: error: {exc}", file=sys.stderr)
        return 2
