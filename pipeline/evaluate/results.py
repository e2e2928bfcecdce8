"""Typed evaluation results: one row per number, as clip_benchmark writes one per (model, data set, task).

Evaluation writes these rows into its result JSON (``rows``); reports, the demo and the study
read them back and select by field, never by parsing a column name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from featcache.cache.files import real_folder
from featcache.cache.store import FeatureStore
from featcache.pipeline.common.names import dataset_key
from featcache.pipeline.train.runs import write_json
from featcache.pipeline.train.trackers import make_tracker

SHORT = {"image_to_text": "i2t", "text_to_image": "t2i", "image_to_class": ""}


@dataclass(frozen=True)
class Column:
    """What a number measures; equal columns are averaged over seeds, different ones never."""

    task: str  # retrieval | classify
    dataset: str
    split: str
    positives: str  # image | caption | class: the rule for a correct answer
    direction: str  # image_to_text | text_to_image | image_to_class
    metric: str  # recall | top1 | top5 | mean_per_class_recall
    k: int | None = None  # the K of recall@K
    model: str = "run"  # "run", or the untrained reference's method

    @property
    def name(self) -> str:
        """The metric as printed: ``R@1``, ``top1``."""
        return f"R@{self.k}" if self.metric == "recall" else self.metric

    def _tail(self) -> str:
        rule = "/caption-positives" if self.positives == "caption" else ""
        ref = f" [{self.model}]" if self.model != "run" else ""
        words = " ".join(w for w in (SHORT.get(self.direction, self.direction), self.name) if w)
        return f"{rule} {words}{ref}"

    @property
    def label(self) -> str:
        """A full, unique label: ``retrieval/tuxpaint/test i2t R@1`` (CSV headers, --metric)."""
        return f"{self.task}/{self.dataset}/{self.split}{self._tail()}"

    @property
    def short(self) -> str:
        """For narrow tables: ``tuxpaint i2t R@1``."""
        return f"{self.dataset}{self._tail()}"

    def is_headline(self) -> bool:
        """R@1 or top-1: the one number a plot of a report shows by default."""
        return (self.metric == "recall" and self.k == 1) or self.metric == "top1"


@dataclass(frozen=True)
class ResultRow:
    run: str
    column: Column
    value: float

    def to_dict(self) -> dict:
        return {"run": self.run, **asdict(self.column), "value": self.value}

    @classmethod
    def from_dict(cls, d: dict) -> "ResultRow":
        fields = {k: d[k] for k in Column.__dataclass_fields__ if k in d}
        return cls(d["run"], Column(**fields), float(d["value"]))


def result_rows(run: str, task: str, dataset: str, split: str, positives: str, metrics: dict,
                model: str = "run") -> list[ResultRow]:
    """The rows of one evaluation's metrics: nested by direction (retrieval) or flat (classify)."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):  # retrieval: direction -> {"R@K": value}
            for name, v in value.items():
                rows.append(ResultRow(run, Column(task, dataset, split, positives, key, "recall",
                                                  int(name.removeprefix("R@")), model), float(v)))
        else:
            rows.append(ResultRow(run, Column(task, dataset, split, positives, "image_to_class", key, None, model),
                                  float(value)))
    return rows


def rows_of(result: dict) -> list[ResultRow]:
    """The typed rows an evaluation JSON holds."""
    return [ResultRow.from_dict(d) for d in result.get("rows", [])]


def store_record(store: FeatureStore) -> dict:
    ident = store.identity
    return {"path": str(store.path), "encoder": ident["encoder"]["name"],
            "weights_sha256": ident["encoder"]["weights_sha256"], "pooling": ident["encoder"]["pooling"],
            "dataset_sha256": ident["dataset"]["sha256"], "rows": store.rows}


def write_result(run_dir: Path, run_cfg: dict, result: dict) -> Path:
    """One JSON per (run, task, data set, split, positive rule), with its typed rows."""
    key = (result["run_id"], result["task"], dataset_key(result["dataset"]), result["split"], result["positive_rule"])
    rows = result_rows(*key, result["metrics"])
    tracker = make_tracker(run_cfg.get("log", "none"), run_dir)
    tracker.log(0, {f"eval/{r.column.label}": r.value for r in rows})  # the final recalls beside the curves
    tracker.close()
    if "baseline" in result:
        rows += result_rows(*key, result["baseline"]["metrics"], model=result["baseline"]["method"])
    result["rows"] = [r.to_dict() for r in rows]
    rule = "-caption-positives" if result.get("positive_rule") == "caption" else ""
    name = f"{result['task']}-{dataset_key(result['dataset'])}-{result['split']}{rule}.json"
    path = real_folder(run_dir / "eval") / name.replace("/", "_")
    write_json(path, result)
    return path
