"""lesionkit: train CNNs on dermoscopy images (ISIC) on a laptop CPU, one GPU or a Slurm cluster.

`lesionkit.load(CHECKPOINT).predict(images)` is the Python API (`lesionkit.api`); it is imported on first
use so that `lesionkit --help` does not pay for torch.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load", "Model"):
        from lesionkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lesionkit' has no attribute {name!r}")
