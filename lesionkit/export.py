"""Export a checkpoint for serving stacks: ONNX (onnxruntime, TensorRT, ...) or TorchScript (libtorch).

The graph maps a normalised float batch [B, 3, S, S] (any B) to probabilities, softmax(logits / T) with
the checkpoint's temperature inside; a model trained with metadata takes a second input, its encoded
features [B, F] (`metafeatures.MetaSpec.serving` in the JSON says how a client builds them). Decoding,
resizing, colour constancy and normalisation stay outside (they differ per serving stack) and are written
beside the file as JSON (`<file>.json`: size, mean, std, colour constancy, classes, temperature), so a
client can reproduce `inference.build_preprocess`.

Every export is checked before it is published: the exported graph (run by onnxruntime or by the
reloaded TorchScript module) against the PyTorch model on real images, at a batch size other than the
one traced; the largest absolute probability difference is reported and above `tol` the export fails and
nothing is written.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionkit import __version__
from lesionkit.atomic import replacing, write_json
from lesionkit.errors import RunError, UsageError

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4
ONNX_OPSET = 17
CONSTANCY = "colour constancy: Shades of Gray, p = 6, per image (lesionkit.augment.ShadesOfGray)"


class Probabilities(nn.Module):
    """The exported graph: a registry model, then softmax(logits / temperature)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x) / self.temperature, dim=1)


class MetaProbabilities(Probabilities):
    """The same for a model trained with metadata (`models.MetaFusion`): images and features in."""

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x, meta) / self.temperature, dim=1)


def sidecar_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".json")


def parity_inputs(model, images=None, metadata=None, n: int = 16):
    """(uint8 [N, 3, S, S], metadata features [N, F] or None, where from): the given image files/folders
    (with `metadata`, id -> {age, sex, site}, for a model that takes it), else the first `n` samples of
    the checkpoint's own validation data (`val` in its config.yaml, or the fold it held out)."""
    from lesionkit import api
    from lesionkit.config import load_config

    if images:
        _, items = api.image_items(images)
        batches = list(model.read(items[:n], batch_size=n, metadata=metadata))  # names unreadable files
        return (
            torch.cat([b.images for b in batches]),
            None if model.meta is None else torch.cat([b.meta for b in batches]),
            f"{sum(len(b.keys) for b in batches)} image(s) from {' '.join(map(str, images))}",
        )
    cfg = load_config(model.checkpoint / "config.yaml")
    folders, folds = (cfg.train, [cfg.fold]) if not cfg.val and cfg.fold >= 0 else (cfg.val, None)
    if not folders or not all(Path(v).is_dir() for v in folders):
        raise UsageError(
            f"{model.checkpoint} names no validation shards here to check parity on; pass --images "
            "with a few real images"
        )
    from lesionkit.data import eval_loader

    taken = []
    for batch in eval_loader(
        folders,
        image_size=model.image_size,
        batch_size=n,
        workers=0,
        rank=0,
        world_size=1,
        features=model.meta,
        folds=folds,
    ):
        taken.append(batch)
        if sum(len(b.keys) for b in taken) >= n:
            break
    u8 = torch.cat([b.images for b in taken])[:n]
    meta = None if model.meta is None else torch.cat([b.meta for b in taken])[:n]
    held = f" (fold {cfg.fold})" if folds else ""
    return u8, meta, f"{len(u8)} validation image(s) from {' '.join(folders)}{held}"


def export(
    checkpoint, fmt: str, out, images=None, n: int = 16, tol: float = TOLERANCE, force=False, metadata=None
) -> dict:
    """Export `checkpoint` to `out` in `fmt`, check parity, then publish `out` and its JSON; returns the
    sidecar's content (with `parity.max_abs_diff`). An existing `out` is kept unless `force`. `metadata`:
    a CSV of the `images`' age/sex/site, for a model trained with metadata."""
    from lesionkit import api

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    for path in (out, sidecar_path(out)):
        if path.exists() and not force:
            raise UsageError(f"{path} exists; pass --force to replace it or choose another --out")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the file to write")
    model = api.load(checkpoint, "cpu")
    if metadata is not None and model.meta is None:
        raise UsageError(f"--metadata: {checkpoint} was trained on images only; it takes no metadata")
    if images and model.meta is not None and metadata is None:
        raise UsageError(
            f"{checkpoint} takes metadata ({','.join(model.meta.fields)}) beside the image: pass --metadata "
            "CSV with the --images' values, or leave out --images to check on its validation shards"
        )
    u8, meta, source = parity_inputs(model, images, metadata, n)
    with torch.no_grad():
        x = (model.preprocess(u8).contiguous(),) + (() if meta is None else (meta.float(),))
        graph = (Probabilities if meta is None else MetaProbabilities)(model.module, model.temperature).eval()
        reference = graph(*x).numpy()
    # traced at another batch size than checked
    example = tuple(torch.cat([t] * 3)[: 3 if len(t) == 2 else 2] for t in x)
    with replacing(out) as tmp:
        got = (_onnx if fmt == "onnx" else _torchscript)(graph, example, x, tmp)
        diff = float(np.abs(got - reference).max())
        if not np.isfinite(diff) or diff > tol:
            raise RunError(
                f"{fmt} export of {checkpoint} failed the parity check: max |p_{fmt} - p_torch| = {diff:.3g} "
                f"> {tol:g} on {source}; nothing written"
            )
        info = model.info
        facts = {
            "format": fmt,
            "model": info["model"],
            "checkpoint": str(checkpoint),
            "lesionkit_version": __version__,
            "input": {
                "name": "image",
                "shape": ["batch", 3, model.image_size, model.image_size],
                "dtype": "float32",
                "layout": "NCHW, RGB",
            },
            "output": {
                "name": "probabilities",
                "shape": ["batch", len(model.classes)],
                "what": "softmax(logits / temperature); the temperature is applied inside the graph",
            },
            "preprocessing": {
                "steps": [
                    "decode RGB, apply EXIF orientation",
                    "resize the shorter side to image_size (Lanczos), centre crop image_size x image_size",
                    "scale to [0, 1] (divide by 255)",
                    *([CONSTANCY] if info.get("color_constancy") else []),
                    "normalise per channel: (x - mean) / std",
                ],
                "image_size": model.image_size,
                "mean": list(info["mean"]),
                "std": list(info["std"]),
                "color_constancy": bool(info.get("color_constancy", False)),
            },
            "classes": model.classes,
            "temperature": model.temperature,
            "parity": {"images": source, "n": len(u8), "max_abs_diff": diff, "tolerance": tol},
        }
        if model.meta is not None:
            facts["metadata_input"] = {
                "name": "metadata",
                "shape": ["batch", model.meta.size],
                "dtype": "float32",
                **model.meta.serving(),
            }
    write_json(sidecar_path(out), facts)
    return facts


class FixedAdaptiveAvgPool(nn.Module):
    """`nn.AdaptiveAvgPool2d` for one input size as two constant averaging matrices: the same bins, but
    ONNX's exporter only takes adaptive pools whose output size divides the input size (CustomNet's 4x4
    pool and AlexNet's 6x6 pool at small image sizes do not)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", _bins(in_hw[0], out_hw[0]))
        self.register_buffer("cols", _bins(in_hw[1], out_hw[1]).T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


def _bins(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: row i averages torch's adaptive bin floor(i*n/o) .. ceil((i+1)*n/o)."""
    a = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        a[i, lo:hi] = 1.0 / (hi - lo)
    return a


@contextlib.contextmanager
def onnx_friendly(graph: nn.Module, example: tuple[torch.Tensor, ...]):
    """Within the block, the adaptive average pools of `graph` that ONNX cannot express at the input size
    of `example` (its inputs) are `FixedAdaptiveAvgPool`s (an export has a fixed image size, so nothing
    is lost); the originals are put back after (no copy of a 240 MB AlexNet)."""
    from lesionkit.models import _set_submodule

    seen: dict[str, tuple] = {}

    def record(name):
        return lambda m, i, o: seen.__setitem__(name, (tuple(i[0].shape[-2:]), tuple(o.shape[-2:])))

    pools = {n: m for n, m in graph.named_modules() if type(m) is nn.AdaptiveAvgPool2d}
    hooks = [m.register_forward_hook(record(n)) for n, m in pools.items()]
    with torch.no_grad():
        graph(*example)
    for hook in hooks:
        hook.remove()
    swapped = [name for name, (hw, out) in seen.items() if hw[0] % out[0] or hw[1] % out[1]]
    try:
        for name in swapped:
            _set_submodule(graph, name, FixedAdaptiveAvgPool(*seen[name]))
        yield graph
    finally:
        for name in swapped:
            _set_submodule(graph, name, pools[name])


def _onnx_export(graph, *args, **kwargs) -> None:
    """torch's TorchScript-based ONNX exporter; an operator ONNX cannot express is one RunError line."""
    try:
        torch.onnx.export(graph, *args, **kwargs)
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise RunError(f"ONNX cannot express this model at this image size: {first}") from None


def _onnx(graph: nn.Module, example: tuple, x: tuple, path: Path) -> np.ndarray:
    import onnxruntime as ort

    names = ["image", "metadata"][: len(x)]

    with (
        warnings.catch_warnings(),
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
        onnx_friendly(graph, example) as friendly,
    ):
        warnings.simplefilter("ignore")
        _onnx_export(
            friendly,
            example,
            str(path),
            input_names=names,
            output_names=["probabilities"],
            dynamic_axes={name: {0: "batch"} for name in [*names, "probabilities"]},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {name: t.numpy() for name, t in zip(names, x)})[0]


def _torchscript(graph: nn.Module, example: tuple, x: tuple, path: Path) -> np.ndarray:
    """`torch.jit.script` (control flow and shapes kept as code); a model it cannot compile is traced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(graph)
        except Exception:  # noqa: BLE001 - TorchScript's compile errors have no common type
            scripted = torch.jit.trace(graph, example)
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(*x).numpy()
