"""Evaluation and reporting commands: eval retrieval, eval classify, report, demo, study."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featcache.cache.errors import FeatcacheError
from featcache.cli.app import (
    CacheDir,
    ImageModel,
    ImageSize,
    Json,
    PoolingPair,
    RunsDir,
    TextModel,
    Threads,
    app,
    cache_dir_or_default,
    console,
    err_console,
    eval_app,
    friendly,
    parse_list,
    print_json,
    progress_bar,
    runs_dir_or_default,
    score_table_view,
    use_threads,
)


def _print_eval(result: dict, as_json: bool = False) -> None:
    """An evaluation result as a table, or (--json) the result record itself: the same dict
    that was written to the run's eval/ folder, with its path."""
    if as_json:
        print_json(result)
        return
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


def _print_evals(results: list[dict], as_json: bool = False) -> None:
    """One line per run: many runs' results side by side (a single run gets _print_eval's table);
    --json: one run's result record, or ``{"results": [...]}`` for several."""
    from rich.table import Table

    if len(results) == 1:
        _print_eval(results[0], as_json)
        return
    if as_json:
        print_json({"results": results})
        return
    first = results[0]
    table = Table(title=f"{first['task']} on {first['dataset']}/{first['split']}: {len(results)} runs (%)")
    table.add_column("run", no_wrap=True)
    table.add_column("layers")
    columns = [(key, k) for key, value in first["metrics"].items() for k in (value if isinstance(value, dict) else [None])]
    for key, k in columns:
        name = f"{key} {k}" if k else key
        table.add_column(name.replace("image_to_text", "i→t").replace("text_to_image", "t→i"), justify="right")
    for r in results:
        values = [r["metrics"][key][k] if k else r["metrics"][key] for key, k in columns]
        table.add_row(r["run_id"], " x ".join(r["layers"]), *[f"{100 * v:.1f}" for v in values])
    console.print(table)
    console.print(f"{len(results)} results, one per run, under each run's eval/ folder", highlight=False)


RunsOption = typer.Option("latest", help="Runs to evaluate, in one process: 'latest', 'all', a run folder, or run ids "
                                         "and prefixes separated by ',' (a prefix takes every run it starts).")


@eval_app.command("retrieval")
@friendly
def eval_retrieval_cmd(
    run: str = RunsOption,
    dataset: Optional[str] = typer.Option(None, help="Pair data set [default: the run's]."),
    split: str = typer.Option("test"),
    positives: str = typer.Option("image", help="image (own captions) | caption (also identical captions)."),
    baseline: bool = typer.Option(True, help="Also score the untrained Procrustes/least-squares reference."),
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
    threads: Optional[int] = Threads,
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained page of example queries "
                                        "(caption -> top 5 images, image -> top 5 captions, thumbnails inline)."),
    html_queries: int = typer.Option(20, help="Example queries per direction on the --html page."),
    html_seed: int = typer.Option(0, help="Seed of the --html page's sample of queries."),
    force: bool = typer.Option(False, help="Replace an existing --html page."),
    as_json: bool = Json,
):
    """Image->text and text->image Recall@1/5/10 of runs on held-out pairs."""
    use_threads(threads)
    from featcache.pipeline.evaluate.batch import evaluate_runs, select_runs
    from featcache.pipeline.evaluate.reads import Reads
    from featcache.pipeline.evaluate.retrieval import RetrievalConfig, eval_retrieval

    cfg = RetrievalConfig(run=run, dataset=dataset, split=split, positives=positives, baseline=baseline,
                          cache_dir=cache_dir_or_default(cache_dir), runs_dir=runs_dir_or_default(runs_dir))
    runs = select_runs(cfg.runs_dir, run)
    page = None
    if html is not None:
        from featcache.pipeline.app.retrieval_page import PageConfig, check_page_path, write_retrieval_page

        page = PageConfig(html, queries=html_queries, seed=html_seed, force=force)
        check_page_path(page)
        if len(runs) != 1:
            raise FeatcacheError(f"--html shows one run, but --run {run!r} selects {len(runs)}",
                                 "pass one run id (or write one page per run)")
    reads = Reads()
    with progress_bar() as progress:
        results = evaluate_runs(eval_retrieval, cfg, runs, progress if len(runs) > 1 else None, reads=reads)
    _print_evals(results, as_json)
    if page is not None:
        out = write_retrieval_page(cfg, page, results[0], reads, runs[0])
        console.print(f"gallery: {out}", highlight=False, soft_wrap=True)


@eval_app.command("classify")
@friendly
def eval_classify_cmd(
    dataset: str = typer.Option("fashion-mnist", help="Classification set: fashion-mnist, mnist, "
                                                      "tuxpaint-categories or an image folder."),
    run: str = RunsOption,
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(None, min=1, help="Use the store extracted with this --limit."),
    templates: Optional[Path] = typer.Option(None, help="Prompt templates file (JSON list or lines, with {})."),
    classnames: Optional[Path] = typer.Option(None, help="Class names file (JSON list or lines)."),
    extract: bool = typer.Option(False, "--extract", help="Extract missing caches first."),
    baseline: bool = typer.Option(True),
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
    threads: Optional[int] = Threads,
    as_json: bool = Json,
):
    """Zero-shot classification: top-1, top-5 and mean per-class recall."""
    use_threads(threads)
    from featcache.cache.lookup import StoreNotFound
    from featcache.pipeline.common.names import dataset_key
    from featcache.pipeline.evaluate.batch import evaluate_runs, select_runs
    from featcache.pipeline.evaluate.classify import ClassifyConfig, classify_spec, eval_classify

    cfg = ClassifyConfig(dataset=dataset, run=run, split=split, limit=limit, templates=templates,
                         classnames=classnames, baseline=baseline, cache_dir=cache_dir_or_default(cache_dir),
                         runs_dir=runs_dir_or_default(runs_dir))
    runs = select_runs(cfg.runs_dir, run)
    if extract:
        _extract_for_runs(cfg, runs)
    try:
        with progress_bar() as progress:
            results = evaluate_runs(eval_classify, cfg, runs, progress if len(runs) > 1 else None)
    except StoreNotFound as err:
        if err.query.dataset != dataset_key(classify_spec(cfg)):
            raise  # the run's own training cache is missing: --extract of this set cannot help
        raise FeatcacheError(err.message, f"{err.hint}, or pass --extract") from None
    _print_evals(results, as_json)


def _extract_for_runs(cfg, runs: list[Path]) -> None:
    """Stage one for a classification set, with each run's encoders and options, where the
    stores are missing (eval classify --extract; an existing store is a no-op)."""
    from featcache.cache.commands import run_decode
    from featcache.pipeline.evaluate.classify import classify_spec
    from featcache.pipeline.extract.run import ExtractConfig, extract
    from featcache.pipeline.train.runs import read_json

    sides = []
    for run in runs:
        run_cfg = read_json(run / "config.json")
        for side in ((run_cfg["image_model"], run_cfg.get("image_pooling"), run_cfg.get("image_size"),
                      run_decode(run_cfg)),  # a run of --decode draft stores is evaluated on draft stores
                     (run_cfg["text_model"], run_cfg.get("text_pooling"), None, "cpu")):
            if side not in sides:
                sides.append(side)
    with progress_bar() as progress:
        for model, pooling, size, decode in sides:
            extract(ExtractConfig(model=model, pooling=pooling, image_size=size, dataset=classify_spec(cfg),
                                  splits=[cfg.split], limit=cfg.limit, layers="all", cache_dir=cfg.cache_dir,
                                  decode=decode), progress)


@eval_app.command("suite")
@friendly
def eval_suite_cmd(
    run: str = typer.Option("latest", help="The run to evaluate: 'latest', a run folder or a run id (or prefix)."),
    baseline: Optional[str] = typer.Option(None, help="Another run to compare with (e.g. last-layer CLIP): the "
                                                      "table gives each metric's relative improvement over it."),
    suite: str = typer.Option("offline", help="A built-in suite (offline, paper, vtab, retrieval) or a suite file "
                                              "(.toml or .yaml: per benchmark name, task, source, split)."),
    benchmark_root: Optional[Path] = typer.Option(None, help="Where CLIP_benchmark's data sets lie: ROOT/wds_NAME "
                                                             "(webdataset export) or ROOT/NAME (torchvision files)."),
    extract: bool = typer.Option(False, "--extract", help="Extract the stores a benchmark lacks (once per encoder)."),
    download: bool = typer.Option(False, "--download", help="Let CLIP_benchmark download a torchvision set that is "
                                                            "not on disk [default: never download]."),
    templates: Optional[Path] = typer.Option(None, help="Prompt templates for every classification benchmark "
                                                        "(JSON list or lines, with {}), instead of each set's own."),
    limit: Optional[int] = typer.Option(None, min=1, help="A fixed subset of N images per benchmark (quick runs)."),
    out: Optional[Path] = typer.Option(None, help="Folder for suite.md, suite.csv, suite.json and one JSON per "
                                                  "(run, benchmark, task) [default: results/suite-SUITE]."),
    device: str = typer.Option("auto", help="Device for --extract."),
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
    threads: Optional[int] = Threads,
):
    """Every benchmark of a suite: zero-shot classification and retrieval, one table."""
    use_threads(threads)
    from featcache.pipeline.app.suite import SuiteConfig, run_suite

    cfg = SuiteConfig(run=run, baseline=baseline, suite=suite, benchmark_root=benchmark_root, extract=extract,
                      download=download, templates=templates, limit=limit, out=out, device=device,
                      cache_dir=cache_dir_or_default(cache_dir), runs_dir=runs_dir_or_default(runs_dir))
    result = run_suite(cfg, progress_bar, say=lambda line: console.print(line, highlight=False, soft_wrap=True))
    console.print(result["markdown"], highlight=False, soft_wrap=True)
    console.print(f"wrote {result['written'][-1].parent}: suite.md, suite.csv, suite.json and "
                  f"{len(result['written']) - 3} benchmark results", highlight=False, soft_wrap=True)


@app.command()
@friendly
def report(
    group_by: Optional[str] = typer.Option(None, help="Config keys to group runs by [default: dataset, layers, method, "
                                                       "loss, head, pairs and every other setting that varies]."),
    where: Optional[list[str]] = typer.Option(None, help="Keep runs with KEY=VALUE (repeatable)."),
    metric: Optional[list[str]] = typer.Option(None, help="Metric columns [default: every R@K and top1]."),
    baseline: bool = typer.Option(False, help="Also show the untrained reference's metrics."),
    out: Optional[Path] = typer.Option(None, help="Folder for report.csv, report.md and PNG plots."),
    runs_dir: Optional[Path] = RunsDir,
    as_json: bool = Json,
):
    """Compare runs side by side: mean ± std over seeds per config group."""
    from rich.table import Table

    from featcache.pipeline.app.plots import metric_bars
    from featcache.pipeline.app.report import build_report, layer_pair_rows, run_rows, write_outputs

    filters = {}
    for item in where or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise FeatcacheError(f"bad --where {item!r}", "write KEY=VALUE")
        filters[key] = value
    rows = run_rows(runs_dir_or_default(runs_dir), include_baseline=baseline)
    rep = build_report(rows, parse_list(group_by) if group_by else None, metric or None, filters)
    say = err_console if as_json else console  # under --json, stdout holds the document alone
    table = Table(title=f"{sum(g['n'] for g in rep.groups)} runs, mean ± sample std over seeds (%)")
    for col in rep.header():
        table.add_column(col, overflow="fold")
    for row in rep.table_rows():
        table.add_row(*row)
    if not as_json:
        console.print(table)
    written = []
    if out is not None:
        written = write_outputs(rep, out)
        first = rep.headline()
        if first:
            labels, means, stds = layer_pair_rows(rows, first)
            written.append(metric_bars(labels, means, stds, out / "report-layer-pairs.png", f"{first.short} (%)",
                                       f"{first.label} per trained layer pair"))
        for path in written:
            say.print(f"wrote {path}", highlight=False, soft_wrap=True)
    if as_json:
        print_json({**rep.to_dict(), "written": [str(p) for p in written]})


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("results"), help="Folder for the table, plots and runs."),
    quick: bool = typer.Option(False, help="A few-minute smoke version (small subsets, one seed)."),
    dataset: str = typer.Option("tuxpaint", help="Training pairs: tuxpaint (a few minutes on two cores) or "
                                                 "tuxpaint+openmoji (1,887 pairs; several times longer)."),
    device: str = typer.Option("auto"),
    cache_dir: Optional[str] = CacheDir,
    image_model: str = ImageModel,
    text_model: str = TextModel,
    pooling: Optional[str] = PoolingPair,
    image_size: Optional[int] = ImageSize,
):
    """The main job on the offline assets: extract, layer table, ablation grid, evaluation, report."""
    from featcache.pipeline.app.demo import DemoConfig, run_demo, with_openmoji
    from featcache.pipeline.app.demo import quick as quick_config
    from featcache.pipeline.app.study import pooling_pair

    if dataset not in ("tuxpaint", "tuxpaint+openmoji"):
        raise FeatcacheError(f"the demo trains on tuxpaint or tuxpaint+openmoji, not {dataset!r}",
                             "for your own data use featcache extract, align and eval")
    image_pooling, text_pooling = pooling_pair(pooling)
    cfg = DemoConfig(out=out, cache_dir=cache_dir_or_default(cache_dir), device=device, image_model=image_model,
                     text_model=text_model, image_pooling=image_pooling, text_pooling=text_pooling,
                     image_size=image_size)
    cfg = with_openmoji(cfg) if dataset == "tuxpaint+openmoji" else cfg
    cfg = quick_config(cfg) if quick else cfg
    result = run_demo(cfg, console, progress_bar,
                      lambda table: console.print(score_table_view(table, f"{cfg.train_dataset}/train")))
    for view in result["views"]:
        console.print(table_view(view))
    by_name = {p.name: p for p in result["written"]}
    console.print(f"full table (every metric): {by_name['report.md']} and {by_name['report.csv']}",
                  highlight=False, soft_wrap=True)
    plots = [cfg.out / "layers.png", *(p for p in result["written"] if p.suffix == ".png")]
    console.print(f"plots: {', '.join(map(str, plots))}", highlight=False, soft_wrap=True)
    if result["tensorboard"] is not None:
        console.print(f"TensorBoard curves: tensorboard --logdir {result['tensorboard']}", highlight=False,
                      soft_wrap=True)
    times = result["times"]
    console.print(f"total {times['total_s']:.0f} s (extraction {times['extract_s']:.0f} s, training "
                  f"{times['grid_s']:.0f} s, evaluation {times['eval_s']:.0f} s)", highlight=False)


def table_view(view):
    """A demo TableView as a rich table: the metric names left, a column per configuration."""
    from rich.table import Table

    table = Table(title=view.title)
    table.add_column(view.header[0], no_wrap=True)
    for name in view.header[1:]:
        table.add_column(name, justify="right", no_wrap=True)
    for row in view.rows:
        table.add_row(*row)
    return table


@app.command()
@friendly
def study(
    out: Path = typer.Option(Path("results/study"), help="Folder for study.json, study.md and runs."),
    salts: Optional[str] = typer.Option(
        None, help="Split salts ('' is the default split), comma-separated [default: ,1,2 on hash-split data; "
                   "data with explicit splits has one split and takes none]."),
    seeds: str = typer.Option("0,1,2"),
    epochs: int = typer.Option(300, min=1),
    patience: int = typer.Option(50, min=1),
    batch_size: int = typer.Option(128, min=2),
    checkpoint_on: str = typer.Option("val_clip", help="val_clip | val_total"),
    n_boot: int = typer.Option(2000, min=100, max=100_000, help="Bootstrap resamples (a Python loop each)."),
    dataset: str = typer.Option("tuxpaint", help="tuxpaint, tuxpaint+openmoji, or your own pair file."),
    image_model: str = ImageModel,
    text_model: str = TextModel,
    pooling: Optional[str] = PoolingPair,
    image_size: Optional[int] = ImageSize,
    pairs: Optional[str] = typer.Option(None, help="A scaling study: training-pair counts, e.g. 50,100,250,500,all."),
    layers: Optional[str] = typer.Option(None, help="Layer choices compared, separated by ';': last, auto or both [default: last;auto]."),
    variants: Optional[str] = typer.Option(
        None, help="Instead of --layers, named rows to compare: methods (trained heads, CSA, CSA + R_S, ASIF, "
                   "Procrustes), switches (one row per R_S switch) or recipe; comma-separated."),
    lam_warmup_steps: Optional[int] = typer.Option(
        None, "--lam-warmup", min=0, help="Steps of the lambda ramp for every run [default: the trainer's 1000]; 0 takes the "
                          "ramp out of a scaling study, where a ramp in steps is a different share of each size's run."),
    merge: Optional[str] = typer.Option(
        None, help="Summarise studies run apart (say one --salts each, on several machines): their --out "
                   "folders, comma-separated; nothing is trained."),
    cache_dir: Optional[str] = CacheDir,
    threads: Optional[int] = Threads,
):
    """Splits x seeds with paired bootstrap intervals; with --pairs, against the number of training pairs."""
    use_threads(threads)
    from featcache.pipeline.app.study import (
        StudyConfig,
        pooling_pair,
        recipe,
        run_study,
        scaling_markdown,
        to_markdown,
        variant_set,
    )
    from featcache.pipeline.common.layerspec import CHOICE_HINT, layer_choices

    sizes = tuple(None if v == "all" else _positive(v) for v in parse_list(pairs)) if pairs else ()
    if variants is not None and layers is not None:
        raise FeatcacheError("--layers and --variants both given", "use one: --variants sets the layers of each row")
    if variants is not None:
        rows = variant_set(parse_list(variants))
    else:
        chosen = layer_choices(layers or "last;auto")
        if any(v not in ("last", "auto") for v in chosen):
            raise FeatcacheError(f"bad --layers {layers!r}: a study compares the choices last and auto",
                                 f"use last, auto or last;auto ({CHOICE_HINT})")
        rows = tuple(recipe(lay, loss) for lay in chosen for loss in ("clip", "clip+structure"))
    image_pooling, text_pooling = pooling_pair(pooling)
    cfg = StudyConfig(out=out, dataset=dataset, salts=tuple(v.strip() for v in salts.split(",")) if salts is not None
                      else None, seeds=tuple(parse_list(seeds, int)), epochs=epochs, patience=patience,
                      batch_size=batch_size, checkpoint_on=checkpoint_on, n_boot=n_boot,
                      cache_dir=cache_dir_or_default(cache_dir), pairs=sizes, configs=rows,
                      lam_warmup_steps=lam_warmup_steps, image_model=image_model, text_model=text_model,
                      image_pooling=image_pooling, text_pooling=text_pooling, image_size=image_size)
    summary = run_study(cfg, progress_bar, [Path(d) for d in parse_list(merge)] if merge is not None else None,
                        say=lambda line: console.print(line, highlight=False, soft_wrap=True))
    console.print(scaling_markdown(summary) if sizes else to_markdown(summary), highlight=False)


def _positive(value: str) -> int:
    """One --pairs size: a whole number of at least 2 (training needs two pairs), or all."""
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < 2:
        raise FeatcacheError(f"bad --pairs size {value!r}", "write whole numbers of at least 2 or 'all', "
                                                             "comma-separated (e.g. 50,100,all)")
    return n
