"""`lesionkit bench step`: training images/s of a model alone on synthetic device tensors (the throughput
ceiling any input pipeline is judged against): fp32 vs bf16/fp16 autocast, channels_last, torch.compile."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import AUTOCAST, machine, measure_interleaved, pick_device, report, set_threads, sync
from lesionkit.config import TrainConfig
from lesionkit.errors import UsageError
from lesionkit.models import create_model, list_models, prepare_model
from lesionkit.optim import build_optimizer


def _step_runner(
    model_name: str,
    device,
    batch: int,
    size: int,
    precision: str,
    channels_last: bool,
    compile: bool,
    steps: int,
) -> Callable[[], int]:
    """`steps` training steps (forward, loss, backward, Adam) of a fresh model on one normalized float batch
    that is already on the device: the throughput ceiling any input pipeline is judged against."""
    torch.manual_seed(0)
    model = prepare_model(create_model(model_name).to(device), channels_last=channels_last, compile=compile)
    model.train()
    optimizer = build_optimizer(TrainConfig(model=model_name), model)
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 3, (batch,), device=device)
    dtype = AUTOCAST[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def run() -> int:
        for _ in range(steps):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(images).float(), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return steps * batch

    return run


def bench(args) -> int:
    if args.model not in list_models():
        raise UsageError(f"unknown model {args.model!r}; valid models: {', '.join(list_models())}")
    device = pick_device(args.device)
    set_threads(args.threads)
    cuda = device.type == "cuda"
    precisions = args.precisions or ["fp32", "bf16"] + (["fp16"] if cuda else [])
    if "fp16" in precisions and not cuda:
        raise UsageError("--precisions fp16 needs a GPU")
    if "fp32" not in precisions:
        raise UsageError("--precisions must include fp32, the baseline")
    variants = [(p, False, False) for p in precisions] + [(p, True, False) for p in precisions]
    if args.compile:
        variants += [("fp32", False, True), ("bf16" if cuda else "fp32", cuda, True)]
    cases, optional = {}, set()
    for precision, channels_last, compiled in dict.fromkeys(variants):
        name = ", ".join(
            [precision + " autocast" * (precision != "fp32")]
            + ["channels_last"] * channels_last
            + ["compile"] * compiled
        )
        cases[name] = _step_runner(
            args.model,
            device,
            args.batch_size,
            args.image_size,
            precision,
            channels_last,
            compiled,
            args.steps,
        )
        if compiled:
            optional.add(name)
    rows, failed = measure_interleaved(cases, args.repeats, optional=optional)
    params = {
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "optimizer": "adam",
        "compile_failed": failed,
        **machine(device),
    }
    report("step", rows, "fp32", params, args.out)
    for name, why in failed.items():
        print(f"{name}: not measured ({why})")
    return 0
