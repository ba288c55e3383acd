"""`lesionkit bench step|e2e|pack|memory` (the top-level `benchmarks` package): each prints its table and
appends one valid JSON line, and memory does not grow with the number of samples (the CI-sized version of
`bench memory`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lesionkit.cli import main
from tests.conftest import make_shards


def last_record(path: Path) -> dict:
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The CI machine is shared: one torch thread keeps these runs from stalling in OpenMP barriers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_help_lists_every_benchmark_and_imports_none_of_them():
    """`lesionkit bench` imports only the benchmark it runs: its help loads no torch."""
    code = (
        "import sys\nfrom lesionkit.cli import main\ntry:\n    main(['bench', '--help'])\n"
        "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert res.returncode == 0, res.stderr
    listed = re.findall(r"^    (\S+)", res.stdout, re.MULTILINE)  # the subcommand lines of the help
    assert listed == ["loader", "aug", "step", "e2e", "pack", "memory"], res.stdout
    assert res.stdout.splitlines()[-1] == "torch imported: False"


def test_bench_step_times_precisions_and_layouts_beside_fp32(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert (
        main(
            [
                "bench",
                "step",
                "customnet",
                "--device",
                "cpu",
                "--image-size",
                "64",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--repeats",
                "1",
                "--no-compile",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = last_record(out)
    assert record["bench"] == "step" and record["baseline"] == "fp32"
    assert list(record["cases"]) == [
        "fp32",
        "bf16 autocast",
        "fp32, channels_last",
        "bf16 autocast, channels_last",
    ]
    assert record["cases"]["fp32"]["ratio"] == 1.0 and all(c["items"] == 2 for c in record["cases"].values())
    assert record["params"]["model"] == "customnet" and record["params"]["device_name"]
    assert "torch" in record["params"] and "host" in record
    printed = capsys.readouterr().out
    assert "bf16 autocast, channels_last" in printed and "vs fp32" in printed


def test_bench_e2e_runs_the_trainer_loop_on_shards_beside_the_step(tmp_path, capsys):
    data = tmp_path / "shards"
    make_shards(data, n=48, num_shards=2, size=64)
    out = tmp_path / "bench.jsonl"
    assert (
        main(
            [
                "bench",
                "e2e",
                "customnet",
                "--data",
                str(data),
                "--device",
                "cpu",
                "--image-size",
                "64",
                "--batch-size",
                "8",
                "--steps",
                "2",
                "--workers",
                "1",
                "--preset",
                "light",
                "--repeats",
                "1",
                "--out",
                str(out),
                "--profile",
                str(tmp_path / "profile.txt"),
            ]
        )
        == 0
    )
    record = last_record(out)
    assert (
        record["bench"] == "e2e" and record["baseline"] == "step" and set(record["cases"]) == {"step", "e2e"}
    )
    profile = (tmp_path / "profile.txt").read_text()  # one more pass under torch.profiler, CPU ops only here
    assert "sorted by self_cpu_time_total" in profile and "aten::convolution" in profile
    assert "self_cuda" not in profile
    assert all(c["items"] == 16 for c in record["cases"].values())  # 2 steps x 8 images
    assert 0 <= record["cases"]["e2e"]["data_wait"] <= 1
    assert record["params"]["placement"] == "workers" and record["params"]["precision"] == "fp32"
    assert "e2e / step:" in capsys.readouterr().out


def test_bench_e2e_names_a_folder_that_is_not_shards(tmp_path, capsys):
    assert main(["bench", "e2e", "customnet", "--data", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from lesionkit.synth.generator import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, 4, 0, size=64, workers=1)
    return root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part3_GroundTruth.csv"


@pytest.mark.slow
def test_bench_pack_compares_draft_with_full_decode_and_reports_peak_memory(synthetic, tmp_path, capsys):
    images, labels = synthetic
    out = tmp_path / "bench.jsonl"
    assert (
        main(
            [
                "bench",
                "pack",
                str(images),
                "--labels",
                str(labels),
                "--size",
                "32",
                "--workers",
                "1",
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = last_record(out)
    assert record["bench"] == "pack" and record["baseline"] == "full decode"
    for case in record["cases"].values():
        assert case["items"] == 4 and case["rss_mb"] > 50  # a python process holding PIL, numpy, torch
    assert "peak RSS main" in capsys.readouterr().out


@pytest.mark.slow
def test_memory_of_packing_and_streaming_does_not_grow_with_the_data(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert (
        main(
            [
                "bench",
                "memory",
                "--small",
                "200",
                "--large",
                "2000",
                "--size",
                "32",
                "--workers",
                "2",
                "--shard-size",
                "100",
                "--workdir",
                str(tmp_path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = last_record(out)
    assert record["results"]["200"]["streamed"] >= 200 and record["results"]["2000"]["streamed"] >= 2000
    assert record["results"]["2000"]["samples"] == 2000
    assert record["max_ratio"] <= 1.5, record["ratios"]
    assert "goal <= 1.5x" in capsys.readouterr().out
    assert not list(tmp_path.glob("lk-bench-memory-*"))  # the temporary data is gone


def test_measure_does_not_charge_its_garbage_collection_to_the_case():
    # measure() collects garbage after each run (so finished loaders' workers are counted); with torch
    # imported a collection costs ~0.15 s of CPU, which a 1-item case (one `bench aug` batch) used to report
    # as its own: a no-op read 170 ms per item.
    import torch  # noqa: F401  (the heap a real benchmark collects)

    from benchmarks.harness import measure

    junk = [[object() for _ in range(100)] for _ in range(2000)]  # something for gc to walk
    row = measure(lambda: 1, repeats=3)
    assert row["cpu_ms_per_item"] < 5, row
    del junk


def test_bench_e2e_decodes_on_the_device_when_asked(tmp_path):
    # --decode device: the workers hand over JPEG bytes, the loop decodes each batch where it trains (here
    # the CPU, the same code path as nvJPEG on a GPU), so augmentation must run there too
    data = tmp_path / "shards"
    make_shards(data, n=32, num_shards=2, size=64)
    out = tmp_path / "bench.jsonl"
    args = ["bench", "e2e", "customnet", "--data", str(data), "--device", "cpu", "--image-size", "64"]
    args += ["--batch-size", "8", "--steps", "2", "--workers", "1", "--repeats", "1", "--out", str(out)]
    assert main([*args, "--decode", "device"]) == 0
    record = last_record(out)
    assert record["params"]["decode"] == "device" and record["params"]["placement"] == "device"
    assert record["cases"]["e2e"]["items"] == 16
    assert main([*args, "--decode", "device", "--placement", "workers"]) == 2  # no pixels in the workers
