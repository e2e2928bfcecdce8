"""Where faiss searches run: a GPU index when faiss sees a GPU, the CPU index otherwise.

Every exact search of stage two (the layer table's kNN lists, retrieval) builds its index here,
so the choice of device is made in one place. ``FEATCACHE_FAISS_DEVICE`` overrides it:
``auto`` (default: GPU 0 when ``faiss.get_num_gpus() > 0``), ``cpu``, or ``gpu`` (an error
without one). The CPU path is the reference: a GPU flat index is exact too, but sums in
another order, so scores can differ in the last bits and exact ties may come back in another
order. faiss-cpu has no GPU symbols at all, which is the clean fallback: ``get_num_gpus`` is
absent or 0 and nothing GPU-side is touched.
"""

from __future__ import annotations

import os

import faiss
import numpy as np

from featcache.cache.errors import FeatcacheError

DEVICES = ("auto", "cpu", "gpu")
GPU_MAX_K = 2048  # faiss GPU flat search returns at most this many neighbours per query
_resources = None  # one StandardGpuResources per process: it holds the GPU's scratch memory


def gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (no GPU symbols) or no CUDA device."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def use_gpu(device: str | None = None, k: int = 1) -> bool:
    """Whether a search of ``k`` neighbours runs on the GPU under ``device`` (or the env var)."""
    device = (device or os.environ.get("FEATCACHE_FAISS_DEVICE") or "auto").lower()
    if device not in DEVICES:
        raise FeatcacheError(f"unknown faiss device {device!r}", f"choose one of: {', '.join(DEVICES)}")
    if device == "cpu":
        return False
    gpus = gpu_count()
    if device == "gpu" and not (gpus and hasattr(faiss, "StandardGpuResources")):
        raise FeatcacheError("a GPU faiss search was asked for, but faiss sees no GPU",
                             "install the gpu extra (pip install 'featcache[gpu]', see docs/scale.md) or use cpu")
    return gpus > 0 and hasattr(faiss, "StandardGpuResources") and k <= GPU_MAX_K


def flat_ip(x: np.ndarray, device: str | None = None, k: int = 1):
    """An exact inner-product index holding the rows of ``x`` (float32, C order), on the GPU
    where :func:`use_gpu` says so."""
    index = faiss.IndexFlatIP(x.shape[1])
    if use_gpu(device, k):
        global _resources
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_resources, 0, index)
    index.add(x)
    return index
