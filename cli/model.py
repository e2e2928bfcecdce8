"""The aligned model's commands: embed, predict, search, export-model (pipeline/model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from featcache.cli.app import (
    CacheDir,
    RunsDir,
    Threads,
    app,
    cache_dir_or_default,
    console,
    err_console,
    friendly,
    parse_list,
    progress_bar,
    runs_dir_or_default,
    use_threads,
)

RunOrModel = typer.Option("latest", "--run", help="A run (folder, id, id prefix or latest) or a model folder "
                                                  "written by export-model.")
Device = typer.Option("auto", "--device", help="Where the encoders run: auto (CUDA when there is one), cpu, cuda.")
BatchSize = typer.Option(32, "--batch-size", min=1, help="Inputs per encoder forward pass.")
ImageWeights = typer.Option(None, "--image-model", help="The run's image encoder at another place (its sha256 is "
                                                       "checked against the recorded one).")
TextWeights = typer.Option(None, "--text-model", help="The run's text encoder at another place (sha256 checked).")
SkipBad = typer.Option(False, "--skip-bad", help="Leave out images that cannot be decoded (named on stderr).")
Extract = typer.Option(False, "--extract", help="Extract the split's store first if it is not cached.")


def _ref(run, runs_dir, device, batch_size, image_model, text_model):
    from featcache.pipeline.model.tasks import ModelRef

    return ModelRef(run, runs_dir_or_default(runs_dir), device, batch_size, image_model, text_model)


@app.command()
@friendly
def embed(
    out: Path = typer.Option(..., "--out", help="OUT.npy (ids in OUT.ids.json) or OUT.parquet (id, embedding)."),
    images: Optional[list[Path]] = typer.Option(None, "--images", help="An image file or a folder of them "
                                                                       "(repeatable)."),
    texts: Optional[Path] = typer.Option(None, "--texts", help="A file of texts: a JSON list or one per line."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="A cached data set: its rows through the heads."),
    split: str = typer.Option("test", help="The split of --dataset."),
    side: str = typer.Option("image", "--side", help="Which rows of --dataset: image or text."),
    run: str = RunOrModel, skip_bad: bool = SkipBad, extract: bool = Extract, device: str = Device,
    batch_size: int = BatchSize, image_model: Optional[str] = ImageWeights, text_model: Optional[str] = TextWeights,
    cache_dir: Optional[str] = CacheDir, runs_dir: Optional[Path] = RunsDir, threads: Optional[int] = Threads,
):
    """Embed new images, a list of texts, or a cached split with an aligned run; write them with their ids."""
    use_threads(threads)
    from featcache.pipeline.model.tasks import EmbedConfig
    from featcache.pipeline.model.tasks import embed as run_embed

    cfg = EmbedConfig(_ref(run, runs_dir, device, batch_size, image_model, text_model), out, images, texts, dataset,
                      split, side, skip_bad, extract, cache_dir_or_default(cache_dir))
    with progress_bar() as progress:
        result = run_embed(cfg, progress)
    for name in result.skipped:
        err_console.print(f"skipped: {name} cannot be decoded", highlight=False, soft_wrap=True)
    console.print(f"{result.rows} embeddings of {result.width} dimensions: "
                  + ", ".join(str(f) for f in result.files), highlight=False, soft_wrap=True)


@app.command()
@friendly
def predict(
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    labels: str = typer.Option(..., "--labels", help='Comma-separated labels, e.g. "cat,dog,bicycle".'),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Prompt templates with {} (JSON list or "
                                                                       "one per line) [default: 'a photo of {}.']."),
    k: int = typer.Option(5, "-k", "--top", help="Labels shown per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    run: str = RunOrModel, skip_bad: bool = SkipBad, device: str = Device, batch_size: int = BatchSize,
    image_model: Optional[str] = ImageWeights, text_model: Optional[str] = TextWeights,
    runs_dir: Optional[Path] = RunsDir, threads: Optional[int] = Threads,
):
    """Zero-shot labels for images: the top-k of your labels with their cosine scores."""
    use_threads(threads)
    from featcache.pipeline.model.tasks import PredictConfig
    from featcache.pipeline.model.tasks import predict as run_predict

    results = run_predict(PredictConfig(_ref(run, runs_dir, device, batch_size, image_model, text_model), images,
                                        parse_list(labels), templates, k, skip_bad))
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    for r in results:
        if "error" in r:
            err_console.print(f"skipped: {r['image']} {r['error']}", highlight=False, soft_wrap=True)
            continue
        console.print(r["image"], highlight=False, soft_wrap=True)
        for hit in r["labels"]:
            console.print(f"  {hit['score']:7.4f}  {hit['label']}", highlight=False, soft_wrap=True)


@app.command()
@friendly
def search(
    queries: list[str] = typer.Argument(..., help="One sentence or more, e.g. \"a red bicycle\"."),
    dataset: str = typer.Option(..., "--dataset", help="The data set whose cached images are searched."),
    split: str = typer.Option("test", help="The split searched."),
    k: int = typer.Option(5, "-k", "--top", help="Images shown per sentence."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    run: str = RunOrModel, extract: bool = Extract, device: str = Device, text_model: Optional[str] = TextWeights,
    cache_dir: Optional[str] = CacheDir, runs_dir: Optional[Path] = RunsDir, threads: Optional[int] = Threads,
):
    """Search a data set's cached images with sentences; print the best images' files and scores."""
    use_threads(threads)
    from featcache.pipeline.model.tasks import SearchConfig, search_gallery

    cfg = SearchConfig(_ref(run, runs_dir, device, 32, None, text_model), dataset, list(queries), split, k, extract,
                       cache_dir_or_default(cache_dir))
    with progress_bar() as progress:
        results = search_gallery(cfg, progress)
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    for r in results:
        console.print(f"{r['query']}", highlight=False, soft_wrap=True)
        for hit in r["hits"]:
            console.print(f"  {hit['rank']:2d}  {hit['score']:7.4f}  {hit['path'] or hit['id']}", highlight=False,
                          soft_wrap=True)


@app.command("export-model")
@friendly
def export_model_cmd(
    run: str = typer.Argument(..., help="The run: a folder, id, id prefix or latest."),
    folder: Path = typer.Argument(..., help="The model folder to write (config.json, heads, README.md)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    runs_dir: Optional[Path] = RunsDir,
):
    """Write a run as a self-contained model folder: encoders referenced with digests, heads, README."""
    from featcache.pipeline.model.folder import export_model

    path = export_model(run, folder, runs_dir_or_default(runs_dir), overwrite)
    console.print(f"model folder: {path} (load it with AlignedModel.load or --run {path})", highlight=False,
                  soft_wrap=True)
