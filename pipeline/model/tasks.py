"""The model commands as library calls: a typed config in, plain results out (the CLI prints them).

``embed`` writes embeddings of new images, a text file's lines, or a cached split; ``predict``
scores images against the user's labels; ``search`` ranks a cached split's images for sentences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.paths import default_cache_dir
from featcache.pipeline.data.rows import read_list
from featcache.pipeline.model.aligned import AlignedModel
from featcache.pipeline.model.gallery import cached_gallery, search
from featcache.pipeline.model.inputs import image_name
from featcache.pipeline.model.outputs import write_embeddings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".svg", ".tif", ".tiff")


@dataclass
class ModelRef:
    """Which model and where it runs: a run (folder, id, prefix, ``latest``) or a model folder."""

    run: str = "latest"
    runs_dir: Path | None = None
    device: str = "auto"
    batch_size: int = 32
    image_model: str | None = None  # the same weights in another place (digest checked)
    text_model: str | None = None

    def open(self, sides: tuple[str, ...]) -> AlignedModel:
        return AlignedModel.open(self.run, self.device, self.runs_dir, sides=sides, batch_size=self.batch_size,
                                 image_model=self.image_model, text_model=self.text_model)


@dataclass
class EmbedConfig:
    model: ModelRef
    out: Path
    images: list[Path] | None = None  # files, or folders of image files
    texts: Path | None = None  # a JSON list or one text per line
    dataset: str | None = None  # a cached split's rows, through the heads
    split: str = "test"
    side: str = "image"  # which rows of --dataset
    skip_bad: bool = False
    extract: bool = False
    cache_dir: Path = field(default_factory=default_cache_dir)


@dataclass
class EmbedResult:
    files: list[Path]
    rows: int
    width: int
    skipped: list[str]


def embed(cfg: EmbedConfig, progress=None) -> EmbedResult:
    given = [n for n, v in (("--images", cfg.images), ("--texts", cfg.texts), ("--dataset", cfg.dataset)) if v]
    if len(given) != 1:
        raise FeatcacheError("give exactly one of --images, --texts and --dataset" +
                             (f" (got {' and '.join(given)})" if given else ""))
    if cfg.out.suffix not in (".npy", ".parquet"):
        raise FeatcacheError(f"cannot write embeddings to {cfg.out.name}", "name the output .npy or .parquet")
    texts, skipped = None, []
    if cfg.images:
        files = image_files(cfg.images)
        model = cfg.model.open(("image",))
        features, bad = model.image_features(files, cfg.skip_bad, progress)
        keep = np.setdiff1d(np.arange(len(files)), bad)
        ids, emb = [str(files[i]) for i in keep], model.embed_features("image", features[keep])
        skipped = [str(files[i]) for i in bad]
    elif cfg.texts:
        texts = read_list(cfg.texts, "texts")
        model = cfg.model.open(("text",))
        ids, emb = [str(i) for i in range(len(texts))], model.encode_text(texts, progress)
    else:
        if cfg.side not in ("image", "text"):
            raise FeatcacheError(f"--side {cfg.side!r}: choose image or text")
        model = cfg.model.open(())
        gallery = cached_gallery(model, cfg.dataset, cfg.split, cfg.side, cfg.cache_dir, cfg.extract, progress)
        ids, emb, texts = gallery.ids, gallery.embeddings, gallery.texts
    return EmbedResult(write_embeddings(cfg.out, ids, emb, texts), len(ids), int(emb.shape[1]), skipped)


def image_files(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the image files under it, sorted."""
    out: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise FeatcacheError(f"the folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        else:
            out.append(path)  # a missing or undecodable file is named when it is read
    if not out:
        raise FeatcacheError("no images given", "name image files or folders")
    return out


@dataclass
class PredictConfig:
    model: ModelRef
    images: list[Path]
    labels: list[str]
    templates: Path | None = None
    k: int = 5
    skip_bad: bool = False


def predict(cfg: PredictConfig) -> list[dict]:
    """Per image: its top-k labels with cosine scores, or the reason it was skipped."""
    if cfg.k < 1:
        raise FeatcacheError(f"-k must be at least 1, got {cfg.k}")
    templates = read_list(cfg.templates, "templates") if cfg.templates else None
    files = image_files(cfg.images)
    model = cfg.model.open(("image", "text"))
    result = model.classify(files, cfg.labels, templates, skip_bad=cfg.skip_bad)
    out = []
    for i, (file, top) in enumerate(zip(files, result.top(cfg.k))):
        if np.isnan(result.scores[i]).any():
            out.append({"image": image_name(file, i), "error": "cannot be decoded (skipped)"})
        else:
            out.append({"image": image_name(file, i), "labels": [{"label": l, "score": s} for l, s in top]})
    return out


@dataclass
class SearchConfig:
    model: ModelRef
    dataset: str
    queries: list[str]
    split: str = "test"
    k: int = 5
    extract: bool = False
    cache_dir: Path = field(default_factory=default_cache_dir)


def search_gallery(cfg: SearchConfig, progress=None) -> list[dict]:
    """Per sentence: the ``k`` best images of the cached split, with their files and scores."""
    if not cfg.queries or not all(q.strip() for q in cfg.queries):
        raise FeatcacheError("the search sentence is empty", 'e.g. featcache search --dataset D "a red bicycle"')
    model = cfg.model.open(("text",))
    gallery = cached_gallery(model, cfg.dataset, cfg.split, "image", cfg.cache_dir, cfg.extract, progress)
    hits = search(gallery, model.encode_text(cfg.queries), cfg.k)
    return [{"query": q, "hits": [{"rank": r + 1, "id": gallery.ids[row], "path": gallery.paths[row], "score": s}
                                  for r, (row, s) in enumerate(found)]}
            for q, found in zip(cfg.queries, hits)]
