"""What an aligned model is, written down: per modality the encoder (as the run named it, with the
identity its cached features recorded), the layer and pooling read, the stored dtype; and the heads.

One record serves both origins. ``from_run`` reads it off a run's config.json (the identities of
its training stores); a model folder (``folder.py``) stores it as its own config.json. Loading
then never asks where it came from, so a run and its exported folder give the same embeddings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.cache.paths import default_runs_dir
from featcache.pipeline.train.runs import find_run

FORMAT = "featcache-aligned-model"


VERSION = 1


@dataclass(frozen=True)
class SideSpec:
    """One modality: ``model`` as the run names it (registry name, ``timm:`` or ``hf:`` spec),
    ``image_size`` the option it was extracted with (None: the encoder's default), and the
    recorded ``identity`` the weights on this machine must match."""

    modality: str
    model: str
    layer: str
    pooling: str
    dtype: str
    identity: dict
    image_size: int | None = None

    @property
    def where(self) -> str | None:
        """Where the weights were, for an error when they are gone: a local ``hf:`` folder."""
        target = self.model[3:] if self.model.startswith("hf:") else None
        return target if target and target.startswith(("/", "./", "../", "~")) else None


@dataclass(frozen=True)
class ModelSpec:
    image: SideSpec
    text: SideSpec
    head: dict  # method, head, d_out, temperature, learn_temperature: what rebuilds the heads
    origin: dict  # the run it came from: id, data set, key results (for the README and users)

    def side(self, modality: str) -> SideSpec:
        return self.image if modality == "image" else self.text

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "ModelSpec":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise FeatcacheError(f"{where} is not a featcache model folder's config.json",
                                 "make one with: featcache export-model RUN DIR")
        if data.get("version") != VERSION:
            raise FeatcacheError(f"{where} is a model folder of version {data.get('version')!r}; this featcache "
                                 f"reads version {VERSION}", "export the run again with this featcache")
        try:
            return cls(SideSpec(**data["image"]), SideSpec(**data["text"]), dict(data["head"]), dict(data["origin"]))
        except (KeyError, TypeError) as err:
            raise FeatcacheError(f"{where} lacks a field of a model folder ({type(err).__name__}: {err})",
                                 "export the run again: featcache export-model RUN DIR") from None


def spec_from_run(run_dir: Path, cfg: dict, summary: dict) -> ModelSpec:
    """The record of a trained run: layers from config.json, encoders from the identities of the
    stores it trained on (what its heads learned to read), head settings, key results."""
    trained = cfg.get("cache", {}).get("train", {})
    if not {"image", "text"} <= set(trained):
        raise FeatcacheError(f"the run {run_dir} records no training stores (an older run?)",
                             "retrain it with this featcache: the command is in its config.json")

    def side(modality: str) -> SideSpec:
        record = trained[modality]
        ident = record["encoder"]
        return SideSpec(modality, cfg[f"{modality}_model"], cfg[f"{modality}_layer"], ident["pooling"],
                        record.get("dtype", "float16"), ident,
                        cfg.get("image_size") if modality == "image" else None)

    head = {k: cfg.get(k) for k in ("method", "head", "d_out", "temperature", "learn_temperature")}
    head["method"] = head["method"] or "heads"
    origin = {"run_id": run_dir.name, "dataset": cfg.get("dataset"), "loss": cfg.get("loss"),
              "train_pairs": cfg.get("train_pairs"), "best_epoch": summary.get("best_epoch"),
              "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and k != "run_id"}}
    return ModelSpec(side("image"), side("text"), head, origin)


def run_folder(run: str | Path, runs_dir: Path | None = None) -> Path:
    """A run folder given by its path (anywhere), or an id, id prefix or ``latest`` under ``runs_dir``."""
    path = Path(run)
    if path.is_dir() and (path / "summary.json").is_file():
        return path
    return find_run(runs_dir or default_runs_dir(), str(run))
