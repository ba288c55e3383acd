"""The measuring and reporting every benchmark shares.

`measure()` / `measure_interleaved()` time a case (median over repeats after an untimed warm-up, with CPU
time of this process and its loader workers), `report()` prints the side-by-side table with each case's
ratio to the baseline and one JSON line (also appended to --out) so numbers in the README can be traced
to the exact command. The rest says where a number was measured (`machine()`) and sets the device,
threads and precision the same way for every benchmark; `in_fresh_process()` + `peak_rss_mb()` measure
memory in an interpreter of its own.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil  # an accelerate dependency
import torch

from lesionkit.errors import UsageError

# --precision(s) (benchmarks.cli.PRECISIONS) -> the autocast dtype (None: fp32, no autocast)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- timing -------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (loader workers, once shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_seconds_with_workers() -> float:
    """`cpu_seconds` plus the live child processes (persistent loader workers are never reaped mid-run)."""
    total = cpu_seconds()
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # ended meanwhile: now in RUSAGE_CHILDREN (or lost: a slight undercount)
            pass
    return total


def _row(rates: list[float], cpu_ms: list[float], items: int) -> dict:
    """One case's result: median items/s, every run's rate, items per run, median CPU ms per item."""
    return {
        "items_per_s": statistics.median(rates),
        "runs": [round(r, 1) for r in rates],
        "items": items,
        "cpu_ms_per_item": round(statistics.median(cpu_ms), 3),
    }


def measure(run: Callable[[], int], repeats: int, warmup: int = 1) -> dict:
    """Call `run` (returns items processed) warmup + repeats times; median items/s of the timed calls, and
    median CPU ms per item over all processes: the number that holds on a machine shared with others."""
    for _ in range(warmup):
        run()
    rates, cpu, items = [], [], 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        items = run()
        rates.append(items / (time.perf_counter() - start))
        before_gc = time.process_time()
        gc.collect()  # finish off loaders so their workers' CPU time is counted...
        collecting = time.process_time() - before_gc  # ...but not the collection's own (~0.15 s with torch)
        cpu.append(1e3 * (cpu_seconds() - start_cpu - collecting) / items)
    return _row(rates, cpu, items)


def measure_interleaved(
    cases: dict[str, Callable[[], int]], repeats: int, warmup: int = 1, optional: set[str] = frozenset()
) -> tuple[dict[str, dict], dict[str, str]]:
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
            start, start_cpu = time.perf_counter(), cpu_seconds_with_workers()
            items[name] = run()
            rates[name].append(items[name] / (time.perf_counter() - start))
            cpu[name].append(1e3 * (cpu_seconds_with_workers() - start_cpu) / items[name])
    return {name: _row(r, cpu[name], items[name]) for name, r in rates.items()}, failed


# --- reporting ----------------------------------------------------------------------------------------


def report(
    bench: str, cases: dict[str, dict], baseline: str, params: dict, out: str | None, unit: str = "images/s"
) -> dict:
    """Print `case  unit  ratio-to-baseline` and a JSON line; append the line to `out` when given."""
    base = cases[baseline]["items_per_s"]
    width = max(len(name) for name in cases)
    print(f"{'case':<{width}}  {unit:>12}  {'vs ' + baseline:>12}  {'CPU ms/item':>11}  runs")
    for name, row in cases.items():
        row["ratio"] = round(row["items_per_s"] / base, 3)
        print(
            f"{name:<{width}}  {row['items_per_s']:12.1f}  {row['ratio']:11.2f}x  "
            f"{row.get('cpu_ms_per_item', float('nan')):11.2f}  {row['runs']}"
        )
    return emit({"bench": bench, "unit": unit, "baseline": baseline, "cases": cases, "params": params}, out)


def emit(record: dict, out: str | None) -> dict:
    """Stamp `record` with the host, Python and time, print it as one JSON line, append it to `out`."""
    record.update(host=platform.node(), python=platform.python_version(), time=time.strftime("%FT%T%z"))
    line = json.dumps(record)
    print(line)
    if out:
        with open(out, "a", encoding="utf-8") as sink:
            sink.write(line + "\n")
    return record


# --- where and how it runs: device, threads, precision, machine -----------------------------------------


def pick_device(name: str | None) -> torch.device:
    """--device: default cuda when available; asking for cuda without one is a usage error."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here (use --device cpu)")
    return torch.device(name)


def set_threads(threads: int) -> None:
    """--threads: on a CPU shared with other jobs, torch's default (one thread per core) spins in OpenMP
    barriers while its threads wait for a core; 1 thread can be 20x faster there."""
    if threads < 0:
        raise UsageError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def pick_precision(choice: str, device: torch.device) -> str:
    """auto: bf16 on a GPU that has it, else fp32 (CPUs without AMX run bf16 slower than fp32)."""
    if choice == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a GPU; on a CPU use fp32 or bf16")
    if choice != "auto":
        return choice
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so the clock stops when the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_info(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo ("model name", "vendor_id"); "" where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field), "")


def machine(device: torch.device) -> dict:
    """Where a number was measured: enough to compare JSON lines across machines (and to see the load)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    name = name or cpu_info("model name") or platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def cpu_machine() -> dict:
    """`machine` of a CPU-only benchmark (pack, memory): the CPU, without a device key."""
    described = machine(torch.device("cpu"))
    described.pop("device")
    return described


# --- memory: peak RSS of a run in an interpreter of its own ---------------------------------------------


def peak_rss_mb() -> dict:
    """Peak resident memory so far of this process and of its largest finished child (pool, workers)."""
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 1),
        "children_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib, 1),
    }


def in_fresh_process(fn: Callable, *args):
    """fn(*args) (JSON in, JSON out) in a new interpreter, so its peak memory is its own and not this
    process's history. A plain `python -c`, as users run `lesionkit`: a multiprocessing spawn child would
    make the pack pool and loader workers spawn too, each re-importing torch."""
    code = (
        f"import json, sys; from {fn.__module__} import {fn.__name__} as fn; "
        "print(json.dumps(fn(*json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{fn.__name__}{args} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])
