"""The shard reader under real 2-process CPU DDP (accelerate launch --multi_gpu with gloo on CPU)."""

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import cpu_ddp, make_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "ddp_scripts" / "data_ranks.py"


@pytest.mark.ddp
def test_two_ranks_equal_batches_cover_train_and_eval_exactly_once(tmp_path):
    # 5 shards of 12 for 2 ranks x 2 workers: one rank gets 36 samples, the other 24 -> it must pad.
    manifest = make_shards(tmp_path / "shards", 60, 5)
    all_ids = {f"ISIC_{i:07d}" for i in range(manifest["num_samples"])}
    out = tmp_path / "out"
    out.mkdir()
    cmd = cpu_ddp(SCRIPT, tmp_path / "shards", out)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["len"] == ranks[1]["len"] == 5  # rank with 36 samples: ceil(24/8) + ceil(12/8)
    for epoch in range(2):
        counts = [r["epochs"][epoch]["batches"] for r in ranks]
        assert counts == [5, 5]
        seen = ranks[0]["epochs"][epoch]["ids"] + ranks[1]["epochs"][epoch]["ids"]
        assert set(seen) == all_ids  # every sample at least once per epoch
        assert len(seen) == 2 * 5 * 8
        assert not set(ranks[0]["epochs"][epoch]["ids"]) & set(ranks[1]["epochs"][epoch]["ids"])

    evaluated = ranks[0]["eval"] + ranks[1]["eval"]
    assert Counter(k for k, _ in evaluated) == Counter(all_ids)  # each id exactly once
    assert all(label == int(k[-7:]) % 3 for k, label in evaluated)
    assert sorted(map(tuple, ranks[0]["eval_gathered"])) == sorted(map(tuple, evaluated))
