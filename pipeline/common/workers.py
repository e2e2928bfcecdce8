"""Who does which chunks: one process, ``--shard I/N``, or ranks under torchrun.

Chunks are dealt round-robin (chunk b belongs to worker b mod N). A worker that finishes its
own chunks then takes unfinished chunks of the others from the far end of the list, so a slow
worker does not hold up the job (see docs/scale.md). Chunks are independent, complete chunk
writes, so a chunk done twice is only wasted time.

Each (store, worker) pair holds an exclusive file lock while it writes
(``featcache.cache.locks``): a second extraction of the same shard into the same store is
refused with a message instead of interleaving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from featcache.cache.errors import FeatcacheError


@dataclass(frozen=True)
class Worker:
    index: int = 0
    count: int = 1
    distributed: bool = False  # ranks of a torch.distributed job
    local_rank: int = 0

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"

    def own(self, chunks: list[int]) -> list[int]:
        return [b for b in chunks if b % self.count == self.index]

    def share(self, items: list) -> list:
        """Every N-th item from the I-th: this worker's cells of a sweep grid in its fixed order."""
        return items[self.index::self.count]

    def steal_order(self, chunks: list[int]) -> list[int]:
        """Other workers' chunks, from the far end, for when this worker's own are done."""
        return [b for b in reversed(chunks) if b % self.count != self.index]


def parse_shard(spec: str | None) -> Worker | None:
    if not spec:
        return None
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise FeatcacheError(f"bad --shard {spec!r}", "write I/N with 0 <= I < N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise FeatcacheError(f"bad --shard {spec!r}", "write I/N with 0 <= I < N, e.g. 0/4")
    return Worker(i, n)


def from_environment() -> Worker:
    """The torchrun rank when launched by torchrun (WORLD_SIZE > 1), else a single worker."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Worker()
    return Worker(int(os.environ["RANK"]), world, True, int(os.environ.get("LOCAL_RANK", "0")))


def grid_worker(spec: str | None) -> Worker:
    """Which share of a sweep's cells this process trains: ``--shard I/N``, else torchrun's
    RANK/WORLD_SIZE, else a Slurm array's SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else all."""
    if spec:
        return parse_shard(spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return Worker(int(os.environ["RANK"]), world)
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if count > 1:  # task ids may start at any offset: index from the minimum
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Worker(int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, count)
    return Worker()


def init_distributed(worker: Worker, device_type: str) -> None:
    import torch.distributed as dist

    if worker.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def barrier(worker: Worker) -> None:
    import torch.distributed as dist

    if worker.distributed and dist.is_initialized():
        dist.barrier()
