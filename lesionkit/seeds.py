"""Every seed lesionkit derives, from one function built on `numpy.random.SeedSequence`.

A random draw in a run depends only on (run seed, what it is for, where it happens): the epoch, the step,
the rank, the loader worker, the batch. That is what makes `--resume` (also mid-epoch) replay exactly what
an uninterrupted run would have drawn. SeedSequence hashes its entropy words so nearby inputs (step 7 and
step 8) give unrelated streams; `hash()` of a tuple or string tricks do not promise that.
"""

from __future__ import annotations

import random

import numpy as np

# What a seed is for: the first word of its entropy, so two purposes never share a stream.
STEP = 1  # torch RNG of one training step: device augmentation, mixup, dropout
PLAN = 2  # which equally sized shards go to which loader slot, per epoch
SHUFFLE = 3  # a loader worker's shard order and shuffle buffer, per epoch
WORKER_BATCH = 4  # worker-side augmentation of one batch
AUGMENT = 5  # an `Augment` module built with its own seed (previews, benchmarks)


def derive(purpose: int, *parts: int) -> int:
    """A 63-bit seed from (purpose, parts); parts are ints (negative ones are taken modulo 2**64)."""
    words = [purpose, *(int(p) % (1 << 64) for p in parts)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rng(purpose: int, *parts: int) -> random.Random:
    """A `random.Random` seeded by `derive` (the loader's shuffles and plans)."""
    return random.Random(derive(purpose, *parts))
