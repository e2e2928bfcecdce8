"""``AlignedModel``: a run (or an exported model folder) as an encoder of new images and texts.

It joins the two stages the way the cache does, in one process: stage one's encoder gives the
run's layer with its pooling and preprocessing, rounded to the store's dtype, and stage two's
heads map it to the shared space. The embeddings of an input are therefore the ones the run's
evaluation computes from a cache of that input (tested), which is what makes the model usable
beyond the data sets that were cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.evaluate.metrics import class_embeddings
from featcache.pipeline.evaluate.run_view import embed
from featcache.pipeline.model import pooled
from featcache.pipeline.model.encoders import load_side
from featcache.pipeline.model.heads import input_width, read_heads
from featcache.pipeline.model.inputs import image_items
from featcache.pipeline.model.progress import ticker
from featcache.pipeline.model.spec import ModelSpec, run_folder, spec_from_run
from featcache.pipeline.train.runs import read_json

DEFAULT_TEMPLATES = ("a photo of {}.",)


@dataclass
class Classification:
    """Cosine scores of each image (rows) against each label's prompt embedding (columns)."""

    labels: list[str]
    scores: np.ndarray

    def top(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` best labels with their scores, best first (ties in label order)."""
        order = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(self.scores[i, j])) for j in row] for i, row in enumerate(order)]


class AlignedModel:
    """Two frozen encoders, the run's layer of each, and its heads: ``encode_image``,
    ``encode_text``, ``classify`` and ``similarity`` on inputs that were never cached."""

    def __init__(self, spec: ModelSpec, heads: torch.nn.Module, encoders: dict, batch_size: int = 32):
        self.spec, self.heads, self.encoders, self.batch_size = spec, heads, encoders, batch_size

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run: str | Path = "latest", device: str = "auto", runs_dir: Path | None = None,
                 image_model: str | None = None, text_model: str | None = None,
                 sides: tuple[str, ...] = ("image", "text"), batch_size: int = 32) -> "AlignedModel":
        """A run folder, id, id prefix or ``latest`` under ``runs_dir``. ``image_model`` and
        ``text_model`` point at the same weights in another place (their digests are checked);
        ``sides`` loads only the encoders a caller needs (a text search needs no image encoder)."""
        run_dir = run_folder(run, runs_dir)
        spec = spec_from_run(run_dir, read_json(run_dir / "config.json"), read_json(run_dir / "summary.json"))
        return cls.from_spec(spec, run_dir / "heads.safetensors", device, image_model, text_model, sides, batch_size)

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto", image_model: str | None = None,
             text_model: str | None = None, sides: tuple[str, ...] = ("image", "text"),
             batch_size: int = 32) -> "AlignedModel":
        """A folder written by ``export_model``: no runs folder or cache is read."""
        from featcache.pipeline.model.folder import read_folder

        spec, heads_path = read_folder(Path(folder))
        return cls.from_spec(spec, heads_path, device, image_model, text_model, sides, batch_size)

    @classmethod
    def open(cls, ref: str | Path, device: str = "auto", runs_dir: Path | None = None,
             sides: tuple[str, ...] = ("image", "text"), **kwargs) -> "AlignedModel":
        """A model folder (``export_model``) or a run (folder, id, prefix, ``latest``): what the
        commands' ``--run`` takes."""
        from featcache.pipeline.model.folder import is_model_folder

        if is_model_folder(Path(ref)):
            return cls.load(ref, device, sides=sides, **kwargs)
        return cls.from_run(ref, device, runs_dir, sides=sides, **kwargs)

    @classmethod
    def from_spec(cls, spec: ModelSpec, heads_path: Path, device: str = "auto", image_model: str | None = None,
                  text_model: str | None = None, sides: tuple[str, ...] = ("image", "text"),
                  batch_size: int = 32) -> "AlignedModel":
        if batch_size < 1:
            raise FeatcacheError(f"batch size must be positive, got {batch_size}")
        heads = read_heads(heads_path, spec.head, spec.head.get("widths"))
        overrides = {"image": image_model, "text": text_model}
        encoders = {s: load_side(spec.side(s), device, overrides[s]) for s in sides}
        for s, encoder in encoders.items():  # the heads read this side's pooled width
            read_width = input_width(heads, s)
            width = encoder.pooled_width(spec.side(s).pooling)
            if read_width is not None and read_width != width:
                raise FeatcacheError(f"the {s} head in {heads_path} takes {read_width} features, but the "
                                     f"{s} encoder's layer {spec.side(s).layer} has {width}",
                                     "the heads belong to another model: export the run again")
        return cls(spec, heads, encoders, batch_size)

    # -- embeddings ------------------------------------------------------------------------
    def image_features(self, images, skip_bad: bool = False, progress=None) -> tuple[np.ndarray, list[int]]:
        """The run's image layer for ``images``, as the store would hold it, and the positions
        of inputs that could not be decoded (NaN rows; only with ``skip_bad``)."""
        items = image_items(images)
        with ticker(len(items), "embed images", progress) as advance:
            return pooled.image_features(self._encoder("image"), self.spec.image, items, self.batch_size,
                                         skip_bad, advance)

    def text_features(self, texts, progress=None) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise FeatcacheError(f"text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string")
        with ticker(len(texts), "embed texts", progress) as advance:
            return pooled.text_features(self._encoder("text"), self.spec.text, texts, self.batch_size, advance)

    def encode_image(self, images, skip_bad: bool = False, progress=None, tensor: bool = False):
        """L2-normalised embeddings (rows) of paths, PIL images, arrays or tensors. With
        ``skip_bad`` an undecodable input gets a NaN row instead of stopping the call."""
        return self._out(self.embed_features("image", self.image_features(images, skip_bad, progress)[0]), tensor)

    def encode_text(self, texts, progress=None, tensor: bool = False):
        return self._out(self.embed_features("text", self.text_features(texts, progress)), tensor)

    def embed_features(self, modality: str, features: np.ndarray) -> np.ndarray:
        """Stored-dtype features of the model's layer through its head: the cached path's step."""
        return embed(getattr(self.heads, f"{modality}_head"), np.asarray(features, dtype=np.float32))

    # -- uses ------------------------------------------------------------------------------
    def classify(self, images, labels: list[str], templates: list[str] | None = None,
                 skip_bad: bool = False) -> Classification:
        """Zero-shot scores as ``eval classify`` makes them: each label's prompts (every template
        filled with it) embedded, normalised, averaged and normalised again; cosine to each image."""
        labels = [str(label).strip() for label in labels]
        if not labels or not all(labels):
            raise FeatcacheError("the label list is empty" if not labels else "a label is empty",
                                 'give one label or more, e.g. --labels "cat,dog"')
        if len(set(labels)) != len(labels):
            raise FeatcacheError(f"the label {next(x for x in labels if labels.count(x) > 1)!r} is given twice")
        templates = list(templates or DEFAULT_TEMPLATES)
        if not templates or any("{}" not in t for t in templates):
            raise FeatcacheError("every template needs a {} for the label", "e.g. 'a photo of {}.'")
        prompts = [t.format(label) for label in labels for t in templates]
        prompt_class = np.repeat(np.arange(len(labels)), len(templates))
        classes = class_embeddings(self.encode_text(prompts), prompt_class, len(labels))
        return Classification(labels, self.encode_image(images, skip_bad) @ classes.T)

    def similarity(self, images, texts) -> np.ndarray:
        """Cosine similarity (images x texts) in the shared space."""
        return self.encode_image(images) @ self.encode_text(texts).T

    # -- helpers ---------------------------------------------------------------------------
    def _encoder(self, modality: str):
        if modality not in self.encoders:
            raise FeatcacheError(f"this model was loaded without its {modality} encoder",
                                 f"load it with sides=('image', 'text') to encode {modality}s")
        return self.encoders[modality]

    @staticmethod
    def _out(x: np.ndarray, tensor: bool):
        return torch.from_numpy(x) if tensor else x

    def __repr__(self) -> str:
        i, t = self.spec.image, self.spec.text
        return (f"AlignedModel({i.model} {i.layer}/{i.pooling} + {t.model} {t.layer}/{t.pooling} -> "
                f"{self.spec.head.get('d_out')}, run {self.spec.origin.get('run_id')})")

