"""Opt-in JPEG decoding on the GPU (``featcache extract --decode gpu``).

Why: on an H200, 14 CPU workers decode about 2,300-2,650 500 x 375 JPEGs a second, which bounds
a ViT-L extraction at 0.77-0.86 of its bare forward, while torchvision's nvJPEG decode and a GPU
resize did 8,374 a second (docs/benchmarks.md, issue 24). So with ``--decode gpu`` the workers
only read (and hash) the bytes of plain JPEGs, and the thread that drives the GPU decodes a
batch of them at once with ``torchvision.io.decode_jpeg(..., device="cuda")``, resizes them
(antialiased bicubic, the shorter side to the input size) and crops the centre with the same
geometry as the PIL path (:func:`~featcache.pipeline.extract.encoders.square_geometry`). The
result is uint8, as a CPU worker ships it, so :meth:`Encoder.normalise` does the rest unchanged.

Every other row takes the CPU path, row by row, decided in the worker from the file's header
alone (:func:`nvjpeg_ready`): other formats, CMYK, grayscale and Adobe-transform JPEGs, EXIF or
XMP rotations (``decode_jpeg`` applies orientation only on the CPU), files without an end
marker (often truncated), extreme aspect ratios (the PIL path resamples only the kept part), and
data sets whose bytes are not what their images are decoded from (in-memory arrays). A JPEG the
decoder rejects in the main thread is decoded by PIL there, so a broken file still gives
featcache's one-line error, or a missing row with ``--skip-bad``.

The pixels are close to PIL's, not equal (another IDCT and chroma upsampling, torch's resampling
rounds differently), so a store made this way has a new preprocessing identity
(:func:`decoder_label`, recorded as ``preprocessing.decode``): it is never mixed with stores of
the CPU path, whose identity is unchanged.

Test hook: the same code runs with ``device="cpu"`` (``decode_jpeg`` decodes CPU tensors with
libjpeg-turbo), which ``ExtractConfig(decode="gpu")`` allows without CUDA only when
``FEATCACHE_ALLOW_CPU_NVJPEG=1`` is set. Its stores record ``"torchvision-cpu"``, not
``"nvjpeg"``: they are what the tests check, never something to read as a GPU store.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.data.rows import BadImage, ImageSide
from featcache.pipeline.extract.encoders import square_geometry

CPU_HOOK_ENV = "FEATCACHE_ALLOW_CPU_NVJPEG"  # tests only: run the --decode gpu path on the CPU


MAX_RESIZE_FLOATS = 1 << 25  # float32 values per resize call (128 MiB), so 1080p batches stay bounded


MAX_ASPECT = 8  # as pixels_of: beyond this the PIL path resamples only the crop; left to it


def decoder_label(device: torch.device) -> str:
    """What ``preprocessing.decode`` records: the decoder that made the pixels."""
    return "nvjpeg" if device.type == "cuda" else "torchvision-cpu"


def check_device(device: str) -> None:
    """Refuse ``--decode gpu`` without CUDA, before a model is loaded (``decoding.check_config``)."""
    if not _cuda_asked(device) and os.environ.get(CPU_HOOK_ENV) != "1":
        raise FeatcacheError(f"--decode gpu needs a CUDA device, but --device {device} runs on the CPU "
                             f"({'CUDA is not available' if not torch.cuda.is_available() else 'cuda not chosen'})",
                             "use --device cuda with --decode gpu, or --decode cpu")


def _cuda_asked(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


# -- in the workers ----------------------------------------------------------------------------
def nvjpeg_ready(data: bytes, size: int) -> bool:
    """Whether the GPU decoder gives this file what the PIL path would show, up to resampling:
    a baseline or progressive 3-channel YCbCr JPEG with an end marker, no rotation and an aspect
    the PIL path resizes whole. Reads the header only (PIL's ``open`` decodes no pixel)."""
    if data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB" or "adobe" in img.info:
                return False
            if img.getexif().get(0x0112, 1) != 1:  # EXIF or XMP orientation, as ImageOps.exif_transpose reads it
                return False
            _, rw, rh, _, _ = square_geometry(*img.size, size)
    except Exception:  # noqa: BLE001 - any header PIL cannot read is left to the CPU path, which names it
        return False
    return max(rw, rh) <= MAX_ASPECT * size


class JpegBatch(NamedTuple):
    """A collated batch before decoding: rows the workers decoded (uint8 pixels) and rows they
    left as JPEG bytes for the main thread. Its tensors are pinned by the DataLoader."""

    pixels: torch.Tensor | None  # (n, 3, S, S) uint8
    pixel_rows: list[int]
    blobs: list[torch.Tensor]  # 1-D uint8, the file's bytes
    blob_rows: list[int]


class JpegRows(torch.utils.data.Dataset):
    """``_ImageRows`` for ``--decode gpu``: reads and hashes a row's bytes (the one read), ships
    plain JPEGs as bytes and decodes the rest with the CPU path's ``pixels``."""

    def __init__(self, side: ImageSide, pixels, size: int):
        self.side, self.pixels, self.size = side, pixels, size

    def __len__(self) -> int:
        return len(self.side)

    def __getitem__(self, row: int):
        """(row, pixels or JPEG bytes, error, sha256 of the bytes): as ``_ImageRows``."""
        try:
            if self.side.decode is None:  # its bytes are not what it decodes (arrays): the CPU path
                image, digest = self.side.load_hashed(row)
                return row, self.pixels([image])[0], None, digest
            data = self.side.raw(row)
            digest = hashlib.sha256(data).digest()
            if nvjpeg_ready(data, self.size):
                return row, torch.frombuffer(bytearray(data), dtype=torch.uint8), None, digest
            return row, self.pixels([self.side.decode(row, data)])[0], None, digest
        except BadImage as err:
            return row, None, err.message, bytes(32)


def collate(items):
    """(rows, JpegBatch, errors, hashes), as ``run._collate`` with the pixels still to finish."""
    rows = [r for r, _, _, _ in items]
    done = [(r, x) for r, x, _, _ in items if x is not None and x.dim() == 3]
    blobs = [(r, x) for r, x, _, _ in items if x is not None and x.dim() == 1]
    errors = {r: e for r, _, e, _ in items if e is not None}
    hashes = np.frombuffer(b"".join(h for _, _, _, h in items), dtype=np.uint8).reshape(len(items), 32)
    batch = JpegBatch(torch.stack([x for _, x in done]) if done else None, [r for r, _ in done],
                      [x for _, x in blobs], [r for r, _ in blobs])
    return rows, batch, errors, hashes


# -- on the thread that drives the device ------------------------------------------------------
def decode_squares(blobs: list[torch.Tensor], size: int, device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> (3, size, size) uint8 on ``device`` each, None for a file the decoder
    rejects. One batched decode; a failing batch is retried file by file (decode_jpeg returns
    nothing of a batch with one bad file). Images of one shape are resized together."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return []
    try:
        images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = [_decode_one(b, device) for b in blobs]
    out: list[torch.Tensor | None] = [None] * len(images)
    shapes: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        if img is not None:
            shapes[(int(img.shape[1]), int(img.shape[2]))].append(i)
    for (h, w), idx in shapes.items():
        _, rw, rh, left, top = square_geometry(w, h, size)
        step = max(1, MAX_RESIZE_FLOATS // (3 * (h * w + rh * rw)))
        for s in range(0, len(idx), step):
            part = idx[s:s + step]
            x = torch.stack([images[i] for i in part]).to(torch.float32)
            if (rh, rw) != (h, w):
                x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False,
                                                    antialias=True)
            x = x[:, :, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)
            for i, img in zip(part, x):
                out[i] = img
    return out


def _decode_one(blob: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(blob, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


class DecodeStream:
    """The CUDA stream the decoding and resizing run on, apart from the model's.

    nvJPEG's hardware engine does not wait for work queued before it on the stream it is given,
    and torchvision allocates its outputs from the caching allocator of the caller's current
    stream (pytorch/vision#9606, meta-pytorch/torchcodec#1634): decoding on the model's stream
    while a forward is queued could hand nvJPEG memory that queued kernels still read. Here the
    decoder only ever sees this stream's memory, and the stream is drained (its own short resize
    work, never the forward) before each decode. The result is handed to the model's stream with
    ``wait_stream`` and ``record_stream``, so the next batch decodes while the GPU runs this one.
    On a CPU it does nothing."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(self, fn, *args):
        """``fn(*args)`` on the decode stream: a tensor (or None) the model's stream may use."""
        if self.stream is None:
            return fn(*args)
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            out = fn(*args)
        if out is not None:
            main = torch.cuda.current_stream(out.device)
            main.wait_stream(self.stream)
            out.record_stream(main)
        return out


def finish(rows: list[int], batch: JpegBatch, errors: dict, side: ImageSide, pixels, size: int,
           device: torch.device) -> torch.Tensor | None:
    """The batch's pixels on ``device``, in row order, for the rows without an error (uint8,
    (good, 3, S, S)); a JPEG the decoder rejects goes through PIL here, and if PIL rejects it too
    its error joins ``errors`` as a worker's would. Runs on the current stream (see
    :class:`DecodeStream`)."""
    parts: dict[int, torch.Tensor] = {}
    if batch.pixels is not None:
        parts.update(zip(batch.pixel_rows, batch.pixels.to(device, non_blocking=True)))
    for row, blob, img in zip(batch.blob_rows, batch.blobs, decode_squares(batch.blobs, size, device)):
        if img is None:
            try:
                img = pixels([side.decode(row, blob.numpy().tobytes())])[0].to(device)
            except BadImage as err:
                errors[row] = err.message
                continue
        parts[row] = img
    good = [r for r in rows if r in parts]
    return torch.stack([parts[r] for r in good]) if good else None


def decoded(loader, side: ImageSide, pixels, size: int, device: torch.device):
    """The loader's batches with their pixels finished: what ``_compute_chunks`` reads."""
    stream = DecodeStream(device)
    for rows, batch, errors, hashes in loader:
        yield rows, stream.run(finish, rows, batch, errors, side, pixels, size, device), errors, hashes
