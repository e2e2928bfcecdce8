"""What every command shares: the typer apps, consoles, common options and error handling."""

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

# rich_markup_mode=None: help texts say "[default: ...]" and "[env ...]" literally, not as markup.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Cache every layer of frozen encoders once; align and evaluate on the cache.")


@app.callback()
def _setup(ctx: typer.Context, storage_option: list[str] = typer.Option(
        [], "--storage-option", metavar="KEY=VALUE",
        help="An fsspec option for s3:// and other URL caches, e.g. endpoint_url=http://127.0.0.1:9000 "
             "(repeatable; given before the command).")) -> None:
    """Before any command (not at import): featcache draws its own progress and messages, and
    prints its warnings (a skipped broken run, say) as one line each."""
    import warnings

    from featcache.cache.location import parse_storage_options, set_storage_options

    try:
        set_storage_options(parse_storage_options(storage_option))
    except FeatcacheError as err:
        _error(f"{err.message} ({err.hint})")

    from featcache.pipeline.train.runs import RunsWarning

    warnings.simplefilter("always", RunsWarning)
    default_show = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, RunsWarning):
            err_console.print(f"warning: {message}", highlight=False, soft_wrap=True)
        else:
            default_show(message, category, *args, **kwargs)

    warnings.showwarning = show
    from featcache.cli.defaults import project_defaults

    try:
        project_defaults(ctx)
    except FeatcacheError as err:
        _error(f"{err.message} ({err.hint})")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
eval_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Evaluate an aligned run on cached features.")
app.add_typer(eval_app, name="eval")
# Wide tables even when piped to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

CacheDir = typer.Option(None, "--cache-dir", help="Feature store root [env FEATCACHE_CACHE_DIR].")
RunsDir = typer.Option(None, "--runs-dir", help="Run records root [env FEATCACHE_RUNS_DIR, default ./runs].")
# The encoders, declared once for every command that reads or extracts them.
ImageModel = typer.Option("dinov2", "--image-model",
                          help="Image encoder: registry name, timm:<name> or hf:<repo-or-path>.")
TextModel = typer.Option("minilm", "--text-model", help="Text encoder: registry name or hf:<repo-or-path>.")
ImageSize = typer.Option(None, "--image-size", help="Input resolution; -1 for the model's pretrained one.")
PoolingPair = typer.Option(None, "--pooling", help="Pooling of both encoders (mean, cls) or IMAGE,TEXT (cls+mean,mean); "
                                                   "an empty side keeps that encoder's default.")


def settings_file(ctx: typer.Context, param: typer.CallbackParam, value: Optional[str]):
    """--config FILE, read before every other option (is_eager): its values become defaults."""
    from featcache.cli.defaults import load_config

    try:
        return load_config(ctx, param, value)
    except FeatcacheError as err:
        raise typer.BadParameter(f"{err.message} ({err.hint})" if err.hint else err.message) from None


ConfigFile = typer.Option(None, "--config", is_eager=True, callback=settings_file, metavar="FILE",
                          help="A TOML or YAML file of this command's options (lists for a sweep's grid); "
                               "flags on the command line override it.")
Name = typer.Option(None, "--name", help="A label for the run(s), shown by runs and recorded in config.json.")
Tag = typer.Option(None, "--tag", metavar="KEY=VALUE", help="A tag recorded in config.json (repeatable); "
                                                            "report --where tag.KEY=VALUE filters on it.")


def parse_tags(items: Optional[list[str]]) -> dict[str, str]:
    tags = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise FeatcacheError(f"bad --tag {item!r}", "write KEY=VALUE, e.g. --tag ablation=lambda")
        tags[key.strip()] = value.strip()
    return tags


def use_threads(n: int | None) -> None:
    """Set torch's CPU threads (imported here, so commands that train nothing start without torch)."""
    from featcache.pipeline.common.device import set_threads

    set_threads(n)


Threads = typer.Option(None, "--threads", help="CPU threads for torch [default: the cores this process may use: "
                                               "OMP_NUM_THREADS, SLURM_CPUS_PER_TASK or its CPU affinity].")


Json = typer.Option(False, "--json", help="Print one JSON document on stdout and nothing else there "
                                         "(messages and progress go to stderr).")


def print_json(doc) -> None:
    """One JSON document on stdout, written directly (rich would wrap and colour it). NaN and
    infinities (a layer constant over rows scores NaN) become null: JSON has no NaN, and
    strict parsers (jq, JavaScript) refuse the bare token Python would write."""
    import json
    import math

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    sys.stdout.write(json.dumps(clean(doc), indent=2, allow_nan=False, default=str) + "\n")
    sys.stdout.flush()


def cache_dir_or_default(path: Optional[str]):
    """A local path or an fsspec URL (s3://, gs://, file://, memory://)."""
    from featcache.cache.location import as_location

    return as_location(path) if path is not None else default_cache_dir()


def runs_dir_or_default(path: Optional[Path]) -> Path:
    return path if path is not None else default_runs_dir()


RESUMABLE = {"extract": "finished chunks are kept; run the same command to resume",
             "demo": "finished chunks and runs are kept; run the same command to go on"}


def friendly(fn):
    """Turn user errors into one line on stderr and a non-zero exit, never a traceback.

    Operating-system errors (a path that is a file, a folder that cannot be written, a full
    disk) are the user's to fix too: they get the same one line, naming the path.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as err:
            hint = f" ({err.hint})" if err.hint else ""
            _error(f"{err.message}{hint}")
        except OSError as err:
            where = f": {err.filename}" if err.filename else ""
            _error(f"{err.strerror or err}{where} (check that the path exists, is the kind expected "
                   "(a folder or a file) and can be written; nothing half-written is kept)")
        except KeyboardInterrupt:
            err_console.print("interrupted: " + RESUMABLE.get(fn.__name__, "nothing half-written was kept"))
            raise typer.Exit(130)

    return wrapper


def _error(line: str) -> None:
    err_console.print(f"[bold red]error:[/] {line}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def progress_bar():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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


def parse_list(value: str, cast=str) -> list:
    """'a,b,c' (or 'a;b;c') as a list, each item cast; an empty list is an error, never "all"."""
    try:
        items = [cast(v.strip()) for v in value.split(";" if ";" in value else ",") if v.strip()]
    except ValueError:
        raise FeatcacheError(f"bad list {value!r}", "write comma-separated values") from None
    if not items:
        raise FeatcacheError(f"the list {value!r} is empty", "write one value or more, comma-separated")
    return items


def score_table_view(table, where: str):
    """A layer score table as a rich table: the best pair in reverse video, the last underlined."""
    from rich.table import Table

    best, last = table.best(), table.last()
    metric = table.metric + (" (calibrated)" if table.calibrated else "")
    view = Table(title=f"{metric} on {table.n} {where} pairs" + (f", k={table.k}" if table.k else "")
                       + "   [bold reverse]best[/]  [underline]last[/]")
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
    return view
