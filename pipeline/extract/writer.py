"""Whole chunks written off the thread that drives the encoder.

Writing a chunk (the range checks, the scatter of its batches into one buffer, zstd and crc32c,
the seals, the zarr writes, then the done flags) took 0.29 ms per ViT-L image on the forward
thread, time in which the GPU had nothing queued. A :class:`ChunkWriter` with ``depth`` > 0
does it on its own thread, fed through a queue of at most ``depth`` whole chunks, so memory
stays bounded and a slow disk slows the forward down instead of filling memory. ``depth`` 0
writes inline, on the caller's thread: the serial path, kept selectable because a test shows
both give bitwise-equal stores and the device benchmark times one against the other.

The store's invariants do not depend on the thread: only whole chunks are written, done flags
last, so a kill at any moment leaves finished chunks and nothing that looks finished. A
writer's error (a full disk, a lost lease) stops the run: it is raised on the forward thread at
its next :meth:`ChunkWriter.put` and at the end, as one line naming the chunk. When the forward
thread stops first (a bad image, Ctrl-C), the chunks already queued are written before its
error goes on, as the serial path would have written them.
"""

from __future__ import annotations

import errno
import queue
import threading
from dataclasses import dataclass

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.pipeline.extract.transfer import HostBatch, first_problem


@dataclass
class ChunkBatch:
    """One batch of one chunk, as the forward thread hands it over."""

    rows: list[int]  # every row of the batch
    good: list[int]  # the rows that were computed, in the order of ``out``'s batch axis
    errors: dict[int, str]  # the rows recorded as missing (--skip-bad), with why
    hashes: np.ndarray | None  # (len(rows), 32) sha256 of each row's input bytes (image rows)
    out: HostBatch | None  # the good rows' features; None when no row of the batch was good


def write_failure(path, chunk: int, err: Exception) -> Exception:
    """What a failed chunk write says to the user: one line naming the chunk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return FeatcacheError(f"no space left on the device of {path} while writing chunk {chunk} ({err.strerror})",
                              "free some space and run the same command again; finished chunks are kept "
                              "and the run resumes where it stopped")
    if isinstance(err, OSError):
        return FeatcacheError(f"chunk {chunk} of {path} could not be written ({err.strerror or err})",
                              "finished chunks are kept; fix the cause and run the same command again")
    if isinstance(err, FeatcacheError):
        return FeatcacheError(f"chunk {chunk} of {path} was not written: {err.message}", err.hint)
    return err  # a bug: its own traceback says more than a line would


class ChunkWriter:
    """Assembles and writes whole chunks of one store, inline (``depth`` 0) or on a thread."""

    def __init__(self, store: FeatureStore, layers: list[str], dtype: str, encoder: str, ids: list[str],
                 stamps: np.ndarray | None, depth: int):
        self.store, self.layers, self.dtype, self.encoder = store, layers, dtype, encoder
        self.ids, self.stamps = ids, stamps
        self._failure: BaseException | None = None  # stays set: the writer writes nothing after it
        self._raised = False  # the failure was handed to the forward thread once
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._drain, name="featcache-chunk-writer", daemon=True)
            self._thread.start()

    # -- the forward thread's side ---------------------------------------------------------
    def put(self, chunk: int, batches: list[ChunkBatch]) -> None:
        """Hand over a whole chunk; blocks while ``depth`` chunks wait. Raises the writer's error."""
        self._raise_failure()
        if self._queue is None:
            self._write(chunk, batches)
        else:
            self._queue.put((chunk, batches))

    def close(self) -> None:
        """Write what is queued and stop the thread; raises the writer's error, if any."""
        self._stop()
        self._raise_failure()

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()  # finished chunks are still written; the forward thread's error goes on

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise_failure(self) -> None:
        # Raised once, but never cleared: the writer thread reads ``_failure`` to skip every chunk
        # still queued, and clearing it here once let a chunk queued after the failure be written.
        if self._failure is not None and not self._raised:
            self._raised = True
            raise self._failure

    # -- the writer's side -----------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._failure is None:  # after a failure the queue is only emptied, so no put blocks
                try:
                    self._write(*item)
                except BaseException as err:  # noqa: BLE001 - handed to the forward thread, never lost
                    self._failure = err

    def _write(self, chunk: int, batches: list[ChunkBatch]) -> None:
        sl = self.store.chunk_slice(chunk)
        n = sl.stop - sl.start
        features = np.full((len(self.layers), n, self.store.width), np.nan, dtype=self.dtype)
        missing = np.zeros(n, dtype=bool)
        sha256 = np.zeros((n, 32), dtype=np.uint8)
        for batch in batches:
            if batch.hashes is not None:
                sha256[np.asarray(batch.rows) - sl.start] = batch.hashes
            for row in batch.errors:
                missing[row - sl.start] = True
            if batch.out is not None:
                values, checks = batch.out.numpy()
                self._check(checks, batch.good)
                features[:, np.asarray(batch.good) - sl.start] = values
        sources = (self.stamps[sl], sha256) if self.stamps is not None else None
        try:
            todo = [i for i, name in enumerate(self.layers) if not self.store.chunk_done(name, chunk)]
            self.store.write_chunk(chunk, {self.layers[i]: features[i] for i in todo}, missing, sources)
        except Exception as err:  # noqa: BLE001 - named in one line by write_failure
            failure = write_failure(self.store.path, chunk, err)
            if failure is err:
                raise
            raise failure from None

    def _check(self, checks: np.ndarray, good: list[int]) -> None:
        problem = first_problem(checks, self.dtype)
        if problem is None:
            return
        layer, row = problem
        name = self.layers[layer]
        if row is not None:  # NaN would pass the range check, and be stored
            raise FeatcacheError(f"layer {name} of {self.encoder} is not finite (NaN or inf) for row "
                                 f"{self.ids[good[row]]!r}",
                                 "check the model's weights and preprocessing; finished chunks are kept")
        raise FeatcacheError(f"layer {name} of {self.encoder} exceeds the float16 range", "extract with --dtype float32")
