"""lesionkit: train CNNs on dermoscopy images (ISIC) on a laptop CPU, one GPU or a Slurm cluster."""

__version__ = "0.1.0"
