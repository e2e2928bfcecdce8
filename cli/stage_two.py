"""Stage two commands: layers, align, sweep, runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featcache.cli.app import (
    CacheDir,
    ConfigFile,
    ImageModel,
    Json,
    Name,
    RunsDir,
    Tag,
    TextModel,
    Threads,
    app,
    cache_dir_or_default,
    console,
    err_console,
    friendly,
    parse_list,
    parse_tags,
    print_json,
    progress_bar,
    runs_dir_or_default,
    score_table_view,
    use_threads,
)


def _align_config(image_model, text_model, dataset, cache_dir, runs_dir, **kw):
    from featcache.pipeline.train.config import AlignConfig, SelectConfig

    select = SelectConfig(**{k[len("select_"):]: kw.pop(k) for k in list(kw) if k.startswith("select_")})
    return AlignConfig(image_model=image_model, text_model=text_model, dataset=dataset,
                       cache_dir=cache_dir_or_default(cache_dir), runs_dir=runs_dir_or_default(runs_dir),
                       select=select, **kw)


Dataset = typer.Option("tuxpaint", "--dataset", help="Pair data set (train and val splits are read).")
# Training options that align and sweep share.
Head = typer.Option("linear", help="linear | mlp")
Epochs = typer.Option(1000, min=1)
Patience = typer.Option(200, min=1)
BatchSize = typer.Option(4096, min=2)
LearningRate = typer.Option(1e-3)
Levels = typer.Option(1, min=1, help="STRUCTURE random-walk levels L.")
Lam = typer.Option(10.0, help="STRUCTURE weight lambda (ramped from 0).")
CheckpointOn = typer.Option("val_clip", help="Checkpoint rule: val_clip | val_total.")
Device = typer.Option("cpu", help="cpu | cuda | auto")
Centering = typer.Option("mean", help="R_S centering: none | mean | standard (sweep: a comma list).")
CenterFirst = typer.Option(False, "--center-first", help="Centre before the L2 normalisation, not after.")
Similarity = typer.Option("cosine", help="R_S similarity: cosine | rbf | spearman (sweep: a comma list).")
Gamma = typer.Option(1.0, help="Width of the rbf similarity, exp(-gamma d^2).")
Margin = typer.Option("0", help="R_S margin: D_l <- max(0, D_l - margin) (sweep: a comma list).")
FixedStructure = typer.Option(False, "--fixed-structure", help="R_S on one fixed random training batch.")
SelectMetric = typer.Option("mutual_knn", "--select-metric", help="Metric that --layers auto selects by.")
KRule = typer.Option("rice", "--k-rule", help="Neighbours for auto selection: rice | sqrt | sturges.")
Method = typer.Option("heads", help="heads (trained) | procrustes | csa | csa+structure | asif (training-free).")
Compile = typer.Option("auto", "--compile", help="torch.compile: auto (R_S's elementwise core, from batch 2,048 "
                                                "up; seconds to compile) | on (all of R_S; a minute or more, "
                                                "warns and runs eagerly where it fails) | off.")
Log = typer.Option("none", "--log", help="Experiment tracker: none | tensorboard | wandb (offline unless WANDB_MODE says otherwise; metrics.jsonl always).")
ValSplit = typer.Option("val", help="Validation split; a data set without 'val' holds out 10% of train by hash.")
Weighting = typer.Option("none", help="Level weights: none | inverse (1/l).")
Divergence = typer.Option("reference", help="reference (released code) | js (textbook).")
LamWarmup = typer.Option(1000, "--lam-warmup", min=0, help="Steps of the lambda ramp.")
DOut = typer.Option(512, "--d-out", min=1, help="Width of the shared space.")
LearnTemperature = typer.Option(False, "--learn-temperature", help="Learn tau with the heads.")


@app.command()
@friendly
def layers(
    image_model: str = ImageModel,
    text_model: str = TextModel,
    dataset: str = Dataset,
    split: str = typer.Option("train", help="Split whose pairs are scored."),
    metric: str = typer.Option("mutual_knn", help="mutual_knn | cycle_knn | lcs_knn | cknna | cka | unbiased_cka "
                                                  "| svcca | hcs | hcs_released (both O(n^3): use --n 1000)."),
    n: int = typer.Option(5000, min=3, help="Random pairs scored (fewer if fewer exist)."),
    k: Optional[int] = typer.Option(None, min=1, help="Neighbours [default: by --k-rule]."),
    k_rule: str = typer.Option("rice", help="rice (2 n^(1/3)) | sqrt | sturges (log2 n + 1)."),
    calibrate: int = typer.Option(0, min=0, help="Subtract the mean score over this many shuffled pairings."),
    seed: int = typer.Option(0),
    queries: Optional[int] = typer.Option(
        None, min=2, help="mutual_knn / lcs_knn on many rows: exact neighbours of this many seeded rows only, "
                          "an estimate of the all-row score (11x faster at n = 50k with 5,000; docs/benchmarks.md)."),
    out: Optional[Path] = typer.Option(None, help="Heatmap PNG (and its JSON beside it) [default: "
                                                  "<runs-dir>/layer-scores/...png, beside the runs, never in the cache]."),
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
    threads: Optional[int] = Threads,
    as_json: bool = Json,
):
    """Score every (image layer, text layer) pair; print the table and write a heatmap."""
    use_threads(threads)
    from featcache.pipeline.app.plots import layer_heatmap
    from featcache.pipeline.features import Side, open_pairs
    from featcache.pipeline.train.config import SelectConfig
    from featcache.pipeline.train.plan import CachedData, select_layers
    from featcache.pipeline.train.runs import write_json

    root = cache_dir_or_default(cache_dir)
    pairs = open_pairs(root, dataset, split, Side(image_model), Side(text_model))
    data = CachedData(pairs, pairs)
    table = select_layers(data, SelectConfig(metric=metric, n=n, k=k, k_rule=k_rule, calibrate=calibrate, seed=seed,
                                             queries=queries))
    best, last = table.best(), table.last()
    if not as_json:
        console.print(score_table_view(table, f"{dataset}/{split}"))
        console.print(f"best pair: {best[0]} x {best[1]} ({table.score(*best):.3f}); "
                      f"last pair: {last[0]} x {last[1]} ({table.score(*last):.3f})", highlight=False)
    stem = f"{dataset}-{split}-{image_model}-{text_model}-{metric}".replace("/", "_").replace(":", "_")
    # The cache may be shared and read-only: what a command makes goes beside the runs.
    png = out or runs_dir_or_default(runs_dir) / "layer-scores" / f"{stem}.png"
    layer_heatmap(table, png)
    write_json(png.with_suffix(".json"), table.to_dict())
    if as_json:
        print_json({**table.summary(), "dataset": dataset, "split": split, "image_model": image_model,
                    "text_model": text_model, "heatmap": str(png), "table_json": str(png.with_suffix(".json"))})
    else:
        console.print(f"heatmap: {png}", highlight=False, soft_wrap=True)


@app.command()
@friendly
def align(
    ctx: typer.Context,
    config: Optional[str] = ConfigFile,
    image_model: str = ImageModel,
    text_model: str = TextModel,
    dataset: str = Dataset,
    layers: str = typer.Option("auto", help="One layer choice: auto (the best-scoring pair) | last | a layer for both sides | IMAGE,TEXT (e.g. 9,5)."),
    loss: str = typer.Option("clip+structure", help="clip | clip+structure"),
    levels: int = Levels,
    weighting: str = Weighting,
    divergence: str = Divergence,
    lam: float = Lam,
    lam_warmup: int = LamWarmup,
    temperature: float = typer.Option(0.05, min=1e-4),
    learn_temperature: bool = LearnTemperature,
    head: str = Head,
    d_out: int = DOut,
    pairs: Optional[int] = typer.Option(None, min=2, help="Subsample N training pairs (by seed)."),
    seed: int = typer.Option(0),
    epochs: int = Epochs,
    patience: int = Patience,
    batch_size: int = BatchSize,
    lr: float = LearningRate,
    checkpoint_on: str = CheckpointOn,
    centering: str = Centering,
    center_first: bool = CenterFirst,
    similarity: str = Similarity,
    gamma: float = Gamma,
    margin: float = typer.Option(0.0, help="R_S margin: D_l <- max(0, D_l - margin)."),
    fixed_structure: bool = FixedStructure,
    select_metric: str = SelectMetric,
    k_rule: str = KRule,
    method: str = Method,
    compile: str = Compile,
    log: str = Log,
    device: str = Device,
    val_split: str = ValSplit,
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
    name: Optional[str] = Name,
    tag: Optional[list[str]] = Tag,
    threads: Optional[int] = Threads,
):
    """Train alignment heads (or fit a training-free method) on the cached features; write a run record."""
    use_threads(threads)
    from featcache.cli.defaults import setting_sources
    from featcache.pipeline.train.loop import train
    from featcache.pipeline.train.runs import read_json

    cfg = _align_config(image_model, text_model, dataset, cache_dir, runs_dir, layers=layers, loss=loss,
                        levels=levels, weighting=weighting, divergence=divergence, lam=lam,
                        lam_warmup_steps=lam_warmup, temperature=temperature, learn_temperature=learn_temperature,
                        head=head, d_out=d_out, pairs=pairs, seed=seed, epochs=epochs, patience=patience,
                        batch_size=batch_size, lr=lr, checkpoint_on=checkpoint_on, device=device,
                        val_split=val_split, centering=centering, center_first=center_first, similarity=similarity,
                        gamma=gamma, margin=margin, fixed_structure=fixed_structure, select_metric=select_metric,
                        select_k_rule=k_rule, method=method, log=log, compile=compile, name=name,
                        tags=parse_tags(tag), sources=setting_sources(ctx))
    with progress_bar() as progress:
        run = train(cfg, progress=progress)
    _print_choices(read_json(run / "config.json"))
    s = read_json(run / "summary.json")
    console.print(f"run {s['run_id']} ({s.get('method', 'heads')}): layers {s['image_layer']} x {s['text_layer']}, "
                  f"{s['train_pairs']} pairs, "
                  f"best {s['checkpoint_on']} {s['best_val']:.4f} at epoch {s['best_epoch']} "
                  f"({s['epochs_run']} epochs, {s['seconds']:.1f} s)", highlight=False)
    if "best_before_lambda_warmup" in s:
        console.print(f"note: {s['best_before_lambda_warmup']['note']}", highlight=False, soft_wrap=True)
    console.print(f"record: {run}", highlight=False, soft_wrap=True)


@app.command()
@friendly
def sweep(
    ctx: typer.Context,
    config: Optional[str] = ConfigFile,
    image_model: str = ImageModel,
    text_model: str = TextModel,
    dataset: str = Dataset,
    layers: str = typer.Option("last;auto", help="Layer choices, one run each, separated by ';' (e.g. 'last;auto;9,5')."),
    loss: str = typer.Option("clip,clip+structure", help="Losses, comma-separated."),
    seeds: str = typer.Option("0,1,2", help="Seeds, comma-separated."),
    pairs: Optional[str] = typer.Option(None, help="Training-pair counts for a scaling series, e.g. 100,200,400."),
    head: str = Head,
    epochs: int = Epochs,
    patience: int = Patience,
    batch_size: int = BatchSize,
    lr: float = LearningRate,
    levels: int = Levels,
    weighting: str = Weighting,
    divergence: str = Divergence,
    lam: str = typer.Option("10", help="STRUCTURE weight lambda (ramped from 0), a comma list."),
    lam_warmup: int = LamWarmup,
    temperature: str = typer.Option("0.05", help="Temperature tau, a comma list."),
    learn_temperature: bool = LearnTemperature,
    d_out: int = DOut,
    checkpoint_on: str = CheckpointOn,
    centering: str = Centering,
    center_first: str = typer.Option("false", "--center-first", help="false | true | false,true"),
    similarity: str = Similarity,
    gamma: float = Gamma,
    margin: str = Margin,
    fixed_structure: str = typer.Option("false", "--fixed-structure", help="false | true | false,true"),
    select_metric: str = SelectMetric,
    k_rule: str = KRule,
    method: str = typer.Option("heads", help="Methods, comma-separated: heads, procrustes, csa, csa+structure, asif."),
    shard: Optional[str] = typer.Option(None, help="I/N: train every N-th cell from the I-th [default: from torchrun "
                                                   "or a Slurm array]; report over the shared runs dir combines them."),
    rerun: bool = typer.Option(False, "--rerun", help="Train every cell again, also those with a finished run "
                                                      "under --runs-dir (by default they are kept and skipped)."),
    evaluate: Optional[str] = typer.Option(None, "--eval", help="Evaluate every cell's run after training, in this "
                                                               "process: retrieval and/or classify:DATASET, comma-separated."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells, their resolved layers and which are "
                                                          "finished; train nothing."),
    vectorize: bool = typer.Option(True, "--vectorize/--no-vectorize",
                                   help="Train cells that differ only in seed, lambda, tau or pairs as one batched "
                                        "model; each still writes its own run."),
    compile: str = Compile,
    log: str = Log,
    device: str = Device,
    val_split: str = ValSplit,
    cache_dir: Optional[str] = CacheDir,
    runs_dir: Optional[Path] = RunsDir,
    name: Optional[str] = Name,
    tag: Optional[list[str]] = Tag,
    threads: Optional[int] = Threads,
):
    """Train one run per grid cell from the cache alone (no encoder is loaded)."""
    use_threads(threads)
    import time

    from featcache.cli.defaults import setting_sources
    from featcache.pipeline.common.layerspec import layer_choices, pair_parts
    from featcache.pipeline.evaluate.batch import evaluate_runs, evaluation
    from featcache.pipeline.train.sweep import plan_sweep, train_plan

    cfg = _align_config(image_model, text_model, dataset, cache_dir, runs_dir, head=head, epochs=epochs,
                        patience=patience, batch_size=batch_size, lr=lr, levels=levels, weighting=weighting,
                        divergence=divergence, lam_warmup_steps=lam_warmup, learn_temperature=learn_temperature,
                        d_out=d_out,
                        checkpoint_on=checkpoint_on, device=device, val_split=val_split, gamma=gamma,
                        select_metric=select_metric, select_k_rule=k_rule, log=log, compile=compile, name=name,
                        tags=parse_tags(tag), group=name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                        sources=setting_sources(ctx))
    layer_list = layer_choices(layers)
    for choice in layer_list:
        pair_parts(choice)  # every choice is checked before the first cell trains
    grid = {"lam": parse_list(lam, float), "temperature": parse_list(temperature, float),
            "centering": parse_list(centering), "center_first": parse_list(center_first, _flag),
            "similarity": parse_list(similarity), "margin": parse_list(margin, float),
            "fixed_structure": parse_list(fixed_structure, _flag), "method": parse_list(method)}
    evaluations = [evaluation(s, cfg.cache_dir, cfg.runs_dir) for s in parse_list(evaluate)] if evaluate else []
    start = time.perf_counter()
    plan = plan_sweep(cfg, layer_list, parse_list(loss), parse_list(seeds, int),
                      parse_list(pairs, int) if pairs else None, grid, shard)
    if dry_run:
        _print_plan(plan)
        return
    skipped = 0 if rerun else len(plan.finished)
    if skipped:
        console.print(f"{skipped} of {len(plan.cells)} cells have a finished run under {cfg.runs_dir}: kept, not "
                      "trained again (--rerun trains them)", highlight=False)
    with progress_bar() as progress:
        runs = train_plan(plan, progress, vectorize, rerun)
    console.print(f"{len(runs) - skipped} runs trained in {time.perf_counter() - start:.1f} s under {cfg.runs_dir}",
                  highlight=False)
    if runs:
        from featcache.pipeline.train.runs import read_json

        _print_choices(read_json(runs[0] / "config.json"), layers=False)
    for score, eval_cfg in evaluations:
        with progress_bar() as progress:
            evaluate_runs(score, eval_cfg, runs, progress)
    _print_runs(runs)


def _print_plan(plan) -> None:
    """A sweep's cells as a table: what each would train on and whether it has a run already."""
    from rich.table import Table

    table = Table(box=None)
    for col in ("cell", "layers", "resolved", "loss", "method", "pairs", "seed", "varies", "run"):
        table.add_column(col, overflow="fold")
    settings = [c.cfg.to_dict() for c in plan.cells]
    varied = [k for k in ("lam", "temperature", "centering", "center_first", "similarity", "margin",
                          "fixed_structure") if len({str(s[k]) for s in settings}) > 1]
    for cell, d in zip(plan.cells, settings):
        varies = ", ".join(f"{k}={d[k]}" for k in varied)
        table.add_row(cell.id, cell.cfg.layers, " x ".join(plan.resolved_layers(cell)), cell.cfg.loss,
                      cell.cfg.method, str(cell.cfg.pairs or "all"), str(cell.cfg.seed), varies,
                      cell.run.name if cell.run else "-")
    console.print(table)
    console.print(f"{len(plan.cells)} cells, {len(plan.finished)} finished; nothing trained (--dry-run)",
                  highlight=False)


def _flag(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(value)
    return value.lower() == "true"


def _print_choices(config: dict, layers: bool = True) -> None:
    """Say what the run decided for the user: a carved validation split, the layers auto weighed."""
    val = config.get("validation", {})
    if val.get("carved"):
        console.print(f"no val split in {config['dataset']}: validating on {val['pairs']} pairs held out of "
                      f"{val['split']} ({val['fraction']:.0%} of images by id hash; recorded in config.json)",
                      highlight=False)
    considered = config.get("layers_considered")
    if layers and considered:
        console.print(f"auto chose {config['image_layer']} x {config['text_layer']} among the complete layers: "
                      f"image {', '.join(considered['image'])}; text {', '.join(considered['text'])}",
                      highlight=False, soft_wrap=True)


def _print_runs(runs):
    """A table of runs whose id column is never cut or wrapped, piped or on a narrow terminal
    (ids are copied into other commands); the other columns fold instead, and below 100
    columns the table is drawn 100 wide, for the terminal to wrap, rather than squeezed to ids."""
    from rich.table import Table

    from featcache.pipeline.train.runs import RunEntry

    entries = [RunEntry.of(run) for run in runs]
    table = Table()
    table.add_column("run", no_wrap=True, min_width=max((len(e.run_id) for e in entries), default=3))
    labelled = any(e.label() for e in entries)  # a name/tags column only where some run has one
    for col in ("name", "data", "layers", "method", "loss", "head", "pairs", "seed", "best val", "epoch", "evals"):
        if col != "name" or labelled:
            table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(e.run_id, *([e.label()] if labelled else []), e.dataset,
                      f"{e.layers}: {e.image_layer} x {e.text_layer}", e.method, e.loss, e.head,
                      str(e.train_pairs), str(e.seed), f"{e.best_val:.4f}", str(e.best_epoch), ", ".join(e.evals))
    console.print(table, width=max(console.width, 100), crop=False)


@app.command()
@friendly
def runs(runs_dir: Optional[Path] = RunsDir, last: int = typer.Option(50, min=1, help="Show the N most recent."),
         clean: bool = typer.Option(False, help="Remove the .partial-* folders of runs that were killed."),
         as_json: bool = Json):
    """List runs with their key config and best validation loss."""
    from featcache.pipeline.train.runs import RunEntry, list_runs, partial_runs

    removed = None
    if clean:
        import shutil

        partial = partial_runs(runs_dir_or_default(runs_dir))
        for path in partial:
            shutil.rmtree(path)
        removed = len(partial)
        (err_console if as_json else console).print(f"removed {removed} unfinished run folder(s)", highlight=False)

    found = list_runs(runs_dir_or_default(runs_dir))[-last:]
    if as_json:
        doc = {"runs_dir": str(runs_dir_or_default(runs_dir)), "runs": [RunEntry.of(r).to_dict() for r in found]}
        print_json(doc if removed is None else {**doc, "removed_partial": removed})
    elif not found:
        console.print(f"no runs under {runs_dir_or_default(runs_dir)}")
    else:
        _print_runs(found)
