"""Batch augmentation for dermoscopy on the device (GPU, or the CPU / loader workers where there is none).

The loader hands over uint8 batches; `build_augment` returns one module that turns them into normalized
float batches. Train mode draws random ops per sample; eval mode does only the deterministic part
(shorter side resized to `image_size`, centre crop, optional Shades-of-Gray colour constancy, normalize).

Why not a plain Kornia `AugmentationSequential`: there rotation, affine, resized crop and elastic each
resample the batch (elastic also blurs a full-resolution noise field with a 63 px kernel) and colour
jitter converts to HSV and back, which a CPU run cannot afford next to the training step. Here every
geometric op is one per-sample 2x3 matrix (plus a coarse elastic field upsampled), composed and applied
with a single `grid_sample`; brightness/contrast/saturation/hue compose into one per-sample 3x3 colour
matrix (hue = rotation about the grey axis, as in SVG `feHueRotate`). Kornia does equalization,
grayscale and resizing. Measured here (64 images, 224 px, 1 thread): `derm` 0.25 s of CPU, the same ops
as stock Kornia augmentations 3.1 s (`lesionkit bench aug` shows both).

Presets (p = per-sample probability; ranges are uniform):

| op        | none | light | derm                                         | heavy                           |
|-----------|------|-------|----------------------------------------------|---------------------------------|
| crop      | 0    | 0     | .7, area 0.6-1, ratio 3/4-4/3, center_std .1 | .8, area 0.4-1                  |
| hflip     | 0    | .5    | .5                                           | .5                              |
| vflip     | 0    | .5    | .5                                           | .5                              |
| rot90     | 0    | .75   | 0                                            | 0                               |
| rotate    | 0    | 0     | .75, +-180 deg (any angle)                   | .75                             |
| affine    | 0    | 0     | .5, shift +-10 %, zoom 0.9-1.1               | .6, shift +-15 %, zoom 0.85-1.2 |
| elastic   | 0    | 0     | .25, alpha .03, 5x5 grid                     | .35, alpha .04                  |
| hair      | 0    | 0     | .15, 1-6 strands, width 1-2 px               | .3, 1-10 strands, width 1-3 px  |
| color     | 0    | 0     | .8, bright .2, contrast .2, sat .2, hue .05  | .9, .3, .3, .3, hue .1          |
| equalize  | 0    | 0     | .1, blended 50 % with the original           | .2                              |
| noise     | 0    | 0     | .2, std up to .03                            | .3, std up to .05               |
| grayscale | 0    | 0     | .05                                          | .1                              |

`heavy` is meant to be trained with CutMix (`cutmix_alpha: 1.0` in the recipe, `build_mixup` below).
Order of application: colour constancy -> geometry (crop, affine, rotate, rot90, flips, elastic; one
resample) -> hair -> color -> equalize -> grayscale -> noise -> clamp to [0, 1] -> normalize.

Overrides: one scheme, by op name, each a mapping of that op's parameters (see `OP_PARAMS`):
`build_augment("derm", 224, mean, std, elastic={"p": 0.0}, color={"hue": 0.02})`; in a recipe
`augment_overrides: {elastic: {p: 0.0}}`. Unknown ops or parameters raise ValueError listing the valid ones
(TypeError when an op's value is not a mapping).

Random parameters are drawn on the CPU (the same stream on any device) and moved with `non_blocking=True`:
a blocking host-to-device copy waits for all the GPU work queued before it, so the ~20 copies of a `derm`
batch would each stall the CPU (measured on an H200: docs/performance.md#gpu); a non-blocking copy from
pageable memory is staged at once, so the CPU tensor may be freed.

Reproducibility: `forward(x, seed=s)` gives the same output for the same batch and seed. A module built
with `seed=` draws its k-th train batch from a stream keyed by (seed, loader worker seed, k), so reruns
repeat exactly; without a seed it uses torch's global RNG (seeded by the trainer).
"""

from __future__ import annotations

import copy
import math

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from lesionkit import seeds

PRESETS = ("none", "light", "derm", "heavy")

# Every op and its parameters, with neutral defaults (p=0: off). Presets only change values here.
OP_PARAMS: dict[str, dict] = {
    "crop": {"p": 0.0, "scale": (0.6, 1.0), "ratio": (3 / 4, 4 / 3), "center_std": 0.1},
    "hflip": {"p": 0.0},
    "vflip": {"p": 0.0},
    "rot90": {"p": 0.0},
    "rotate": {"p": 0.0, "degrees": 180.0},
    "affine": {"p": 0.0, "translate": 0.1, "scale": (0.9, 1.1)},
    "elastic": {"p": 0.0, "alpha": 0.03, "grid": 5},
    "hair": {"p": 0.0, "max_hairs": 6, "max_width": 2},
    "color": {"p": 0.0, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
    "equalize": {"p": 0.0, "strength": 0.5},
    "grayscale": {"p": 0.0},
    "noise": {"p": 0.0, "std": 0.03},
}
GEOMETRIC_OPS = ("crop", "affine", "rotate", "rot90", "hflip", "vflip", "elastic")

_PRESET_CHANGES: dict[str, dict[str, dict]] = {
    "none": {},
    "light": {"hflip": {"p": 0.5}, "vflip": {"p": 0.5}, "rot90": {"p": 0.75}},
    "derm": {
        "crop": {"p": 0.7},
        "hflip": {"p": 0.5},
        "vflip": {"p": 0.5},
        "rotate": {"p": 0.75},
        "affine": {"p": 0.5},
        "elastic": {"p": 0.25},
        "hair": {"p": 0.15},
        "color": {"p": 0.8},
        "equalize": {"p": 0.1},
        "grayscale": {"p": 0.05},
        "noise": {"p": 0.2},
    },
}
_PRESET_CHANGES["heavy"] = {
    **_PRESET_CHANGES["derm"],
    "crop": {"p": 0.8, "scale": (0.4, 1.0)},
    "affine": {"p": 0.6, "translate": 0.15, "scale": (0.85, 1.2)},
    "elastic": {"p": 0.35, "alpha": 0.04},
    "hair": {"p": 0.3, "max_hairs": 10, "max_width": 3},
    "color": {"p": 0.9, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1},
    "equalize": {"p": 0.2},
    "grayscale": {"p": 0.1},
    "noise": {"p": 0.3, "std": 0.05},
}

_LUMA = (0.299, 0.587, 0.114)


def preset_params(preset: str, **overrides) -> dict[str, dict]:
    """The full op table of a preset with overrides applied (validated)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    params = copy.deepcopy(OP_PARAMS)
    for source in (_PRESET_CHANGES[preset], overrides):
        for op, values in source.items():
            if op not in params:
                raise ValueError(f"unknown augmentation op {op!r}; valid ops: {', '.join(OP_PARAMS)}")
            if not isinstance(values, dict):
                raise TypeError(f"augmentation op {op!r}: expected a mapping like {{p: 0.5}}, got {values!r}")
            unknown = sorted(set(values) - set(params[op]))
            if unknown:
                raise ValueError(
                    f"augmentation op {op!r}: unknown parameter(s) {', '.join(unknown)}; "
                    f"valid: {', '.join(params[op])}"
                )
            params[op].update(values)
    for op, values in params.items():
        if not 0.0 <= float(values["p"]) <= 1.0:
            raise ValueError(f"augmentation op {op!r}: p must be in [0, 1], got {values['p']!r}")
    return params


def _gate(batch: int, p: float) -> torch.Tensor | None:
    """Which samples an op touches (CPU bool [B]); None when none, so p=0 is an exact no-op."""
    if p <= 0:
        return None
    mask = torch.rand(batch) < p
    return mask if bool(mask.any()) else None


def _apply(x: torch.Tensor, sel: torch.Tensor, fn) -> torch.Tensor:
    """x with fn applied to the selected samples; skips the gather/scatter when all are selected."""
    if bool(sel.all()):
        return fn(x)
    idx = _to(sel.nonzero().squeeze(1), x.device)  # CPU-made indices: no sync, unlike a bool mask
    x[idx] = fn(x[idx])
    return x


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n) * (high - low) + low


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU-drawn parameter on `device` without a stream sync (see the module docstring)."""
    return t.to(device, non_blocking=True)


def resize_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (antialiased), then the central size x size square: the eval transform."""
    h, w = x.shape[-2:]
    if min(h, w) != size:
        x = kornia.geometry.transform.resize(x, size, side="short", antialias=True)
        h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


class ShadesOfGray(nn.Module):
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004): estimate the illuminant per image as the
    Minkowski p-norm of each channel and rescale channels so it becomes neutral grey. p=6 is the usual
    choice for dermoscopy (Barata et al. 2015); it removes the colour cast of different dermatoscopes."""

    def __init__(self, power: float = 6.0, eps: float = 1e-6):
        super().__init__()
        self.power, self.eps = power, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        illum = x.clamp_min(0).pow(self.power).mean(dim=(-2, -1)).pow(1.0 / self.power)  # [B,3]
        illum = illum / illum.norm(dim=1, keepdim=True).clamp_min(self.eps)
        gain = 1.0 / (illum * math.sqrt(3.0)).clamp_min(self.eps)
        return (x * gain[..., None, None]).clamp(0.0, 1.0)


class Augment(nn.Module):
    """uint8/float [B,3,H,W] on any device -> normalized float32 [B,3,S,S]; see the module docstring."""

    def __init__(
        self,
        params: dict[str, dict],
        image_size: int,
        mean,
        std,
        color_constancy: bool = False,
        seed: int | None = None,
        preset: str = "custom",
    ):
        super().__init__()
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        self.params, self.image_size, self.preset, self.seed = params, int(image_size), preset, seed
        self.color_constancy = ShadesOfGray() if color_constancy else None
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._calls = 0

    def extra_repr(self) -> str:
        active = {op: v for op, v in self.params.items() if v["p"] > 0}
        return (
            f"preset={self.preset}, size={self.image_size}, "
            f"color_constancy={self.color_constancy is not None}, ops={active}"
        )

    # ---- entry point -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"augment expects a batch [B,3,H,W], got shape {tuple(x.shape)}")
        fresh = x.dtype != torch.float32  # converting copies; otherwise x is the caller's tensor
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.color_constancy is not None:
            x, fresh = self.color_constancy(x), True
        if not self.training or all(v["p"] <= 0 for v in self.params.values()):
            x = resize_center(x, self.image_size)
            return self._normalize(x if fresh else x.clone())
        if not fresh:
            x = x.clone()  # the random ops below write in place
        seed = self._stream_seed(seed)
        if seed is None:
            return self._normalize(self._random(x))
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if devices:
                with torch.cuda.device(x.device):
                    torch.cuda.manual_seed(seed)
            return self._normalize(self._random(x))

    def _stream_seed(self, seed: int | None) -> int | None:
        if seed is not None or self.seed is None:
            return seed
        worker = torch.utils.data.get_worker_info()
        seed = seeds.derive(seeds.AUGMENT, self.seed, worker.seed if worker else 0, self._calls)
        self._calls += 1
        return seed

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """In place (x is ours): big CPU allocations cost page faults. Noise/colour ops leave [0, 1],
        so clamp first; the model expects the normalized unit range."""
        return x.clamp_(0.0, 1.0).sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def _random(self, x: torch.Tensor) -> torch.Tensor:
        """The train-mode ops on a float [0, 1] batch this module owns (written in place where possible)."""
        x = self._geometry(x)
        x = self._hair(x)
        x = self._color(x)
        P, B = self.params, x.shape[0]
        if (sel := _gate(B, P["equalize"]["p"])) is not None:
            k = float(P["equalize"]["strength"])  # blend: full equalization blows up flat, low-contrast skin
            x = _apply(x, sel, lambda v: torch.lerp(v, kornia.enhance.equalize(v.clamp_(0.0, 1.0)), k))
        if (sel := _gate(B, P["grayscale"]["p"])) is not None:
            x = _apply(x, sel, lambda v: kornia.color.rgb_to_grayscale(v).repeat(1, 3, 1, 1))
        if (sel := _gate(B, P["noise"]["p"])) is not None:
            std = _to(torch.rand(int(sel.sum())) * P["noise"]["std"], x.device).view(-1, 1, 1, 1)
            x = _apply(x, sel, lambda v: v.add_(torch.randn_like(v).mul_(std)))
        return x

    # ---- geometry: crop/affine/rotate are per-sample 2x3 maps from output to input coordinates, composed
    # and applied with one grid_sample (plus the elastic field); flips and rot90 are exact index ops after.
    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        P, B, S = self.params, x.shape[0], self.image_size
        A = torch.eye(2).repeat(
            B, 1, 1
        )  # input = A @ output + b, in coords where the short side spans [-1, 1]
        b = torch.zeros(B, 2)
        warped = False

        def compose(sel, stage_A, stage_b, first=False):
            # A stage maps output-side coords to input-side coords; by default it goes after (nearer the
            # input than) the stages so far, with first=True before them (nearer the output).
            nonlocal A, b, warped
            warped = True
            stage_A = torch.where(sel.view(B, 1, 1), stage_A, torch.eye(2).expand(B, 2, 2))
            stage_b = stage_b * sel.view(B, 1)
            if first:
                A, b = A @ stage_A, b + (A @ stage_b.unsqueeze(-1)).squeeze(-1)
            else:
                A, b = stage_A @ A, (stage_A @ b.unsqueeze(-1)).squeeze(-1) + stage_b

        flips = {op: _gate(B, P[op]["p"]) for op in ("hflip", "vflip", "rot90")}
        turns = torch.randint(1, 4, (B,))
        if (sel := _gate(B, P["rotate"]["p"])) is not None:
            deg = float(P["rotate"]["degrees"])
            compose(sel, _rotation(_uniform(B, -deg, deg) * (math.pi / 180)), torch.zeros(B, 2))
        if (sel := _gate(B, P["affine"]["p"])) is not None:
            lo, hi = P["affine"]["scale"]
            zoom = 1.0 / _uniform(B, lo, hi)
            shift = (torch.rand(B, 2) * 2 - 1) * (2 * float(P["affine"]["translate"]))
            compose(sel, torch.diag_embed(zoom[:, None].expand(B, 2)), shift)
        if (sel := _gate(B, P["crop"]["p"])) is not None:
            c = P["crop"]
            area = _uniform(B, *c["scale"])
            log_ratio = _uniform(B, math.log(c["ratio"][0]), math.log(c["ratio"][1]))
            half = torch.stack([(area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()], 1).clamp(
                max=1.0
            )
            # Lesion-centred: dermoscopy centres the lesion, so crop centres are drawn near the middle.
            centre = (torch.randn(B, 2) * (2 * float(c["center_std"]))).clamp(-1 + half, 1 - half)
            compose(sel, torch.diag_embed(half), centre)
        coarse = None
        if (sel := _gate(B, P["elastic"]["p"])) is not None:
            g = int(P["elastic"]["grid"])
            coarse = torch.randn(B, 2, g, g) * (2 * float(P["elastic"]["alpha"])) * sel.view(B, 1, 1, 1)
            warped = True

        if warped:  # flips and rot90 fold into the same map (the first stages from the output side)
            for op, flip in (("hflip", [-1.0, 1.0]), ("vflip", [1.0, -1.0])):
                if flips[op] is not None:
                    compose(
                        flips[op],
                        torch.diag(torch.tensor(flip)).expand(B, 2, 2),
                        torch.zeros(B, 2),
                        first=True,
                    )
            if flips["rot90"] is not None:
                compose(
                    flips["rot90"], _rotation(turns.float() * (math.pi / 2)), torch.zeros(B, 2), first=True
                )
            h, w = x.shape[-2:]
            if min(h, w) > S:  # sample from an antialiased copy, not the full-resolution image
                x = kornia.geometry.transform.resize(x, S, side="short", antialias=True)
                h, w = x.shape[-2:]
            short = min(h, w)
            theta = torch.cat([A, b.unsqueeze(-1)], -1) * torch.tensor([short / w, short / h]).view(1, 2, 1)
            grid = _affine_grid(_to(theta, x.device), S)  # F.affine_grid's bmm is 4x slower on CPU
            if coarse is not None:
                # A smooth random field: coarse Gaussian offsets, bicubic to 1/8 size, then bilinear to full
                # size (a cheap stand-in for Gaussian-blurring full-resolution noise). On the device: the
                # bicubic step on the CPU took 8 ms of the training process per batch of 256 (H200 profile).
                side = max(S // 8, coarse.shape[-1])
                disp = F.interpolate(
                    _to(coarse, x.device), size=(side, side), mode="bicubic", align_corners=True
                )
                grid += F.interpolate(disp, size=(S, S), mode="bilinear", align_corners=True)
            # Outside the image is black, like a dermatoscope's vignette ("reflection" mirrors lesions that
            # touch the border into ghost lesions).
            return F.grid_sample(
                x, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros", align_corners=False
            )

        x = resize_center(x, S)  # no resampling: flips and rot90 as exact index ops
        for op, dims in (("hflip", (-1,)), ("vflip", (-2,))):
            if flips[op] is not None:
                x = _apply(x, flips[op], lambda v, dims=dims: v.flip(dims))
        if flips["rot90"] is not None:
            for k in (1, 2, 3):
                if bool((pick := flips["rot90"] & (turns == k)).any()):
                    x = _apply(x, pick, lambda v, k=k: torch.rot90(v, k, dims=(-2, -1)))
        return x

    # ---- synthetic hair: thin dark quadratic Bezier strands, splatted into a mask for the whole batch --
    def _hair(self, x: torch.Tensor) -> torch.Tensor:
        P = self.params["hair"]
        sel = _gate(x.shape[0], P["p"])
        if sel is None:
            return x
        idx = sel.nonzero().squeeze(1)
        n, K, S, W = len(idx), int(P["max_hairs"]), x.shape[-1], int(P["max_width"])
        count = torch.randint(1, K + 1, (n, 1))
        active = torch.arange(K).view(1, K) < count  # [n,K]
        start = torch.rand(n, K, 2) * S
        angle = torch.rand(n, K) * (2 * math.pi)
        length = _uniform(n * K, 0.3, 0.9).view(n, K) * S
        direction = torch.stack([angle.cos(), angle.sin()], -1)
        end = start + direction * length[..., None]
        normal = torch.stack([-direction[..., 1], direction[..., 0]], -1)
        bend = _uniform(n * K, -0.3, 0.3).view(n, K, 1) * length[..., None]
        ctrl = (start + end) / 2 + normal * bend
        width = torch.randint(1, W + 1, (n, K))
        alpha = _uniform(n, 0.6, 0.95)
        colour = _uniform(n, 0.02, 0.2).view(n, 1) * torch.tensor([1.0, 0.8, 0.65])  # dark brown-black

        dev = x.device
        t = torch.linspace(0, 1, 2 * S, device=dev).view(1, 1, -1, 1)
        s0, c0, e0 = _to(start, dev)[:, :, None], _to(ctrl, dev)[:, :, None], _to(end, dev)[:, :, None]
        pts = (1 - t) ** 2 * s0 + 2 * (1 - t) * t * c0 + t**2 * e0  # [n,K,M,2], ~0.5 px apart
        off = torch.stack(torch.meshgrid(torch.arange(W), torch.arange(W), indexing="xy"), -1).view(-1, 2)
        keep = (off.view(1, 1, -1, 2) < width.view(n, K, 1, 1)).all(-1) & active[..., None]  # [n,K,O]
        xy = pts.floor().long()[:, :, :, None, :] + _to(off, dev).view(1, 1, 1, -1, 2)  # [n,K,M,O,2]
        inside = ((xy >= 0) & (xy < S)).all(-1) & _to(keep, dev)[:, :, None, :]
        flat = (torch.arange(n, device=dev).view(n, 1, 1, 1) * S + xy[..., 1]) * S + xy[..., 0]
        # Off-image points go to one spare slot at the end (no boolean indexing: no device sync).
        flat = torch.where(inside, flat, n * S * S).view(-1)
        values = _to(alpha, dev).view(n, 1, 1, 1).expand_as(xy[..., 0]).reshape(-1)
        mask = torch.zeros(n * S * S + 1, device=dev).scatter_reduce_(0, flat, values, reduce="amax")
        mask = mask[:-1].view(n, 1, S, S)
        mask = torch.maximum(mask, 0.5 * F.avg_pool2d(mask, 3, 1, 1))  # soft edge
        colour = _to(colour, dev).view(n, 3, 1, 1)
        return _apply(x, sel, lambda v: v.mul_(1 - mask).add_(colour * mask))

    # ---- colour jitter as one per-sample affine colour transform ---------------------------------
    def _color(self, x: torch.Tensor) -> torch.Tensor:
        P, B = self.params["color"], x.shape[0]
        sel = _gate(B, P["p"])
        if sel is None:
            return x
        bright = _uniform(B, 1 - P["brightness"], 1 + P["brightness"])
        contrast = _uniform(B, 1 - P["contrast"], 1 + P["contrast"])
        sat = _uniform(B, 1 - P["saturation"], 1 + P["saturation"])
        hue = _uniform(B, -P["hue"], P["hue"]) * (2 * math.pi)
        luma = torch.tensor(_LUMA)
        saturation = sat.view(B, 1, 1) * torch.eye(3) + (1 - sat).view(B, 1, 1) * luma.view(1, 1, 3)
        matrix = _hue_rotation(hue) @ saturation * (bright * contrast).view(B, 1, 1)
        matrix, offset_scale = _to(matrix[sel], x.device), _to(((1 - contrast) * bright)[sel], x.device)

        def jitter(v):
            # contrast blends towards the image's mean grey; grey is a fixed point of hue and saturation
            grey_mean = torch.einsum("c,bchw->b", _to(luma, v.device), v) / (v.shape[-1] * v.shape[-2])
            out = torch.einsum("bij,bjhw->bihw", matrix, v)
            return out.add_((offset_scale * grey_mean).view(-1, 1, 1, 1))

        return _apply(x, sel, jitter)


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """`F.affine_grid(theta, [B, C, size, size], align_corners=False)` by broadcasting, channels first:
    [B, 2, size, size] (x, y)."""
    lin = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    xs, ys = lin.view(1, 1, size), lin.view(1, size, 1)
    t = theta[..., None, None]  # [B,2,3,1,1]
    grid = t[:, :, 0] * xs + t[:, :, 1] * ys + t[:, :, 2]  # [B,2,S,S]
    return grid


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _hue_rotation(theta: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 RGB matrices rotating hue by theta about the grey axis (the SVG feHueRotate matrix)."""
    c, s = theta.cos().view(-1, 1, 1), theta.sin().view(-1, 1, 1)
    base = torch.tensor([[0.213, 0.715, 0.072]] * 3)
    cos_part = torch.tensor([[0.787, -0.715, -0.072], [-0.213, 0.285, -0.072], [-0.213, -0.715, 0.928]])
    sin_part = torch.tensor([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])
    return base + c * cos_part + s * sin_part


def build_augment(
    preset: str,
    image_size: int,
    mean,
    std,
    color_constancy: bool = False,
    seed: int | None = None,
    **overrides,
) -> Augment:
    """The batch augmentation module for a preset (table above); overrides are {op: {param: value}}."""
    return Augment(preset_params(preset, **overrides), image_size, mean, std, color_constancy, seed, preset)


def choose_placement(device_type: str, preset: str) -> str:
    """Where augmentation runs: on the device batch ("device") or in the loader workers ("workers").

    A GPU does it in a few ms per batch, so it stays on the device. On a CPU it competes with the training
    step for the same cores; in the workers it overlaps the step, so CPU runs use the workers unless there
    is nothing random to do. `lesionkit bench aug` times both; on the 2-core dev box `derm` is 1.5-3 % of a
    resnet18 CPU step, so the placement barely matters there (the workers also pay a pipeline fill per
    epoch)."""
    if device_type != "cpu":
        return "device"
    return "device" if preset == "none" else "workers"


def build_mixup(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
    """torchvision's `v2.MixUp` / `v2.CutMix` (one of the two per batch when both alphas are > 0), applied to
    the normalized device batch after `Augment`: `mix(images, labels) -> (images, soft targets [B, C])`.
    They draw from torch's global RNG, which the trainer seeds per step. None when both alphas are 0."""
    from torchvision.transforms import v2

    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    ops = [
        op(alpha=alpha, num_classes=num_classes)
        for op, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
        if alpha > 0
    ]
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
