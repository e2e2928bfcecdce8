"""Stage one: run a frozen encoder once over a data set and store every layer's pooled features."""

from __future__ import annotations

import errno
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import featcache.cache.location as loc
from featcache.cache.commands import extract_command
from featcache.cache.errors import FeatcacheError
from featcache.cache.locks import all_writers_locked, store_lock
from featcache.cache.naming import StoreSpec, split_label, store_path
from featcache.cache.paths import default_cache_dir
from featcache.cache.store import FeatureStore
from featcache.pipeline.common.device import usable_cores
from featcache.pipeline.common.layerspec import resolve_layers
from featcache.pipeline.common.names import combined_parts, is_combined
from featcache.pipeline.common.workers import Worker, barrier, from_environment, init_distributed, parse_shard
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.data.decode import jpeg_draft
from featcache.pipeline.data.rows import BadImage, ImageSide, Split
from featcache.pipeline.extract import decoding, gpu_decode, provenance
from featcache.pipeline.extract.encoders import Encoder
from featcache.pipeline.extract.loading import load_encoder
from featcache.pipeline.extract.registry import ALIASES
from featcache.pipeline.extract.transfer import to_host
from featcache.pipeline.extract.writer import ChunkBatch, ChunkWriter


def _batch_delay_s() -> float:
    """Test aid: seconds to sleep per batch, so kill tests can land mid-run on a fast tiny model."""
    return float(os.environ.get("FEATCACHE_SLOW_BATCH_S", "0") or 0)


@dataclass
class ExtractConfig:
    model: str = "dinov2"
    layers: str = "all"
    dataset: str = "tuxpaint"
    splits: list[str] | None = None  # None: every split of the data set
    cache_dir: Path = field(default_factory=default_cache_dir)
    batch_size: int | None = None  # None: 32 on CPU; on CUDA sized to the model, a divisor of the chunk rows
    device: str = "auto"
    limit: int | None = None  # a fixed hash-chosen subset of N images per split (and their captions)
    pooling: str | None = None  # None: the encoder's default
    image_size: int | None = None  # None: the registry default (224 for DINOv2); -1: pretrained
    dtype: str = "float16"
    skip_bad: bool = False
    overwrite: bool = False
    num_workers: int | None = None  # None: 0 on CPU; on CUDA the usable cores less 2, at most 14
    chunk_rows: int | None = None  # None: chunks of at least 1 MiB
    shard: str | None = None  # "I/N": this process does chunks b with b mod N == I (then steals)
    steal: bool = True  # after its own chunks, take unfinished chunks of other shards/ranks
    write_queue: int = 2  # whole chunks queued for the writer thread; 0: write inline (the serial path)
    decode: str = "cpu"  # "gpu" (nvJPEG) or "draft" (JPEGs at reduced scale): a new preprocessing identity (decoding)


@dataclass
class ExtractResult:
    path: str
    split: str
    rows: int
    layers: list[str]
    bytes: int
    seconds: float
    computed_rows: int
    missing_rows: int
    notes: list[str] = field(default_factory=list)  # one-line notices for the user (e.g. a partial checkpoint)

    @property
    def rows_per_s(self) -> float:
        return self.computed_rows / self.seconds if self.seconds > 0 else float("nan")


def library_versions() -> dict:
    import timm
    import transformers
    import zarr

    return {
        "featcache": _featcache_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _featcache_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("featcache")
    except PackageNotFoundError:
        return "unknown"


def store_spec(cfg: ExtractConfig, encoder: Encoder, split: Split, pooling: str) -> StoreSpec:
    return StoreSpec(split.dataset, split_label(split.name, cfg.limit), encoder.name, pooling,
                     encoder.preprocessing.get("image_size"))


def command_for(cfg: ExtractConfig, split: Split, decode: str | None = None) -> str:
    """The extract command that (re)builds one split's store: recorded for error hints; ``decode``
    is the image encoder's (a text store is not decoded, whatever --decode said)."""
    return extract_command(cfg.model, cfg.dataset, split.name, layers=cfg.layers, limit=cfg.limit, pooling=cfg.pooling,
                           image_size=cfg.image_size, cache_dir=cfg.cache_dir, dtype=cfg.dtype,
                           decode=decode)


def store_attrs(cfg: ExtractConfig, encoder: Encoder, split: Split, split_names: list[str]) -> dict:
    """What readers need besides the identity: the names the encoder answers to, its defaults,
    the data set as the user wrote it and its splits (a missing val split is carved, not asked for)."""
    aliases = [a for a, name in ALIASES.items() if name == encoder.name]
    return {"names": [encoder.name, *aliases],
            "defaults": {"pooling": encoder.entry.default_pooling,
                         "image_size": encoder.default_image_size if encoder.modality == "image" else None,
                         "pretrained_image_size": encoder.native_image_size},
            "command": command_for(cfg, split, cfg.decode if encoder.modality == "image" else None),
            "dataset_label": cfg.dataset, "dataset_splits": split_names}


def _existing(path) -> FeatureStore | None:
    """The store already at ``path``, read once for the identity checks below; None when there is
    none readable (absent, half created, another format: create_or_open decides)."""
    try:
        return FeatureStore.open(path)
    except FeatcacheError:
        return None


def _predating_files_digest(store: FeatureStore | None, identity: dict) -> dict:
    """A store written before the identity held ``files_sha256`` (the model config and tokenizer
    digest) is still this encoder's when everything it did record matches: it is checked on what
    it recorded, not refused for what it could not."""
    if store is None:
        return identity
    stored = store.identity.get("encoder", {})
    if "files_sha256" in stored or "files_sha256" not in identity["encoder"]:
        return identity
    return {**identity, "encoder": {k: v for k, v in identity["encoder"].items() if k != "files_sha256"}}


def open_store_for(cfg: ExtractConfig, encoder: Encoder, split: Split, pooling: str,
                   split_names: list[str], stamps=None) -> FeatureStore:
    """The split's store, created or checked: its identity, and for image files that every
    finished row's input is unchanged (``stamps``: the side's listing, read once by the caller)."""
    side = split.side(encoder.modality)
    spec = store_spec(cfg, encoder, split, pooling)
    identity = {
        "encoder": encoder.identity(pooling),
        "dataset": provenance.dataset_identity(split, encoder.modality, cfg.limit),
        "dtype": cfg.dtype,
    }
    path = store_path(cfg.cache_dir, spec)
    existing = _existing(path)
    identity = provenance.adopt_legacy(existing, _predating_files_digest(existing, identity), side)
    extra = {"classnames": split.classnames, "templates": split.templates} if split.classnames else {}
    store = FeatureStore.create_or_open(
        path, identity=identity, versions=library_versions(),
        ids=side.ids, groups=side.groups, texts=getattr(side, "texts", None),
        width=encoder.pooled_width(pooling), dtype=cfg.dtype, chunk_rows=cfg.chunk_rows,
        extra_attrs=store_attrs(cfg, encoder, split, split_names),
    )
    if extra and "classes" not in store.attrs:
        store.group.attrs["classes"] = extra
    if provenance.tracked(side):
        store.ensure_sources()
        provenance.check_rows(store, side, stamps)
    return store


class _ImageRows(torch.utils.data.Dataset):
    """Decodes and preprocesses rows, in DataLoader workers on a GPU machine. It holds only the
    preprocessing (``pixels``, a picklable function), never the encoder and its weights."""

    def __init__(self, side: ImageSide, pixels, draft: int | None = None):
        self.side, self.pixels, self.draft = side, pixels, draft  # draft: --decode draft's JPEG size

    def __len__(self) -> int:
        return len(self.side)

    def __getitem__(self, row: int):
        """(row, pixels, error, sha256 of the bytes decoded): hashed here, on the one read."""
        try:
            with jpeg_draft(self.draft):
                image, digest = self.side.load_hashed(row)
            return row, self.pixels([image])[0], None, digest
        except BadImage as err:
            return row, None, err.message, bytes(32)


def _collate(items):
    rows = [r for r, _, _, _ in items]
    good = [x for _, x, _, _ in items if x is not None]
    errors = {r: e for r, _, e, _ in items if e is not None}
    hashes = np.frombuffer(b"".join(h for _, _, _, h in items), dtype=np.uint8).reshape(len(items), 32)
    return rows, (torch.stack(good) if good else None), errors, hashes


def _text_batch(encoder: Encoder, side, rows: list[int]):
    """Like an image batch: rows, the encodable inputs, and an error for each flagged row."""
    errors = {r: side.problems[r] for r in rows if r in side.problems}
    good = [side.texts[r] for r in rows if r not in errors]
    return rows, (encoder.prepare_texts(good) if good else None), errors


def chunk_batches(store: FeatureStore, chunks: list[int], batch_size: int) -> list[list[int]]:
    """Batches never straddle a chunk, so a resumed chunk sees exactly the same batches."""
    out = []
    for b in chunks:
        sl = store.chunk_slice(b)
        out += [list(range(s, min(sl.stop, s + batch_size))) for s in range(sl.start, sl.stop, batch_size)]
    return out


class _Batches:
    """A split's batches for one loader: its own chunks', then those of each chunk it may steal
    that is still unfinished when the loader reaches it (another worker may have done it since)."""

    def __init__(self, store: FeatureStore, layers: list[str], own: list[int], steal: list[int], batch_size: int):
        self.store, self.layers, self.own, self.steal, self.batch_size = store, layers, own, steal, batch_size

    def __iter__(self):
        yield from chunk_batches(self.store, self.own, self.batch_size)
        for chunk in self.steal:
            if any(not self.store.chunk_done(n, chunk) for n in self.layers):
                yield from chunk_batches(self.store, [chunk], self.batch_size)


def default_workers(device: torch.device) -> int:
    """Decoding workers: none on a CPU (its cores are better spent on the model); on CUDA the
    cores this process may use, less two for the forward and writer threads, at most 14."""
    if device.type != "cuda":
        return 0
    return max(1, min(usable_cores() - 2, 14))


def default_batch_size(encoder: Encoder, chunk_rows: int) -> int:
    """32 on a CPU. On CUDA a batch that keeps the device busy (256 for ViT-L/g widths, 512 for
    ViT-B, 1,024 below), lowered to a divisor of ``chunk_rows`` so every batch of a full chunk
    has one shape (ViT-S chunks are 1,408 = 11 x 128 rows: 704)."""
    if encoder.device.type != "cuda":
        return 32
    target = 256 if encoder.width >= 1024 else 512 if encoder.width >= 768 else 1024
    return max(d for d in range(1, min(target, chunk_rows) + 1) if chunk_rows % d == 0)


def _compute_chunks(cfg: ExtractConfig, encoder: Encoder, side, store: FeatureStore, layers: list[str],
                    pooling: str, own: list[int], steal: list[int], progress, task, stamps=None) -> int:
    """Compute and write whole chunks (own, then stolen); returns the number of rows computed."""
    batch_size = cfg.batch_size or default_batch_size(encoder, store.chunk_rows)
    batches = _Batches(store, layers, own, steal, batch_size)
    if encoder.modality == "image":
        workers = cfg.num_workers if cfg.num_workers is not None else default_workers(encoder.device)
        size = encoder.preprocessing.get("image_size")
        on_device = cfg.decode == "gpu"
        dataset = (gpu_decode.JpegRows(side, encoder.pixels, size) if on_device
                   else _ImageRows(side, encoder.pixels, decoding.draft_size(encoder)))
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, collate_fn=gpu_decode.collate if on_device else _collate,
            num_workers=workers, pin_memory=encoder.device.type == "cuda", prefetch_factor=4 if workers else None,
        )
        if on_device:
            loader = gpu_decode.decoded(loader, side, encoder.pixels, size, encoder.device)
    else:
        loader = (_text_batch(encoder, side, rows) + (None,) for rows in batches)

    filling: dict[int, list[ChunkBatch]] = {}
    filled: dict[int, int] = {}
    own_chunks = set(own)
    computed, delay = 0, _batch_delay_s()
    with ChunkWriter(store, layers, cfg.dtype, encoder.name, side.ids, stamps, cfg.write_queue) as writer:
        for rows, inputs, errors, hashes in loader:
            if errors and not cfg.skip_bad:
                raise FeatcacheError(next(iter(errors.values())),
                                     "fix the input, or pass --skip-bad to record it as a missing row; "
                                     "finished chunks are kept")
            chunk = rows[0] // store.chunk_rows
            good = [r for r in rows if r not in errors]
            out = to_host(encoder.forward_stacked(inputs, layers, pooling), cfg.dtype) if inputs is not None else None
            filling.setdefault(chunk, []).append(ChunkBatch(rows, good, errors, hashes, out))
            filled[chunk] = filled.get(chunk, 0) + len(rows)
            sl = store.chunk_slice(chunk)
            if filled[chunk] == sl.stop - sl.start:
                writer.put(chunk, filling.pop(chunk))
                del filled[chunk]
            computed += len(rows)
            if task is not None and chunk in own_chunks:
                progress.update(task, advance=len(rows))
            if delay:
                time.sleep(delay)
    return computed


def clear_store(path) -> None:
    """``--overwrite``: remove a store, but only while no writer of any shard holds it."""
    with all_writers_locked(path, str(path)):
        loc.remove(path)


def extract_split(cfg: ExtractConfig, encoder: Encoder, split: Split, layers: list[str], pooling: str,
                  progress=None, worker: Worker | None = None, split_names: list[str] | None = None) -> ExtractResult:
    worker = worker or Worker()
    start = time.perf_counter()
    path = store_path(cfg.cache_dir, store_spec(cfg, encoder, split, pooling))
    side = split.side(encoder.modality)
    with store_lock(path, f"shard-{worker.label}", blocking=False,
                    what=f"{path} (shard {worker.index}/{worker.count})") as held:
        # Creating the skeleton and adding layer arrays is metadata: one process at a time.
        stamps = side.stamps() if provenance.tracked(side) else None  # one stat per file, no image opened
        with store_lock(path, "meta", blocking=True, what=str(path)):
            store = open_store_for(cfg, encoder, split, pooling, split_names or [split.name], stamps)
            store.ensure_layers(layers)
        store.fence = held.check
        pending = store.pending_chunks(layers)
        own = worker.own(pending)
        steal = worker.steal_order(pending) if worker.count > 1 and cfg.steal else []
        task = progress.add_task(f"{split.dataset}/{split.name} {encoder.name}",
                                 total=sum(store.chunk_slice(b).stop - store.chunk_slice(b).start for b in own)) \
            if progress is not None else None
        try:
            computed = _compute_chunks(cfg, encoder, side, store, layers, pooling, own, steal, progress, task,
                                       stamps)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FeatcacheError(f"no space left on the device of {path} ({err.strerror})",
                                     "free some space and run the same command again; finished chunks are kept "
                                     "and the run resumes where it stopped") from None
            raise
    return ExtractResult(str(store.path), split.name, store.rows, layers, store.nbytes_on_disk(),
                         time.perf_counter() - start, computed, int(store.missing.sum()))


def extract(cfg: ExtractConfig, progress=None) -> list[ExtractResult]:
    """Extract every requested split; finished chunks of earlier runs are kept, not recomputed."""
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise FeatcacheError(f"batch size must be positive, got {cfg.batch_size}")
    if cfg.write_queue < 0:
        raise FeatcacheError(f"--write-queue must be 0 (write inline) or a number of chunks, got {cfg.write_queue}")
    if cfg.image_size is not None and cfg.image_size != -1 and cfg.image_size < 1:
        raise FeatcacheError(f"--image-size must be a positive number of pixels or -1, got {cfg.image_size}",
                             "e.g. 224, or -1 for the model's pretrained size")
    if cfg.dtype not in ("float16", "float32"):
        raise FeatcacheError(f"unsupported dtype {cfg.dtype!r}", "use float16 or float32")
    decoding.check_config(cfg.decode, cfg.device)
    if is_combined(cfg.dataset):
        # a+b is read as the union of a's and b's stores: each part is cached once, on its own
        return [r for part in combined_parts(cfg.dataset) for r in extract(replace(cfg, dataset=part), progress)]
    splits = load_dataset(cfg.dataset)
    names = cfg.splits or list(splits)
    unknown = [s for s in names if s not in splits]
    if unknown:
        raise FeatcacheError(f"data set {cfg.dataset!r} has no split {unknown[0]!r}",
                             f"splits: {', '.join(splits)}")
    worker = parse_shard(cfg.shard) or from_environment()
    device = cfg.device
    if worker.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{worker.local_rank}"
    encoder = load_encoder(cfg.model, device, cfg.image_size)
    decoding.apply(encoder, cfg.decode)  # gpu, draft: a new preprocessing identity; the CPU path's stays as it was
    pooling = cfg.pooling or encoder.entry.default_pooling
    encoder.check_pooling(pooling)
    layers = resolve_layers(cfg.layers, encoder.n_blocks, encoder.has_final)
    note = encoder.check_initialised(layers)
    init_distributed(worker, encoder.device.type)
    chosen = [splits[s].limited(cfg.limit) for s in names]
    if cfg.overwrite:
        if not worker.distributed or worker.index == 0:  # one rank clears, then all fill
            for split in chosen:
                clear_store(store_path(cfg.cache_dir, store_spec(cfg, encoder, split, pooling)))
        barrier(worker)
        cfg = replace(cfg, overwrite=False)
    results = [extract_split(cfg, encoder, split, layers, pooling, progress if worker.index == 0 else None,
                             worker, list(splits)) for split in chosen]
    barrier(worker)  # every rank's chunks are written before anyone reports the store complete
    if worker.count > 1:  # other workers flagged missing rows in their chunks too: count them from the store
        results = [replace(r, missing_rows=int(FeatureStore.open(r.path).missing.sum())) for r in results]
    if note:
        results = [replace(r, notes=[*r.notes, note]) for r in results]
    for r in results:
        if r.rows and r.missing_rows == r.rows:
            raise FeatcacheError(f"no row of {cfg.dataset}/{r.split} could be read: all {r.rows} were recorded as "
                                 "missing, so nothing usable was stored", "fix the inputs (see the errors without "
                                 "--skip-bad) and run the same command again")
    return results
