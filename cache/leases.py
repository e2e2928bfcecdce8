"""Leases: the object-store stand-in for a writer's file lock (docs/scale.md).

Object stores (``s3://``) have no flock. A writer there holds a small lease object beside the
store instead, ``.<store>.<role>.lease``, named like the local lock files. It records the
holder's host and pid, and the holder renews it (a heartbeat) every quarter of its time to live
(``FEATCACHE_LEASE_TTL_S``, default 60 s). A lease is **fresh** while its last renewal is younger
than that time to live, and its holder is not a dead process on this very host.

On S3 every change of a lease is a conditional put, so two processes can never both believe
they hold one:

- taking a free lease is ``PutObject`` with ``If-None-Match: *`` (only one creator wins);
- renewing it, or taking over a stale one, is ``PutObject`` with ``If-Match: <ETag>`` of the
  version read (only one of several racing writers wins; a holder whose lease was taken over
  learns it at its next renewal).

A writer checks, before each chunk it writes, that its lease was renewed less than half the time
to live ago and has not been taken over (:meth:`Lease.check`); otherwise it stops, so a writer
that stalled (a network partition, a suspended job) does not go on writing into a store that an
``--overwrite`` has since rebuilt. Other fsspec stores without conditional puts (``memory://``,
say) get the same objects with a check-then-put, which is not atomic: see docs/scale.md.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import featcache.cache.location as loc
from featcache.cache.errors import FeatcacheError

TTL_ENV = "FEATCACHE_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0


def lease_ttl() -> float:
    value = os.environ.get(TTL_ENV, "")
    try:
        ttl = float(value) if value else DEFAULT_TTL_S
    except ValueError:
        ttl = -1.0
    if not ttl > 0:
        raise FeatcacheError(f"bad {TTL_ENV}={value!r}", "give the lease time to live in seconds, e.g. 60")
    return ttl


def lease_url(store: str, role: str) -> str:
    parent, _, name = str(store).rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{role}.lease"


def shard_lease_urls(store: str) -> list[str]:
    """Every shard lease beside ``store`` (what ``--overwrite`` must find fresh or stale)."""
    fs, path = loc.filesystem(lease_url(store, "shard-*"))
    return [fs.unstrip_protocol(p) for p in sorted(fs.glob(path))]


class _LostRace(Exception):
    """A conditional put failed: another process changed the lease first."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as read back from the store."""

    host: str
    pid: int
    age_s: float  # since the last renewal
    ttl_s: float
    tag: str  # the version read: what a takeover's conditional put must match

    @property
    def fresh(self) -> bool:
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return False  # its writer was killed on this machine: no need to wait out the lease
        return self.age_s < self.ttl_s

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (heartbeat {self.age_s:.0f} s ago)"


class _S3:
    """Conditional puts through s3fs: atomic on AWS S3, MinIO and moto."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def put(self, body: bytes, match: str | None) -> str:
        cond = {"IfMatch": match} if match else {"IfNoneMatch": "*"}
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **cond)["ETag"]
        except FileExistsError:
            raise _LostRace() from None
        except FileNotFoundError:
            if match:  # the lease vanished since it was read (released, or removed by --overwrite)
                raise _LostRace() from None
            raise FeatcacheError(f"cannot write to s3://{self.bucket}: the bucket does not exist",
                                 "create it, or check --cache-dir and the endpoint (AWS_ENDPOINT_URL or "
                                 "--storage-option endpoint_url=...)") from None
        except OSError as err:  # 412 PreconditionFailed, 409 ConditionalRequestConflict
            code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                raise _LostRace() from None
            raise

    def read(self) -> tuple[bytes, str, float] | None:
        """The body, version tag and server-side modification time; None when absent."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
            body = self.fs.cat_file(f"{self.bucket}/{self.key}")
        except FileNotFoundError:
            return None
        modified = head["LastModified"]
        return body, head["ETag"], modified.timestamp() if isinstance(modified, datetime) else time.time()

    def delete(self, tag: str) -> None:
        current = self.read()
        if current is not None and current[1] == tag:
            self.fs.rm_file(f"{self.bucket}/{self.key}")


class _CheckThenPut:
    """Any other fsspec store: the same objects, compared by content. Not atomic."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def put(self, body: bytes, match: str | None) -> str:
        current = self.read()
        if (current is None) != (match is None) or (current is not None and current[1] != match):
            raise _LostRace()
        self.fs.pipe_file(self.path, body)
        return json.loads(body)["nonce"]

    def read(self) -> tuple[bytes, str, float] | None:
        try:
            body = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        record = json.loads(body)
        return body, record.get("nonce", ""), float(record.get("written", 0))

    def delete(self, tag: str) -> None:
        current = self.read()
        if current is not None and current[1] == tag:
            self.fs.rm_file(self.path)


def _backend(url: str):
    fs, path = loc.filesystem(url)
    return _S3(fs, path) if hasattr(fs, "call_s3") else _CheckThenPut(fs, path)


def read_holder(url: str) -> Holder | None:
    """The holder of the lease at ``url``, or None if there is no lease there."""
    current = _backend(url).read()
    if current is None:
        return None
    body, tag, modified = current
    try:
        record = json.loads(body)
        return Holder(str(record["host"]), int(record["pid"]), time.time() - modified, float(record["ttl_s"]), tag)
    except (ValueError, KeyError, TypeError):  # unreadable: treat as a stale lease of nobody
        return Holder("?", -1, float("inf"), 0.0, tag)


class Lease:
    """One held lease with its heartbeat thread. Take it with :func:`held_lease`."""

    def __init__(self, url: str, what: str):
        self.url, self.what = url, what
        self.ttl = lease_ttl()
        self.backend = _backend(url)
        self.tag: str | None = None
        self.renewed = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                           "ttl_s": self.ttl, "written": time.time(), "nonce": uuid.uuid4().hex}).encode()

    def acquire(self, blocking: bool, hint: str) -> None:
        while True:
            try:
                self.tag = self.backend.put(self._body(), None)
                break
            except _LostRace:
                pass
            holder = read_holder(self.url)
            if holder is not None and not holder.fresh:
                try:  # take over a dead writer's lease; of several takers exactly one wins
                    self.tag = self.backend.put(self._body(), holder.tag)
                    break
                except _LostRace:
                    continue
            if holder is not None and not blocking:
                raise FeatcacheError(f"{self.what} is already being written by {holder.describe()}", hint)
            time.sleep(min(1.0, self.ttl / 20))
        self.renewed = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.url}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.tag = self.backend.put(self._body(), self.tag)
                self.renewed = time.monotonic()
            except _LostRace:
                self.lost = "another process took it over"
                return
            except Exception:  # a network error: retry at the next beat; check() stops the writer meanwhile
                continue

    def check(self) -> None:
        """Raise unless this lease is surely still ours: called before every chunk write."""
        since = time.monotonic() - self.renewed
        problem = self.lost or (f"its heartbeat has not been renewed for {since:.0f} s"
                                if since > self.ttl / 2 else None)
        if problem:
            raise FeatcacheError(f"{self.what}: this writer lost its lease ({problem}) and stopped before "
                                 "writing another chunk", "finished chunks are kept; check the connection to the "
                                 "store and run the same command again")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.tag is not None and self.lost is None:
            try:
                self.backend.delete(self.tag)
            except OSError:  # left behind: it goes stale after its time to live
                pass


@contextmanager
def held_lease(url: str, blocking: bool, what: str, hint: str):
    lease = Lease(url, what)
    lease.acquire(blocking, hint)
    try:
        yield lease
    finally:
        lease.release()


def remove_stale(url: str) -> None:
    holder = read_holder(url)
    if holder is not None and not holder.fresh:
        _backend(url).delete(holder.tag)
