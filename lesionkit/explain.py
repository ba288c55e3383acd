"""Where the model looked: Grad-CAM heat maps (pytorch-grad-cam, `grad-cam` on PyPI) over images, for the
predicted class and any class asked for, as PNG overlays and one contact sheet with the probabilities under
each image.

The target layer is named per architecture in the registry (`models.CAM_LAYERS`). Images take the
checkpoint's own preprocessing (`api.Model.preprocess`), so the map explains the probability the API and
`evaluate` report; maps are upsampled to the model's input size, i.e. the centre crop the model saw. A
model trained with metadata is explained with each image's own metadata held fixed (`_WithMeta`): the map
shows where in the image the evidence for the class is, given that patient's age, sex and site.
`evaluate --explain-errors N` uses `most_confident_errors` + `write_explanations` on its mistakes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from lesionkit.atomic import staged_dir, write_bytes, write_text
from lesionkit.errors import UsageError

SHEET = "contact_sheet.png"
CAM_BATCH = 16


class _WithMeta(torch.nn.Module):
    """A metadata model as the one-input model Grad-CAM calls: `meta` is the batch's features, set per
    batch."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.meta = net, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.meta)


def class_activation_maps(model, images: torch.Tensor, targets: list[int], meta=None) -> np.ndarray:
    """float32 [N, S, S] in [0, 1]: Grad-CAM of class `targets[i]` over uint8 image `images[i]` [3, S, S]
    (with metadata features `meta[i]` for a model trained with metadata)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from lesionkit.models import cam_layer

    if (meta is None) != (model.meta is None):
        raise UsageError(
            f"{model.checkpoint} takes "
            + ("no metadata" if model.meta is None else f"metadata ({','.join(model.meta.fields)})")
            + f" beside the image; Grad-CAM was given {'none' if meta is None else 'some'}"
        )
    net = model.module
    layer = cam_layer(net, model.info["model"])
    called = net if meta is None else _WithMeta(net)
    out = []
    with GradCAM(model=called, target_layers=[layer]) as cam:
        for s in range(0, len(images), CAM_BATCH):
            x = model.preprocess(images[s : s + CAM_BATCH].to(model.device))
            if meta is not None:
                called.meta = meta[s : s + CAM_BATCH].to(model.device)
            wanted = [ClassifierOutputTarget(int(t)) for t in targets[s : s + CAM_BATCH]]
            out.append(np.asarray(cam(input_tensor=x, targets=wanted), dtype=np.float32))
    net.eval()
    return np.concatenate(out) if out else np.zeros((0, model.image_size, model.image_size), np.float32)


def overlay(image: torch.Tensor, cam: np.ndarray) -> np.ndarray:
    """uint8 HxWx3: the heat map (jet) blended over the image the model saw."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.55)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def contact_sheet(cells: list[dict], path: Path, title: str, columns: int = 6) -> Path:
    """One PNG: each cell's overlay with its id (and truth) above and its probabilities below."""
    from matplotlib.figure import Figure

    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    lines = max(len(c["caption"]) for c in cells)
    fig = Figure(figsize=(2.3 * columns, (2.3 + 0.17 * lines) * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax, cell in zip(axes, cells):
        ax.imshow(cell["image"])
        ax.set_title(cell["title"], fontsize=7)
        ax.set_xlabel("\n".join(cell["caption"]), fontsize=6.5, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(cells) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return write_bytes(path, buf.getvalue())


def write_explanations(
    model,
    keys,
    images: torch.Tensor,
    probs: np.ndarray,
    folder: Path,
    extra=(),
    labels=None,
    title="",
    meta=None,
) -> list[dict]:
    """Into `folder`: `<id>__<class>.png` overlays for the predicted class and each class index in `extra`
    (and the true class, given `labels`), the contact sheet (predicted class) and explanations.csv (one
    row per overlay: its map's peak and the probabilities). `meta`: the images' metadata features."""
    import pandas as pd

    classes = model.classes
    pred = probs.argmax(axis=1)
    jobs = [
        (i, int(c))
        for i in range(len(keys))
        for c in dict.fromkeys([int(pred[i]), *extra, *([] if labels is None else [int(labels[i])])])
    ]
    rows_of_jobs = [i for i, _ in jobs]
    maps = class_activation_maps(
        model, images[rows_of_jobs], [c for _, c in jobs], None if meta is None else meta[rows_of_jobs]
    )
    cells, rows = [], []
    for (i, c), cam in zip(jobs, maps):
        picture = overlay(images[i], cam)
        write_bytes(folder / f"{keys[i]}__{classes[c]}.png", _png(picture))
        peak = np.unravel_index(int(cam.argmax()), cam.shape)
        rows.append(
            {"image_id": keys[i], "class": classes[c], "peak_y": int(peak[0]), "peak_x": int(peak[1])}
        )
        if c == pred[i]:
            truth = "" if labels is None else f"\ntrue: {classes[labels[i]]}"
            caption = [
                f"{'> ' if k == c else '  '}{name} {probs[i, k]:.3f}" for k, name in enumerate(classes)
            ]
            cells.append({"image": picture, "title": f"{keys[i]}{truth}", "caption": caption})
    table, row_of = pd.DataFrame(rows), {k: i for i, k in enumerate(keys)}
    for k, name in enumerate(classes):
        table[f"p_{name}"] = [float(probs[row_of[r["image_id"]], k]) for r in rows]
    write_text(folder / "explanations.csv", table.to_csv(index=False))
    if cells:
        contact_sheet(
            cells, folder / SHEET, title or f"Grad-CAM of the predicted class: {model.info['model']}"
        )
    return rows


def explain(checkpoint, images, out, classes=(), force: bool = False, device="cpu", metadata=None) -> Path:
    """`lesionkit explain`: Grad-CAM overlays, a contact sheet and explanations.csv for image files or
    folders, written as one new folder `out` (an existing one is kept unless `force`). `metadata`: a CSV
    of the images' age/sex/site, for a model trained with metadata (as `predict --metadata`)."""
    from lesionkit import api

    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it or choose another --out")
    model = api.load(checkpoint, device)
    unknown = [c for c in classes if c not in model.classes]
    if unknown:
        raise UsageError(f"--classes {unknown}: not classes of {checkpoint} ({', '.join(model.classes)})")
    _, items = api.image_items(images)
    # decoded once, for the probabilities and the maps; refuses metadata missing for, or given to, the model
    batches = list(model.read(items, CAM_BATCH, metadata=metadata))
    keys, _, probs = model.predict_batches(batches)
    extra = [model.classes.index(c) for c in classes]
    meta = None if model.meta is None else torch.cat([b.meta for b in batches])
    with staged_dir(out) as tmp:
        write_explanations(model, keys, torch.cat([b.images for b in batches]), probs, tmp, extra, meta=meta)
    return out


def most_confident_errors(labels: np.ndarray, probs: np.ndarray, n: int) -> list[int]:
    """Indices of the `n` most confident mistakes of each true class (highest probability of the wrong
    predicted class first), class by class."""
    pred = probs.argmax(axis=1)
    picked = []
    for c in range(probs.shape[1]):
        wrong = np.flatnonzero((labels == c) & (pred != c))
        order = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")]
        picked += order[:n].tolist()
    return picked
