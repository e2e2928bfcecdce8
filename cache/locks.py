"""Writer locks beside a store: one per shard, one for metadata.

``.<store>.shard-<I>-of-<N>.lock`` is held by the process filling that shard for its whole
run; ``.<store>.meta.lock`` is held while the store's skeleton or layer arrays change. A lock
file records its holder's pid, so a refusal can name it. Object stores (fsspec URLs) have no
file locks: there the same roles are lease objects with a heartbeat (``featcache.cache.leases``,
docs/scale.md), behind the same two functions, so callers never ask which kind they hold.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import ExitStack, contextmanager
from pathlib import Path

from featcache.cache import leases
from featcache.cache.errors import FeatcacheError
from featcache.cache.location import Location, is_url

WRITER_HINT = "wait for it to finish, or split the work with --shard I/N or torchrun"
OVERWRITE_HINT = "nothing was removed; wait for that writer to finish or stop it, then run --overwrite again"


class FileHeld:
    """A held flock: it cannot be lost while the process lives, so there is nothing to check."""

    def check(self) -> None:
        pass


def lock_path(store: Path, role: str) -> Path:
    return store.parent / f".{store.name}.{role}.lock"


def store_lock(store: Location, role: str, blocking: bool, what: str):
    """Hold ``role`` of ``store``; the context yields something whose ``check()`` a writer calls
    before each chunk (a no-op for a file lock, a lease check on an object store)."""
    if is_url(store):
        return leases.held_lease(leases.lease_url(str(store), role), blocking, what, WRITER_HINT)
    return file_lock(lock_path(Path(store), role), blocking, what)


@contextmanager
def file_lock(path: Path, blocking: bool, what: str, hint: str = WRITER_HINT):
    """An exclusive flock on ``path``; a non-blocking lock that is taken raises a clear error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a lock file replaced by a link must never carry our pid to the link's target
        # (a write outside the cache); O_NONBLOCK: a FIFO planted there must not hang the open.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FeatcacheError(f"the lock file {path} is a symbolic link; featcache writes no lock through a link",
                                 "remove the link (nothing else is changed), then run the command again") from None
        raise FeatcacheError(f"cannot create the lock file {path} ({err.strerror})",
                             "check that the cache directory is a writable folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FeatcacheError(f"the lock file {path} is not a regular file", "remove it, then run the command again")
    os.set_blocking(fd, True)
    f = os.fdopen(fd, "r+")
    with f:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(f, flags)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FeatcacheError(f"{what} is already being written by {holder}", hint) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield FileHeld()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def all_writers_locked(store: Location, what: str):
    """Hold the metadata lock and every shard lock of ``store``: no writer of any shard is alive.

    Used by ``--overwrite``, which must never rebuild a store another process is still filling.
    Raises, naming the holder, if any lock is taken. On an object store: the metadata lease, and
    no shard lease fresh (stale ones, of killed writers, are removed).
    """
    if is_url(store):
        with leases.held_lease(leases.lease_url(str(store), "meta"), True, what, OVERWRITE_HINT):
            for url in leases.shard_lease_urls(str(store)):
                holder = leases.read_holder(url)
                if holder is not None and holder.fresh:
                    shard = url.rsplit(".shard-", 1)[-1].removesuffix(".lease").replace("-of-", "/")
                    raise FeatcacheError(f"{what} (shard {shard}) is already being written by {holder.describe()}",
                                         OVERWRITE_HINT)
                leases.remove_stale(url)
            yield
        return
    store = Path(store)
    with ExitStack() as stack:
        hint = OVERWRITE_HINT
        stack.enter_context(file_lock(lock_path(store, "meta"), True, what, hint))
        for path in sorted(store.parent.glob(f".{store.name}.shard-*.lock")):
            shard = path.name[len(f".{store.name}.shard-"):-len(".lock")]
            stack.enter_context(file_lock(path, False, f"{what} (shard {shard.replace('-of-', '/')})", hint))
        yield
