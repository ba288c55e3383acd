"""Run under `accelerate launch --num_processes 2`: read shards on every rank, write what each rank saw.

Each training batch is followed by a collective (gather), exactly as a DDP backward would be: if one
rank had fewer batches, the other would wait forever and the launching test times out.
Usage: data_ranks.py SHARD_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from lesionkit.data import eval_loader, train_loader

shards, out = sys.argv[1], Path(sys.argv[2])
accelerator = Accelerator()
assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
rank, world = accelerator.process_index, accelerator.num_processes

loader = train_loader(
    shards,
    image_size=32,
    batch_size=8,
    workers=2,
    seed=0,
    epoch=0,
    rank=rank,
    world_size=world,
    shuffle_buffer=16,
)
epochs = []
for _ in range(2):
    ids, batches = [], 0
    for images, _, keys, _ in loader:
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
        total = accelerator.gather(torch.tensor([len(keys)])).sum().item()  # hangs if counts differ
        assert total == 8 * world
        ids += keys
        batches += 1
    epochs.append({"batches": batches, "ids": ids})

evaluated = []
for _, labels, keys, _ in eval_loader(
    shards, image_size=32, batch_size=8, workers=2, rank=rank, world_size=world
):
    evaluated += [[k, int(label)] for k, label in zip(keys, labels)]
gathered = gather_object(evaluated)  # what a trainer does: gather (id, prediction) once, at the end

result = {
    "rank": rank,
    "world_size": world,
    "len": len(loader),
    "epochs": epochs,
    "eval": evaluated,
    "eval_gathered": gathered,
}
(out / f"rank{rank}.json").write_text(json.dumps(result))
accelerator.wait_for_everyone()
accelerator.end_training()  # leave the process group before exit
