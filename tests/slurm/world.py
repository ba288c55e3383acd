"""Writes what one launched process sees of its process group to OUT/world-<rank>.json (proves real DDP).

`sum` is an all_reduce of (rank + 1) over all ranks: world_size * (world_size + 1) / 2 only when the
processes really share one group (unsynchronised processes each get 1). Usage: world.py OUT_DIR
"""

import json
import socket
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

acc = Accelerator()
total = acc.reduce(torch.tensor([acc.process_index + 1.0], device=acc.device), reduction="sum")
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
info = {
    "rank": acc.process_index,
    "world_size": acc.num_processes,
    "sum": total.item(),
    "distributed_type": str(acc.distributed_type),
    "host": socket.gethostname(),
}
(out / f"world-{acc.process_index}.json").write_text(json.dumps(info))
acc.end_training()  # leave the process group: exiting with it alive can abort ("terminate called ...")
