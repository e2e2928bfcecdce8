"""A feature store: one zarr group per (dataset, split, encoder, pooling, resolution).

Layout of a store (see docs/design.md)::

    zarr.json            attrs: format, identity, names, defaults, versions, rows, width, chunk_rows, layers
    ids      (rows,)     stable row ids of the data set split
    groups   (rows,)     what a row belongs to: its image for a caption, its class for an image
    texts    (rows,)     the strings encoded (text stores only)
    missing  (rows,)     rows whose input could not be decoded (--skip-bad); never zero-filled
    sources/stamp  (rows, 2)   image stores: size and mtime_ns of the file or shard each row was
    sources/sha256 (rows, 32)  read from, and the sha256 of its bytes; 0 until its chunk is written
    layers/<name>        (rows, width) float16, one zarr chunk per row chunk
    done/<name>          (n_chunks,) uint64, one zarr chunk per row chunk: 0 while the chunk of
                         <name> is unfinished, then its seal

A chunk is a range of ``chunk_rows`` rows: one zarr chunk of every layer array and of
``missing``, and one ``done`` flag per layer. ("Block" always means a transformer block.)
Writers fill whole chunks and flip ``done`` only after a chunk's data is written, so a killed
run leaves finished chunks intact and readers never see a half-written one. Chunks are
disjoint objects, so several processes can fill one store side by side.

Every zarr chunk ends in a crc32c checksum (zarr v3's ``crc32c`` codec after zstd). Reads of
a finished chunk check that its object exists and that its checksum holds; either failure is
a :class:`CorruptChunk` naming the store, layer and chunk, never a silent NaN or wrong value.

A checksum only says an object is intact, not that it belongs where it lies: a chunk moved to
another position, layer or store (a merge of two caches, a sync gone wrong) passes it. So a
finished chunk's done flag is its seal: a crc32c of the store's identity, the layer, the chunk
index, and the chunk's ``missing`` and feature bytes as stored. Every read recomputes it. The
shared row arrays (ids, groups, texts) have seals in the attributes (``row_seals``). The seal
maths live in ``featcache.cache.seals``.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

import featcache.cache.location as loc
from featcache.cache.commands import decode_of, stored_command
from featcache.cache.errors import FeatcacheError
from featcache.cache.location import Location
from featcache.cache.seals import chunk_seal, identity_key, rows_seal

FORMAT_VERSION = 3  # 2: crc32c on every chunk, chunks written even when empty; 3: done flags are seals
_FORMATS = {1: "without chunk checksums", 2: "without chunk seals"}
_MIN_CHUNK_BYTES = 1 << 20
# Every array: zstd, then a crc32c of the compressed bytes.
ARRAY_OPTIONS = {"compressors": [ZstdCodec(level=0), Crc32cCodec()]}
# Write every chunk, even one that equals the fill value (all-NaN rows, no missing rows), so
# "marked done but no object" always means a lost chunk. This is a runtime setting, not
# stored metadata, so every write goes through it.
WRITE_EVERY_CHUNK = {"array.write_empty_chunks": True}


def _decode_problem(err: ValueError) -> str:
    """What a ValueError from reading zarr chunks means: zarr's crc32c codec raises a plain one,
    and so does decoding an intact object of another dtype or shape (copied from another store)."""
    if "checksum" in str(err):
        return "fails its checksum"
    return "cannot be decoded as a chunk of this array (another dtype or shape: copied from another store?)"


class CorruptArray(FeatcacheError):
    """A whole array (or a selection of one) that cannot be read back."""

    def __init__(self, path, name: str, problem: str, hint: str):
        self.name, self.problem = name, problem
        super().__init__(f"{path}: the array {name!r} {problem}", hint)


class CorruptChunk(FeatcacheError):
    """A finished chunk whose object is missing, fails its checksum, or is not its own."""

    def __init__(self, path, layer: str, chunk: int, problem: str):
        self.path, self.layer, self.chunk, self.problem = path, layer, chunk, problem
        super().__init__(f"{path}: chunk {chunk} of {layer} {problem}",
                         f"run: featcache verify --repair {path}, then the same featcache extract command "
                         "to recompute the bad chunks")


def default_chunk_rows(width: int, itemsize: int = 2) -> int:
    """Rows per chunk so that each layer chunk holds at least 1 MiB, in multiples of 64."""
    rows = -(-_MIN_CHUNK_BYTES // (width * itemsize))
    return int(-(-rows // 64) * 64)


def _identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: stored {a!r}, requested {b!r}")
    return diffs


def extract_command(attrs: dict, layers: str | None = None, overwrite: bool = False, cache_dir=None) -> str:
    return stored_command(attrs, layers, overwrite, cache_dir)


def rebuild_command(attrs: dict, cache_dir=None) -> str:
    return stored_command(attrs, overwrite=True, cache_dir=cache_dir)


def cache_root(path) -> str:
    """The cache folder a store lies in: ``<cache>/<data set>/<split>/<encoder>/<variant>.zarr``."""
    return str(path).rstrip("/").rsplit("/", 4)[0]


def _open_group(path: Location) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode="r+", storage_options=loc.storage_options(path))
    except Exception as err:  # zarr raises JSON, value and key errors for damaged metadata
        raise FeatcacheError(f"the metadata of the store {path} cannot be read ({type(err).__name__})",
                             "remove the store, or rebuild it with the same featcache extract command "
                             "and --overwrite") from None


def row_positions(rows, n: int) -> np.ndarray:
    """``rows`` as int64 positions in ``[0, n)``: a negative or too large row is an IndexError
    (a row past the last chunk otherwise read as a chunk that 'does not match its seal'), and a
    boolean mask is refused (read as positions 0 and 1, it gave the wrong rows silently)."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        raise TypeError("read_rows takes row positions, not a boolean mask: pass np.flatnonzero(mask)")
    rows = rows.astype(np.int64, copy=False)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"row {rows[(rows < 0) | (rows >= n)].flat[0]} of {n}")
    return rows


class FeatureStore:
    """Read and write access to one store. Open with :meth:`open` or :meth:`create_or_open`."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path = loc.as_location(path)
        self.group = group
        self.attrs = dict(group.attrs)
        # Called before every chunk write: the writer's lock or lease check
        # (featcache.cache.locks.store_lock), so a writer that lost its lease writes nothing more.
        self.fence = lambda: None

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Location, formats: tuple[int, ...] = (FORMAT_VERSION,)) -> "FeatureStore":
        """``formats``: what may be opened; only ``verify --reseal`` opens format 2, to seal it."""
        path = loc.as_location(path)
        if not loc.has_group(path):
            raise FeatcacheError(f"no feature store at {path}")
        group = _open_group(path)
        attrs = dict(group.attrs)
        if not attrs.get("created"):
            raise FeatcacheError(
                f"feature store {path} was never fully created",
                "run the extract command again; it will rebuild it",
            )
        rows_unsealed = attrs.get("format") == FORMAT_VERSION and "row_seals" not in attrs  # a development build
        if attrs.get("format") not in formats or (rows_unsealed and 2 not in formats):
            written = "without seals of its row arrays" if rows_unsealed else _FORMATS.get(attrs.get("format"),
                                                                                           "by another featcache")
            reseal = (f"seal it in place (every chunk's checksum is checked first): featcache verify --reseal {path}; "
                      "or " if attrs.get("format") == 2 or rows_unsealed else "")
            raise FeatcacheError(
                f"the store {path} has format {attrs.get('format')!r}, written {written}; "
                f"this featcache reads format {FORMAT_VERSION} only",
                f"{reseal}rebuild it: {rebuild_command(attrs, cache_root(path))}",
            )
        return cls(path, group)

    @classmethod
    def create_or_open(
        cls,
        path: Location,
        *,
        identity: dict,
        versions: dict,
        ids: list[str],
        groups: list[str],
        texts: list[str] | None,
        width: int,
        dtype: str = "float16",
        chunk_rows: int | None = None,
        extra_attrs: dict | None = None,
    ) -> "FeatureStore":
        """Open the store at ``path`` if it has this identity; create it if absent.

        A store with another identity or an older format is never reused or mixed: it is an
        error (``--overwrite`` clears it first, see :func:`featcache.cache.locks.all_writers_locked`).
        """
        path = loc.as_location(path)
        chunk_rows = chunk_rows or default_chunk_rows(width, np.dtype(dtype).itemsize)
        if loc.has_group(path):
            group = _open_group(path)
            attrs = dict(group.attrs)
            if not attrs.get("created"):
                loc.remove(path)  # a creation that was killed holds no finished chunk
            else:
                store = cls.open(path)
                diffs = _identity_diff(attrs.get("identity", {}), identity)
                if attrs.get("chunk_rows") != chunk_rows:
                    diffs.append(f"chunk_rows: stored {attrs.get('chunk_rows')}, requested {chunk_rows}")
                if diffs:
                    hint = "pass --overwrite to rebuild it, or use another --cache-dir"
                    if all(d.startswith("encoder.preprocessing.decode:") for d in diffs):  # a resume without its --decode
                        stored = decode_of(attrs.get("identity", {}).get("encoder"))
                        hint = (f"pass --decode {stored} to go on with it as it was "
                                "extracted, --overwrite to rebuild it, or use another --cache-dir")
                    raise FeatcacheError(
                        f"the cache at {path} was built with a different identity "
                        f"({'; '.join(diffs[:3])}); it was left untouched", hint)
                return store
        loc.make_parent(path)
        group = zarr.open_group(str(path), mode="w", storage_options=loc.storage_options(path))
        n = len(ids)
        chunk = max(1, min(chunk_rows, n))
        row_seals = {}
        with zarr.config.set(WRITE_EVERY_CHUNK):  # every chunk exists from the start: absent means lost
            for name, values in (("ids", ids), ("groups", groups), ("texts", texts)):
                if values is not None:
                    row_seals[name] = rows_seal(identity, name, values)
                    group.create_array(name, shape=(n,), dtype=str, chunks=(max(n, 1),), **ARRAY_OPTIONS)[:] = (
                        np.asarray(values, dtype=str))
            group.create_array("missing", shape=(n,), dtype=bool, chunks=(chunk,), fill_value=False,
                               **ARRAY_OPTIONS)[:] = np.zeros(n, dtype=bool)
        group.create_group("layers")
        group.create_group("done")
        group.attrs.update(
            {
                "format": FORMAT_VERSION,
                "identity": identity,
                "versions": versions,
                "rows": n,
                "width": width,
                "dtype": dtype,
                "chunk_rows": chunk_rows,
                "row_seals": row_seals,
                "layers": [],
                **(extra_attrs or {}),
            }
        )
        group.attrs["created"] = True  # last: marks the skeleton as complete
        return cls(path, group)

    # -- shape -----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.attrs["rows"])

    @property
    def width(self) -> int:
        return int(self.attrs["width"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    @property
    def identity(self) -> dict:
        """A copy: the row seals are checked against the identity, so a caller that edited the
        store's own dict (``prep = store.identity[...]; prep.pop(...)``) would make every later
        read of ids or groups in this process fail as "written for another store"."""
        return copy.deepcopy(self.attrs["identity"])

    @property
    def encoder_identity(self) -> dict:
        """What makes two stores' features comparable: the encoder's weights, preprocessing, pooling."""
        return self.identity["encoder"]

    def seal_of(self, layer: str, chunk: int, missing: np.ndarray, data: np.ndarray) -> int:
        """The done flag of a finished chunk: binds its bytes to this store, layer and position."""
        if not hasattr(self, "_seal_key"):
            self._seal_key = identity_key(self.identity)
        return chunk_seal(self._seal_key, layer, chunk, self.chunk_rows, missing, data, self.attrs["dtype"])

    def chunk_slice(self, chunk: int) -> slice:
        start = chunk * self.chunk_rows
        return slice(start, min(self.rows, start + self.chunk_rows))

    @property
    def layers(self) -> list[str]:
        """Layers with an array in the store, in the order they were first requested."""
        return list(self.attrs.get("layers", []))

    def array(self, name: str) -> zarr.Array:
        """One array of the store; missing, damaged or changed array metadata is a clear error."""
        try:
            array = self.group[name]
        except Exception as err:  # KeyError for a removed array, JSON and value errors for a damaged one
            raise FeatcacheError(f"{self.path}: the array {name!r} is missing or its metadata is damaged "
                                 f"({type(err).__name__})", f"rebuild the store: {rebuild_command(self.attrs, cache_root(self.path))}") from None
        self._check_layout(name, array)
        return array

    def _check_layout(self, name: str, array: zarr.Array) -> None:
        """The metadata that says how to read an array's bytes must be what the store wrote: a
        seal ties a chunk's bytes to its place, not to a dtype or shape edited in its zarr.json
        (float16 bytes read as int16 pass every checksum, and are garbage)."""
        if self.attrs.get("format") != FORMAT_VERSION:
            return  # an older store is opened only to be resealed, which checks every chunk itself
        if self.attrs.get("dtype") != self.identity.get("dtype", self.attrs.get("dtype")) or \
                self.rows != self.identity.get("dataset", {}).get("rows", self.rows):
            raise CorruptArray(self.path, "attributes", "disagree with the store's sealed identity (dtype or rows "
                               "changed)", f"rebuild the store: {rebuild_command(self.attrs, cache_root(self.path))}")
        chunk = max(1, min(self.chunk_rows, self.rows))
        layouts = {"layers": ((self.rows, self.width), (chunk, self.width), self.attrs["dtype"]),
                   "done": ((max(self.n_chunks, 1),), (1,), "uint64"), "reseal": ((max(self.n_chunks, 1),), (1,), "uint64"),
                   "missing": ((self.rows,), (chunk,), "bool"), "sources/stamp": ((self.rows, 2), (chunk, 2), "int64"),
                   "sources/sha256": ((self.rows, 32), (chunk, 32), "uint8")}
        key = name if name in layouts else name.split("/")[0]
        if key in ("ids", "groups", "texts"):
            want = ((self.rows,), None, None)
        elif key in layouts:
            want = layouts[key]
        else:
            return
        codecs = [type(c).__name__ for c in getattr(array.metadata, "codecs", ())]
        if codecs[-2:] != ["ZstdCodec", "Crc32cCodec"]:  # without its crc32c no chunk of it is checked
            raise CorruptArray(self.path, name, f"has codecs {codecs} where the store wrote zstd then crc32c (its "
                               "zarr.json was changed)", f"rebuild the store: {rebuild_command(self.attrs, cache_root(self.path))}")
        have = (tuple(array.shape), tuple(array.chunks), str(array.dtype))
        for what, h, w in zip(("shape", "chunk shape", "dtype"), have, want):
            if w is not None and h != (w if what != "dtype" else str(np.dtype(w))):
                raise CorruptArray(self.path, name, f"has {what} {h} where the store wrote {w} (its zarr.json was "
                                   "changed)", f"rebuild the store: {rebuild_command(self.attrs, cache_root(self.path))}")

    def decoded(self, name: str, selection=slice(None)) -> np.ndarray:
        """An array read whose damage is a clear error (per-chunk errors are finer)."""
        array = self.array(name)
        try:
            return np.asarray(array[selection])
        except (ValueError, RuntimeError) as err:  # numcodecs' zstd raises RuntimeError on bad frames
            raise CorruptArray(self.path, name, _decode_problem(err),
                               f"run: featcache verify {self.path}; if the damage is outside the layer "
                               f"chunks, rebuild: {rebuild_command(self.attrs, cache_root(self.path))}") from None

    def whole(self, name: str) -> np.ndarray:
        """A shared array (ids, groups, texts, missing), every one of its chunks present.

        These are written in full when the store is created, so an absent chunk is a lost one:
        zarr would otherwise hand back its fill value ("" or False) without a word.
        """
        if self.rows:
            chunks = -(-self.rows // self.array(name).chunks[0])
            lost = sorted(set(range(chunks)) - self.stored_chunks(name))
            if lost:
                raise FeatcacheError(f"{self.path}: chunk {lost[0]} of the array {name!r} is missing",
                                     f"rebuild the store: {rebuild_command(self.attrs, cache_root(self.path))}")
        return self.decoded(name)

    def row_values(self, name: str) -> list[str]:
        """A shared row array (ids, groups, texts) as strings, checked against its seal."""
        values = [str(s) for s in self.whole(name)] if self.rows else []
        if rows_seal(self.identity, name, values) != self.attrs.get("row_seals", {}).get(name):
            raise CorruptArray(self.path, name, "does not match its seal: it was written for another store",
                               f"rebuild the store: {rebuild_command(self.attrs, cache_root(self.path))}")
        return values

    @property
    def ids(self) -> list[str]:
        return self.row_values("ids")

    @property
    def groups(self) -> list[str]:
        return self.row_values("groups")

    @property
    def texts_absent(self) -> bool:
        """An image store has no texts array (a text store whose array was lost is not this)."""
        side = self.identity.get("dataset", {}).get("side")
        return side == "image" if side else "texts" not in self.group

    @property
    def texts(self) -> list[str] | None:
        return None if self.texts_absent else self.row_values("texts")

    @property
    def missing(self) -> np.ndarray:
        return self.whole("missing").astype(bool)

    @property
    def split_names(self) -> list[str]:
        """The splits of the data set this store's split came from (its ``val``, if any, is known
        before that store is opened)."""
        return list(self.attrs.get("dataset_splits", []))

    @property
    def parts(self) -> list["FeatureStore"]:
        """The stores a reader of this one reads: itself. A combined ``a+b`` source
        (``pipeline.features.ConcatStore``) has several, so hints and dtypes ask every part."""
        return [self]

    # -- writing ---------------------------------------------------------------------------
    def ensure_layers(self, names: list[str]) -> None:
        """Create arrays for layers not yet in the store (one writer does this before work)."""
        chunk = max(1, min(self.chunk_rows, self.rows))
        new = [n for n in names if n not in self.layers]
        for name in new:
            self.group.create_array(f"layers/{name}", shape=(self.rows, self.width), dtype=self.attrs["dtype"],
                                    chunks=(chunk, self.width), fill_value=np.nan, overwrite=True, **ARRAY_OPTIONS)
            self._new_done(name)
        if new:
            self.group.attrs["layers"] = self.layers + new
            self.attrs = dict(self.group.attrs)

    def ensure_sources(self) -> None:
        """Create the per-row source arrays (image stores): where each row came from, written with
        its chunk, so a rerun can tell an unchanged input from the listing alone."""
        chunk = max(1, min(self.chunk_rows, self.rows))
        for name, width in (("stamp", 2), ("sha256", 32)):
            if f"sources/{name}" not in self.group:
                dtype = np.int64 if name == "stamp" else np.uint8
                self.group.create_array(f"sources/{name}", shape=(self.rows, width), dtype=dtype,
                                        chunks=(chunk, width), fill_value=0, **ARRAY_OPTIONS)

    @property
    def has_sources(self) -> bool:
        return "sources/sha256" in self.group

    def sources(self) -> tuple[np.ndarray, np.ndarray]:
        """(stamps, sha256) of every row: zeros where a row's chunk was never written."""
        return self.decoded("sources/stamp"), self.decoded("sources/sha256")

    def content_sha256(self) -> str | None:
        """One digest of every row's input bytes (None for stores without sources, or before
        every chunk is written): what a run records to say which images it was trained on."""
        if not self.has_sources:
            return None
        hashes = self.sources()[1]
        return hashlib.sha256(hashes.tobytes()).hexdigest() if hashes.any(axis=1).all() else None

    def write_sources(self, rows: slice | np.ndarray, stamps: np.ndarray, hashes: np.ndarray) -> None:
        with zarr.config.set(WRITE_EVERY_CHUNK):
            self.array("sources/stamp")[rows] = stamps
            self.array("sources/sha256")[rows] = hashes

    def seals(self, layer: str) -> np.ndarray:
        """Each chunk's done flag: 0 while unfinished, else its seal."""
        if layer not in self.layers:
            return np.zeros(self.n_chunks, dtype=np.uint64)
        return self.decoded(f"done/{layer}", slice(0, self.n_chunks)).astype(np.uint64)

    def done_chunks(self, layer: str) -> np.ndarray:
        return self.seals(layer) != 0

    def pending_chunks(self, layers: list[str]) -> list[int]:
        pending = np.zeros(self.n_chunks, dtype=bool)
        for layer in layers:
            pending |= ~self.done_chunks(layer)
        return [int(b) for b in np.flatnonzero(pending)]

    def write_chunk(
        self, chunk: int, features: dict[str, np.ndarray], missing: np.ndarray,
        sources: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Write one chunk's rows for the given layers, then mark them done.

        The data goes first and the done flags (seals) last, so a kill between the two only
        costs recomputing this chunk. ``sources``: the rows' (stamps, sha256), see
        :meth:`ensure_sources`; written with the data, so a finished chunk always has them.
        """
        sl = self.chunk_slice(chunk)
        self.fence()
        seals = {name: self.seal_of(name, chunk, missing, values) for name, values in features.items()}
        if sources is not None:
            self.write_sources(sl, *sources)
        with zarr.config.set(WRITE_EVERY_CHUNK):
            self.array("missing")[sl] = missing
            for name, values in features.items():
                self.array(f"layers/{name}")[sl] = values
            self.fence()  # the data may have taken long: still ours before anything is marked done
            for name, seal in seals.items():
                self.array(f"done/{name}")[chunk] = seal

    def _new_done(self, layer: str) -> zarr.Array:
        """A layer's done flags, all 0 (unfinished), replacing any there were."""
        return self.group.create_array(f"done/{layer}", shape=(max(self.n_chunks, 1),), dtype=np.uint64,
                                       chunks=(1,), fill_value=0, overwrite=True, **ARRAY_OPTIONS)

    def write_seals(self, layer: str, seals: np.ndarray) -> None:
        """Replace a layer's done flags with ``seals`` (0: unfinished); ``verify --reseal``."""
        with zarr.config.set(WRITE_EVERY_CHUNK):
            self._new_done(layer)[: self.n_chunks] = seals

    def chunk_done(self, layer: str, chunk: int) -> bool:
        return int(self.decoded(f"done/{layer}", chunk)) != 0

    def clear_done(self, layer: str, chunks: list[int]) -> None:
        """Mark chunks unfinished so the next extract recomputes them (``verify --repair``)."""
        with zarr.config.set(WRITE_EVERY_CHUNK):
            for chunk in chunks:
                self.array(f"done/{layer}")[chunk] = 0

    # -- checking --------------------------------------------------------------------------
    def stored_chunks(self, array: str) -> set[int]:
        """Row-chunk indices that have a chunk object of ``array`` (a layer or ``missing``)."""
        prefix = f"{array}/c/"

        async def keys():
            return [k async for k in self.group.store.list_prefix(prefix)]

        return {int(k[len(prefix):].split("/")[0]) for k in sync(keys())}

    def lost_chunks(self, layer: str, done: np.ndarray | None = None) -> list[int]:
        """Chunks of ``layer`` marked done whose chunk object is gone."""
        present = self.stored_chunks(f"layers/{layer}")
        done = self.done_chunks(layer) if done is None else done
        return [int(b) for b in np.flatnonzero(done) if b not in present]

    def raw_chunk(self, array: str, chunk: int) -> np.ndarray:
        """One chunk as stored, its crc32c checked."""
        try:
            return np.asarray(self.array(array)[self.chunk_slice(chunk)])
        except (ValueError, RuntimeError) as err:  # numcodecs' zstd raises RuntimeError on bad frames
            raise CorruptChunk(self.path, array.removeprefix("layers/"), chunk, _decode_problem(err)) from None

    def check_seal(self, layer: str, chunk: int, seal: int, missing: np.ndarray, data: np.ndarray) -> None:
        if seal and self.seal_of(layer, chunk, missing, data) != seal:
            raise CorruptChunk(self.path, layer, chunk, "does not match its seal: its bytes were written for "
                               "another position, layer or store (a chunk moved or copied in), or its "
                               "missing-row chunk was")

    def read_chunk(self, array: str, chunk: int, dtype=None) -> np.ndarray:
        """One chunk's rows of ``array``, checksummed and, for a finished layer chunk, checked
        against its seal; either failure is a :class:`CorruptChunk`."""
        data = self.raw_chunk(array, chunk)
        if array.startswith("layers/"):
            layer = array.removeprefix("layers/")
            self.check_seal(layer, chunk, int(self.decoded(f"done/{layer}", chunk)),
                             self.raw_chunk("missing", chunk), data)
        return np.asarray(data, dtype=dtype)

    def read_chunks(self, layer: str, chunks, dtype=None) -> Iterator[tuple[int, np.ndarray]]:
        """``(chunk, rows)`` for finished chunks of one layer, each checked as :meth:`read_chunk`
        checks it, with the seals and missing rows read once rather than per chunk (each zarr
        call costs about a millisecond)."""
        seals, missing = self.seals(layer), self.whole("missing")
        for chunk in map(int, chunks):
            data, sl = self.raw_chunk(f"layers/{layer}", chunk), self.chunk_slice(chunk)
            self.check_seal(layer, chunk, int(seals[chunk]), missing[sl], data)
            yield chunk, np.asarray(data, dtype=dtype)

    # -- reading ---------------------------------------------------------------------------
    def is_complete(self, layer: str | None = None) -> bool:
        layers = [layer] if layer else self.layers
        return bool(layers) and all(self.done_chunks(name).all() for name in layers)

    def read(self, layer: str, dtype=np.float32) -> np.ndarray:
        """All rows of one layer, every chunk present and checksummed; refuses unfinished chunks."""
        if layer not in self.layers:
            raise FeatcacheError(
                f"layer {layer!r} is not in the store {self.path}",
                f"stored layers: {', '.join(self.layers) or 'none'}",
            )
        seals = self.seals(layer)
        done = seals != 0
        if not done.all():
            raise FeatcacheError(
                f"layer {layer!r} of {self.path} is incomplete ({int(done.sum())}/{self.n_chunks} chunks)",
                "run the extract command again to finish it",
            )
        array = f"layers/{layer}"
        lost = self.lost_chunks(layer, done)
        if lost:
            raise CorruptChunk(self.path, layer, lost[0], "is marked done but its data is missing")
        try:
            data, missing = np.asarray(self.array(array)[:]), self.whole("missing")
        except (ValueError, RuntimeError):
            for chunk in range(self.n_chunks):  # find the bad chunk, to name it
                self.read_chunk(array, chunk)
            raise AssertionError("a full read failed to decode but no single chunk did") from None
        for chunk in range(self.n_chunks):
            sl = self.chunk_slice(chunk)
            self.check_seal(layer, chunk, int(seals[chunk]), missing[sl], data[sl])
        return np.asarray(data, dtype=dtype)

    def read_rows(self, layer: str, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """``read(layer)[rows]`` without the whole layer in memory: chunk by chunk, each chunk's
        checksum and seal checked as :meth:`read` checks them, keeping only the rows asked for.

        The layer table scores a few thousand rows of each of many layers; reading whole layers
        as float32 first would cost layers x rows x width x 4 bytes (61 GB for 25 layers of
        600k x 1,024). Peak memory here is the rows asked for plus one chunk. A layer that is
        incomplete or has lost chunks is read by :meth:`read` itself, so its errors stay the same.
        """
        rows = row_positions(rows, self.rows)
        if layer not in self.layers:
            return self.read(layer, dtype)[rows]
        done = self.done_chunks(layer)
        if not done.all() or self.lost_chunks(layer, done):
            return self.read(layer, dtype)[rows]  # raises the error naming what is wrong
        wanted, inverse = np.unique(rows, return_inverse=True)
        in_order = np.array_equal(wanted, rows)  # sorted and distinct: no reordering copy
        out = np.empty((len(wanted), self.width), dtype=dtype)
        chunk_of = wanted // self.chunk_rows
        for chunk, data in self.read_chunks(layer, np.unique(chunk_of)):
            sel = np.flatnonzero(chunk_of == chunk)
            out[sel] = data[wanted[sel] - self.chunk_slice(chunk).start]
        return out if in_order else out[inverse]

    def read_finished(self, layer: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Rows of finished chunks only, with their row indices; for readers racing a writer."""
        done = np.flatnonzero(self.done_chunks(layer))
        idx = np.concatenate([np.arange(self.chunk_slice(b).start, self.chunk_slice(b).stop) for b in done]
                             or [np.zeros(0, dtype=np.int64)])
        parts = [rows for _, rows in self.read_chunks(layer, done, dtype)]
        data = np.concatenate(parts) if parts else np.zeros((0, self.width), dtype=dtype)
        return idx, data

    def nbytes_on_disk(self) -> int:
        return loc.size(self.path)


def find_stores(cache_dir: Location) -> Iterator[Location]:
    return iter(loc.find_groups(loc.as_location(cache_dir)))
