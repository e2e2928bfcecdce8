"""Where work runs: the torch device (``auto`` prefers CUDA), and exact neighbour search.

Both stages' neighbour searches (layer table, retrieval) go through ``flat_ip``: an exact flat
inner-product index, from faiss on the GPU where faiss-gpu sees one, else from torch on the GPU
where torch sees CUDA (``featcache.pipeline.common.torch_knn``: faiss-gpu cannot be installed on
every CUDA machine), else from faiss on the CPU. ``FEATCACHE_FAISS_DEVICE`` (or a caller's
``device``) forces one: ``cpu``, ``gpu`` (faiss-gpu) or ``torch``.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import torch

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.torch_knn import TorchFlatIP


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


DEVICES = ("auto", "cpu", "gpu", "torch")


def usable_cores() -> int:
    """The CPU cores this process may use: Slurm's ``SLURM_CPUS_PER_TASK`` when set (a job's share
    of a node), else the process's CPU affinity (a container's or ``taskset``'s cores, not the
    machine's). Decoding workers are counted from it; ``OMP_NUM_THREADS`` is a thread setting, not
    a core count, so it bounds torch's threads (``default_threads``) but never the workers."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def default_threads() -> int:
    """torch's CPU threads when ``--threads`` is not given: ``OMP_NUM_THREADS`` when set, else
    ``usable_cores()``."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else usable_cores()


def set_threads(n: int | None = None) -> int:
    """torch's intra-op CPU threads: ``n``, or ``default_threads()``. Small heads gain little from
    many threads and lose a lot when threads outnumber free cores (docs/benchmarks.md)."""
    n = default_threads() if n is None else n
    most = 4 * (os.cpu_count() or 1)  # beyond that torch's thread pool only thrashes (and huge counts crash it)
    if not 1 <= n <= most:
        raise FeatcacheError(f"--threads {n}: this machine takes 1 to {most} threads ({os.cpu_count()} cores)",
                             f"use --threads 1 to {usable_cores()}, the cores this process may use")
    torch.set_num_threads(n)
    return n


GPU_MAX_K = 2048  # faiss GPU flat search returns at most this many neighbours per query


_resources = None  # one StandardGpuResources per process: it holds the GPU's scratch memory


def gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (no GPU symbols) or no CUDA device."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def search_backend(device: str | None = None, k: int = 1) -> str:
    """Which exact search runs ``k`` neighbours under ``device`` (or the env var): ``gpu``
    (faiss-gpu), ``torch`` or ``cpu`` (faiss-cpu)."""
    device = (device or os.environ.get("FEATCACHE_FAISS_DEVICE") or "auto").lower()
    if device not in DEVICES:
        raise FeatcacheError(f"unknown faiss device {device!r}", f"choose one of: {', '.join(DEVICES)}")
    if device in ("cpu", "torch"):
        return device
    faiss_gpu = gpu_count() > 0 and hasattr(faiss, "StandardGpuResources")
    if device == "gpu" and not faiss_gpu:
        raise FeatcacheError("a GPU faiss search was asked for, but faiss sees no GPU",
                             "install the gpu extra (pip install 'featcache[gpu]', see docs/scale.md), "
                             "or use torch (an exact search on torch's GPU) or cpu")
    if faiss_gpu and k <= GPU_MAX_K:
        return "gpu"
    return "torch" if device == "auto" and torch.cuda.is_available() else "cpu"


def use_gpu(device: str | None = None, k: int = 1) -> bool:
    """Whether a search of ``k`` neighbours runs on faiss's GPU index under ``device`` (or the env var)."""
    return search_backend(device, k) == "gpu"


def flat_ip(x: np.ndarray, device: str | None = None, k: int = 1):
    """An exact inner-product index holding the rows of ``x`` (float32, C order), from the
    backend :func:`search_backend` chooses."""
    backend = search_backend(device, k)
    if backend == "torch":
        index = TorchFlatIP(x.shape[1])
        index.add(x)
        return index
    index = faiss.IndexFlatIP(x.shape[1])
    if backend == "gpu":
        global _resources
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_resources, 0, index)
    index.add(x)
    return index


def available_bytes(device: torch.device) -> int:
    """Memory a run can still take on ``device``: free GPU memory; on the CPU the least of the
    machine's available RAM, the headroom under the process's cgroup limit (a container, a
    Slurm job) and under its address-space rlimit (``ulimit -v``). MemAvailable alone would
    promise a job in a 16 GB cgroup the host's 500 GB, and the kernel would kill it instead."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return min(v for v in (_meminfo_available(), cgroup_headroom(), rlimit_headroom()) if v is not None)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def cgroup_headroom(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """limit - usage of the process's memory cgroup (v2, else v1), or None without a limit.
    The group's own folder is tried first, then the namespace root a container mounts."""
    try:
        with open(proc) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, group in lines:
        if controllers == "":
            files, base = ("memory.max", "memory.current"), root
        elif "memory" in controllers.split(","):
            files, base = ("memory.limit_in_bytes", "memory.usage_in_bytes"), f"{root}/memory"
        else:
            continue
        for folder in (base + group.rstrip("/"), base):
            limit, used = (_read_int(f"{folder}/{name}") for name in files)
            if limit is not None and used is not None and limit < 2**60:  # v1 writes 2^63 - 4096 for none
                return max(0, limit - used)
    return None


def rlimit_headroom() -> int | None:
    """The address space left under RLIMIT_AS (``ulimit -v``), or None when unlimited."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return None
    return max(0, soft - size)


def check_fits(need: int, device: torch.device, what: str, hint: str) -> None:
    """Refuse ahead a run that cannot fit, in one line, rather than be killed by the kernel."""
    have = available_bytes(device)
    if need > have:
        raise FeatcacheError(f"{what} needs about {need / 2**30:.1f} GiB and {device.type} has "
                             f"{have / 2**30:.1f} GiB available", hint)
