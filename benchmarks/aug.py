"""`lesionkit bench aug`: ms/batch of each augmentation preset beside a resnet18 training step, and where to
run it: on the device in the main process vs in loader workers."""

from __future__ import annotations

import itertools

import kornia.augmentation as K
import torch
import torchvision

from benchmarks.harness import machine, measure, pick_device, report, set_threads, sync
from lesionkit.augment import PRESETS, build_augment, choose_placement
from lesionkit.errors import UsageError


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
    kernel = min(63, size // 2 * 2 - 1)
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.6, 1.0), p=0.7),
        K.RandomHorizontalFlip(),
        K.RandomVerticalFlip(),
        K.RandomRotation(180.0, p=0.75),
        K.RandomAffine(0.0, translate=(0.1, 0.1), scale=(0.9, 1.1), p=0.5),
        K.RandomElasticTransform(kernel_size=(kernel, kernel), p=0.25),
        K.ColorJitter(0.2, 0.2, 0.2, 0.05, p=0.8),
        K.RandomEqualize(p=0.1),
        K.RandomGrayscale(p=0.05),
        K.RandomGaussianNoise(std=0.03, p=0.2),
        K.Normalize(torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))),
    )


def bench(args) -> int:
    device = pick_device(args.device)
    if args.image_size < 32 or args.placement_batches < 1 or args.workers < 1:
        raise UsageError("--image-size must be >= 32, --placement-batches and --workers >= 1")
    presets = args.presets or list(PRESETS)
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise UsageError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    threads = torch.get_num_threads()
    set_threads(args.threads)
    try:
        return _bench(args, device, presets)
    finally:
        torch.set_num_threads(threads)  # the process (a test, say) goes on with its own setting


def _bench(args, device, presets) -> int:
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
            sync(device)
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
        cases["derm, stock kornia"] = measure(
            timed(lambda: kornia_derm(on_device.float() / 255)), args.repeats
        )
    cases["resnet18 step"] = measure(timed(lambda: step(normalized)), args.repeats)
    step_ms = 1000 / cases["resnet18 step"]["items_per_s"]
    for row in cases.values():
        row["ms_per_batch"] = round(1000 / row["items_per_s"], 2)
        row["share_of_step"] = round(row["ms_per_batch"] / step_ms, 3)
    params = {
        **machine(device),
        "batch_size": bs,
        "image_size": size,
        "repeats": args.repeats,
        "step": "resnet18 fwd+bwd+SGD" + (", bf16 autocast, channels_last" if cuda else ", fp32"),
    }
    report("aug", cases, "resnet18 step", params, args.out, unit="batches/s")
    for name, row in cases.items():  # CPU ms: the steadier number on a shared machine
        print(
            f"{name:<18} {row['ms_per_batch']:9.1f} ms/batch  {100 * row['share_of_step']:6.1f} % of a step"
            f"  (CPU {row['cpu_ms_per_item']:.0f} ms)"
        )

    # Placement: k training steps per run, augmenting in the main process vs in loader workers.
    preset, k = args.placement_preset, args.placement_batches
    aug = build_augment(preset, size, *stats).train()
    device_aug = build_augment(preset, size, *stats).to(device).train()

    def serial() -> int:
        for _ in range(k):
            step(device_aug(on_device))
        sync(device)
        return k

    def workers() -> int:
        # A loader per run, so its workers exit and their CPU time is counted; the time includes filling
        # the pipeline (the first batch is not overlapped), as at the start of every epoch.
        loader = torch.utils.data.DataLoader(
            _AugmentedBatches(batch, aug),
            batch_size=None,
            num_workers=args.workers,
            prefetch_factor=2,
            pin_memory=cuda,
        )
        for images in itertools.islice(loader, k):
            step(images)
        sync(device)
        return k

    def step_only() -> int:
        for _ in range(k):
            step(normalized)
        sync(device)
        return k

    placements = {
        "step only": measure(step_only, args.repeats),
        "device": measure(serial, args.repeats),
        "workers": measure(workers, args.repeats),
    }
    for row in placements.values():
        row["ms_per_batch"] = round(1000 / row["items_per_s"], 2)
    faster = min(("device", "workers"), key=lambda name: placements[name]["ms_per_batch"])
    chosen = choose_placement(device.type, preset)
    report(
        "aug-placement",
        placements,
        "step only",
        {
            **params,
            "preset": preset,
            "batches_per_run": k,
            "workers": args.workers,
            "faster": faster,
            "choose_placement": chosen,
        },
        args.out,
        unit="batches/s",
    )
    for name, row in placements.items():
        print(
            f"{name:<10} {row['ms_per_batch']:9.1f} ms per training batch ({preset}; "
            f"CPU {row['cpu_ms_per_item']:.0f} ms, all processes)"
        )
    print(f"faster here: {faster}; choose_placement({device.type!r}, {preset!r}) = {chosen!r}")
    return 0
