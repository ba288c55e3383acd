"""`lesionkit bench loader`: images/s of the shard stream vs the seed's per-file PIL Dataset on the same
images (and the same stream with its tars parsed by wds.WebDataset: why data.py has its own reader; and
streamed over HTTP from a server on loopback, served from this process). Also the CPU cost of read +
decode + collate per image (one process, no workers), the decode limit (PIL's and torchvision's JPEG
decoders alone on the same bytes, one core) and the loader cores a GPU's step rate would need; and the
stream with `decode="device"` (workers read bytes, the batch is decoded on `--device`), with the largest
pixel difference between that decode and the workers' on the same samples."""

from __future__ import annotations

import io
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import measure, report
from lesionkit.data import eval_loader, pixels, read_with_webdataset, train_loader
from lesionkit.errors import UsageError
from lesionkit.ingest import collect, read_labels
from lesionkit.manifest import read_manifest


class _PilFiles:
    """The seed-style baseline: a map-style Dataset that opens each original JPEG with PIL and resizes it
    to the training size, per sample (torch's default collate batches the results)."""

    def __init__(self, paths: list[str], labels: list[int], size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            image = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), self.labels[i]


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    """Run an HTTP server on a thread of this process for the `with` block (tests/loopback.py's too)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """The training stream stops reading mid-shard once the epoch's equal batches are full and closes
        the connection: expected, not worth a traceback in the bench output."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _count_images(loader, epochs: int, device: torch.device | None = None) -> int:
    """Images of `epochs` passes; with `device`, each batch is first made pixels there (`data.pixels`)."""
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch[0] if device is None else pixels(batch, device))
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def _device_decode_difference(location, size: int, device: torch.device) -> int:
    """Largest absolute pixel difference between the decode on `device` and the workers' decode of the same
    samples (the first 64 in shard order): 0 on the CPU, JPEG tolerance with nvJPEG."""
    kw = {"image_size": size, "batch_size": 64, "workers": 0, "rank": 0, "world_size": 1}
    ours = next(iter(eval_loader(location, **kw)))
    theirs = next(iter(eval_loader(location, decode="device", **kw)))
    assert ours.keys == theirs.keys
    return int((pixels(theirs, device).cpu().int() - ours.images.int()).abs().max())


def _jpegs(folder: Path, manifest: dict) -> list[bytes]:
    """Every encoded image of a local shard folder, in memory: the decode-limit cases time the decoder
    alone on the very bytes the stream decodes."""
    blobs = []
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            blobs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return blobs


def _decode_pil(blobs: list[bytes]) -> int:
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            np.asarray(im.convert("RGB"))
    return len(blobs)


@contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread: the per-image CPU cost of one core. With 2 threads on a machine that is busy
    elsewhere, OpenMP's spinning waits inflated the same no-workers case from 0.58 to 4.5 CPU ms/image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _decode_torchvision(blobs: list[bytes]) -> int:
    from torchvision.io import ImageReadMode, decode_jpeg

    with _one_thread():
        for blob in blobs:  # as the stream decodes (`data._decode`)
            decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return len(blobs)


def _shard_ids(manifest: dict) -> set[str]:
    """Ids in the shards, from the manifest's sources minus what pack skipped (no need to read the tars)."""
    table, _ = read_labels(manifest["sources"]["labels"])
    return set(table["id"]) - {s["id"] for s in manifest.get("skipped", [])}


def bench(args) -> int:
    manifest = read_manifest(args.dir)
    images = args.images or manifest["sources"]["images"]
    labels = args.labels or manifest["sources"]["labels"]
    size = args.image_size or int(manifest["params"]["size"])
    table = collect(images, labels, skip_bad=True).table
    table = table[table["id"].isin(_shard_ids(manifest))]  # the same images as the shards hold
    if len(table) != manifest["num_samples"]:
        raise UsageError(
            f"{args.dir} holds {manifest['num_samples']} samples "
            f"but only {len(table)} of them are in {images} + {labels}"
        )

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def shards(read=None, location=args.dir, workers=args.workers, decode="workers") -> int:
        loader = train_loader(
            location,
            image_size=size,
            batch_size=args.batch_size,
            workers=workers,
            seed=0,
            epoch=0,
            rank=0,
            world_size=1,
            decode=decode,
        )
        if read is not None:  # same stream, tars parsed by wds.WebDataset: why data.py has its own reader
            loader.stream.read = read
        return _count_images(loader, args.epochs, device if decode == "device" else None)

    def shards_one_thread() -> int:
        with _one_thread():
            return shards(workers=0)

    def files() -> int:
        dataset = _PilFiles(list(table["path"]), list(table["label"]), size)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        return _count_images(loader, args.epochs)

    folder = Path(args.dir).resolve()
    server = _QuietServer(("127.0.0.1", 0), partial(_Quiet, directory=str(folder.parent)))
    with serving(server):
        url = f"http://127.0.0.1:{server.server_address[1]}/{folder.name}/"
        cases = {
            "shards": measure(shards, args.repeats),
            "shards over HTTP (loopback)": measure(lambda: shards(location=url), args.repeats),
            "shards, wds tar reader": measure(lambda: shards(read_with_webdataset), args.repeats),
            "shards, no workers, 1 thread": measure(lambda: shards_one_thread(), args.repeats),
            f"shards, decode on {device.type}": measure(lambda: shards(decode="device"), args.repeats),
            "files (seed)": measure(files, args.repeats),
        }
    blobs = _jpegs(folder, manifest)
    cases["decode only, PIL (1 core)"] = measure(lambda: _decode_pil(blobs), args.repeats)
    cases["decode only, torchvision (1 core)"] = measure(lambda: _decode_torchvision(blobs), args.repeats)
    per_image = cases["shards, no workers, 1 thread"][
        "cpu_ms_per_item"
    ]  # read + decode + collate, nothing else
    limit = {k: cases[f"decode only, {k} (1 core)"]["cpu_ms_per_item"] for k in ("PIL", "torchvision")}
    cores = args.gpu_rate * per_image / 1e3
    params = {
        "dir": str(args.dir),
        "images": str(images),
        "num_samples": len(table),
        "image_size": size,
        "stored_size": manifest["params"].get("size"),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "decode_collate_cpu_ms_per_image": per_image,
        "decode_limit_cpu_ms_per_image": limit,
        "gpu_rate": args.gpu_rate,
        "loader_cores_needed": round(cores, 1),
        "decode_device": str(device),
        "device_decode_max_abs_diff": _device_decode_difference(args.dir, size, device),
    }
    print(
        f"read + decode + collate: {per_image:.2f} CPU ms per image at {size} px; a GPU training at "
        f"{args.gpu_rate:,.0f} images/s needs {cores:.1f} loader cores\n"
        f"decode limit on the same bytes, one core: PIL {limit['PIL']:.2f} ms, torchvision "
        f"{limit['torchvision']:.2f} ms per image; the stream costs {per_image / limit['torchvision']:.2f}x "
        "the torchvision decode\n"
        f"decode on {device}: largest pixel difference to the workers' decode "
        f"{params['device_decode_max_abs_diff']} (of 255)"
    )
    report("loader", cases, "files (seed)", params, args.out)
    return 0
