"""A model folder: what a colleague needs to use a run without its runs folder or the cache.

``config.json`` is the model's record (``spec.ModelSpec``: encoders by name or path with their
digests, layers, pooling, preprocessing, head settings) plus the heads file's sha256;
``heads.safetensors`` the heads; ``README.md`` the run's key results and how to load it. Encoder
weights are referenced, never copied: a model folder stays a few kilobytes to megabytes, and the
digests make a wrong copy of the weights an error rather than wrong embeddings. No pickles.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.cache.files import refuse_link
from featcache.pipeline.model.heads import file_sha256, input_width, read_heads
from featcache.pipeline.model.readme import readme
from featcache.pipeline.model.spec import ModelSpec, run_folder, spec_from_run
from featcache.pipeline.train.runs import read_eval_results, read_json, write_json

HEADS = "heads.safetensors"


def export_model(run: str | Path, folder: Path, runs_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Write the model folder of ``run`` at ``folder`` (written beside it, then renamed into place:
    a killed export leaves no half folder)."""
    run_dir = run_folder(run, runs_dir)
    folder = refuse_link(Path(folder))  # --overwrite removes it: never what a link points to
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        if not overwrite:
            raise FeatcacheError(f"{folder} already exists and is not an empty folder",
                                 "choose another folder, or pass --overwrite to replace it")
        if not (folder / "config.json").exists():
            raise FeatcacheError(f"{folder} is not a model folder; --overwrite replaces only model folders",
                                 "choose another folder")
    spec = spec_from_run(run_dir, read_json(run_dir / "config.json"), read_json(run_dir / "summary.json"))
    heads = read_heads(run_dir / HEADS, spec.head)
    spec.head["widths"] = {s: input_width(heads, s) for s in ("image", "text")}
    tmp = refuse_link(folder.with_name(f".partial-{folder.name}"))  # a planted link is refused and left alone
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(run_dir / HEADS, tmp / HEADS)
        write_json(tmp / "config.json", {**spec.to_json(), "heads": {"file": HEADS, "sha256": file_sha256(tmp / HEADS)}})
        (tmp / "README.md").write_text(readme(spec, read_eval_results(run_dir), folder.name))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def is_model_folder(path: Path) -> bool:
    """A folder with a config.json and no summary.json (which every run has)."""
    return path.is_dir() and (path / "config.json").is_file() and not (path / "summary.json").exists()


def read_folder(folder: Path) -> tuple[ModelSpec, Path]:
    """The record of a model folder and its heads file, refused if the heads are not the ones
    its config.json was written with."""
    config = folder / "config.json"
    if not config.is_file():
        raise FeatcacheError(f"no model folder at {folder} (no config.json)",
                             "make one with: featcache export-model RUN DIR")
    try:
        data = read_json(config)
    except ValueError as err:
        raise FeatcacheError(f"{config} is not valid JSON ({err})", "export the run again") from None
    spec = ModelSpec.from_json(data, config)
    heads = folder / data.get("heads", {}).get("file", HEADS)
    want = data.get("heads", {}).get("sha256")
    if not heads.is_file():
        raise FeatcacheError(f"the model folder {folder} has no heads file {heads.name}", "export the run again")
    if want and file_sha256(heads) != want:
        raise FeatcacheError(f"the heads in {heads} do not match the model's config.json (sha256 "
                             f"{file_sha256(heads)[:12]}, recorded {want[:12]})",
                             "put back the heads file exported with it, or export the run again")
    return spec, heads
