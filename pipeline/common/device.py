"""Where work runs: the torch device (``auto`` prefers CUDA), and faiss on the GPU or the CPU.

faiss: a flat inner-product index on the GPU where faiss-gpu and a GPU are there, else on the
CPU; both stages' neighbour searches (layer table, retrieval) go through ``flat_ip``.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import torch

from featcache.cache.errors import FeatcacheError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatcacheError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError(f"device {device!r} was asked for but CUDA is not available", "use --device cpu")
    return dev


DEVICES = ("auto", "cpu", "gpu")


def usable_cores() -> int:
    """The CPU cores this process may use: ``OMP_NUM_THREADS`` or Slurm's ``SLURM_CPUS_PER_TASK``
    when set (a job's share of a node), else the process's CPU affinity (a container's or
    ``taskset``'s cores, not the machine's)."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """torch's intra-op CPU threads: ``n``, or ``usable_cores()``. Small heads gain little from
    many threads and lose a lot when threads outnumber free cores (docs/benchmarks.md)."""
    n = usable_cores() if n is None else n
    if n < 1:
        raise FeatcacheError(f"--threads {n}: at least one thread is needed", "use --threads 1 or more")
    torch.set_num_threads(n)
    return n


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


def available_bytes(device: torch.device) -> int:
    """Memory a run can still take on ``device``: free GPU memory, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(need: int, device: torch.device, what: str, hint: str) -> None:
    """Refuse ahead a run that cannot fit, in one line, rather than be killed by the kernel."""
    have = available_bytes(device)
    if need > have:
        raise FeatcacheError(f"{what} needs about {need / 2**30:.1f} GiB and {device.type} has "
                             f"{have / 2**30:.1f} GiB available", hint)
