"""Layer selection: cross-modal similarity of every (image layer, text layer) pair.

Any metric of the Platonic Representation Hypothesis set (``featcache.pipeline.alignment``:
mutual kNN by default, Huh et al., 2024). Each layer's neighbour lists depend on that layer
alone, so the all-pairs table costs one faiss search per layer, not one per pair.
``alignment_score``, ``knn``, ``mutual_knn`` and ``linear_cka`` are importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.device import check_fits
from featcache.pipeline.features import FeatureSource
from featcache.pipeline.select.metrics import (
    METRICS,
    NEIGHBOURS_ONLY,
    QUERY_METRICS,
    alignment_score,
    k_for,
    permuted,
    prepare,
)


def rice_k(n: int) -> int:
    """The Rice rule k = ceil(2 n^(1/3)); 35 for n = 5,000."""
    return k_for(n, None, "rice")


def mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mutual k-nearest-neighbour alignment of two feature sets of the same n rows, in [0, 1]."""
    return alignment_score(a, b, "mutual_knn", k)


@dataclass
class ScoreTable:
    image_layers: list[str]
    text_layers: list[str]
    scores: list[list[float]]  # [image layer][text layer]
    metric: str
    n: int
    k: int | None
    calibrated: bool
    seed: int
    queries: int | None = None  # neighbour lists searched for this many random rows only (None: all n)

    def best(self) -> tuple[str, str]:
        s = np.asarray(self.scores, dtype=float)
        i, j = np.unravel_index(int(np.nanargmax(s)), s.shape)
        return self.image_layers[i], self.text_layers[j]

    def last(self) -> tuple[str, str]:
        blocks = lambda names: [n for n in names if n.startswith("block.")] or names
        return blocks(self.image_layers)[-1], blocks(self.text_layers)[-1]

    def score(self, image_layer: str, text_layer: str) -> float:
        return self.scores[self.image_layers.index(image_layer)][self.text_layers.index(text_layer)]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The table with the choices read off it (what ``layers`` prints under the table): the
        best pair and the last blocks' pair, each with its score."""
        best, last = self.best(), self.last()
        return {**self.to_dict(), "best": {"image_layer": best[0], "text_layer": best[1], "score": self.score(*best)},
                "last": {"image_layer": last[0], "text_layer": last[1], "score": self.score(*last)}}


def _width(feats: Mapping, name: str) -> int:
    """A layer's width without reading it: a LayerRows knows its store's, an array its shape."""
    store = getattr(feats, "store", None)
    return int(store.width) if store is not None else int(np.shape(feats[name])[1])


class LayerRows(Mapping):
    """The same rows of each named layer of a store, read (``read_rows``) when looked up and
    not kept: score_table then holds one layer's features at a time. Holding them all, a
    50k-row table over 25 + 25 layers of width 1,024 peaked at 20.7 GB (docs/benchmarks.md)."""

    def __init__(self, store: FeatureSource, names: list[str], rows: np.ndarray, dtype=np.float32):
        self.store, self.names, self.rows, self.dtype = store, list(names), np.asarray(rows), dtype

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        return self.store.read_rows(name, self.rows, self.dtype)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# Bytes per n x n entry that one hcs pair builds: the float32 walk matrices of three levels and
# autograd's intermediates (hcs), the float64 ones (hcs_released). The constants in table_bytes
# were read off the code and checked against peak RSS (3 + 3 random layers of width 384, n =
# 12,000 for the others, 4,000 for hcs): the estimate is 1.0 to 1.3 times the measured growth
# for the neighbour metrics and hcs, up to 2.5 times for cka, svcca and hcs_released (at n =
# 3,000, mutual_knn's few MB of faiss buffers are a tenth more than the estimate).
_PAIR_N2 = {"hcs": 4 * 18, "hcs_released": 8 * 9}


def table_bytes(metric: str, n: int, k: int | None, image_widths: list[int], text_widths: list[int],
                queries: int | None = None, calibrate: int = 0) -> int:
    """An estimate of the peak memory of ``score_table`` on n rows, so that a table that cannot
    fit is refused before its layers are read rather than killed by the kernel half-way.

    What every layer of both sides keeps until the table is done (neighbour lists and their
    sorted keys; the unit rows for the metrics that score rows), plus the most that reading and
    preparing one layer needs (its rows three times: float16, float32, normalised; the search's
    results and sort), plus the most one pair's score builds (n x n walk matrices for hcs, the
    LCS table, the gathered rows of cknna, float64 copies and SVDs of the kernel metrics) and,
    when calibrating, one re-paired copy of a layer.
    """
    m = min(queries, n) if queries else n
    kk = (k or 1) + 1
    wide = max([*image_widths, *text_widths, 1])
    layers = len(image_widths) + len(text_widths)
    neighbours = METRICS[metric].needs_neighbours
    keep_rows = metric not in NEIGHBOURS_ONLY  # the neighbour-only metrics drop the rows after the search
    held = sum((16 * m * kk if neighbours else 0) + (4 * n * w if keep_rows else 0)
               for w in [*image_widths, *text_widths])
    layer = 12 * n * wide + (48 * m * kk if neighbours else 0)
    pair = {
        "mutual_knn": 24 * m * kk, "cycle_knn": 32 * n * kk, "lcs_knn": 4 * n * kk * kk + 8 * n * kk,
        "cknna": 24 * n * kk * wide + 96 * n * kk,
        "cka": 32 * n * wide + 24 * wide * wide, "unbiased_cka": 32 * n * wide + 8 * wide * wide,
        "svcca": 32 * n * wide + 32 * n * min(n, wide),
    }.get(metric, _PAIR_N2.get(metric, 0) * n * n)
    repaired = (4 * n * wide if keep_rows else 0) + (32 * m * kk if neighbours else 0) if calibrate else 0
    return int(held + layer + pair + repaired + (16 * n * calibrate if layers else 0))


def check_table_fits(metric: str, n: int, k: int | None, image_widths: list[int], text_widths: list[int],
                     queries: int | None = None, calibrate: int = 0) -> None:
    """One line naming --n (and what else sets the size) when the table cannot fit the memory
    this process may still take (the machine's, its cgroup's, its ulimit's; common.device)."""
    import torch

    need = table_bytes(metric, n, k, image_widths, text_widths, queries, calibrate)
    shape = f"{len(image_widths)} x {len(text_widths)} layers of width up to {max([*image_widths, *text_widths])}"
    check_fits(need, torch.device("cpu"),
               f"the {metric} layer table on {n:,} pairs (--n)" + (f" with k={k}" if k else "") + f", {shape},",
               "lower --n" + (" or --k, or pass --queries 5000 (mutual_knn, lcs_knn)" if k else "")
               + (" (hcs is O(n^2) in memory: --n 1000)" if metric in _PAIR_N2 else ""))


def score_table(
    image_feats: Mapping[str, np.ndarray],
    text_feats: Mapping[str, np.ndarray],
    metric: str = "mutual_knn",
    k: int | None = None,
    calibrate: int = 0,
    seed: int = 0,
    k_rule: str = "rice",
    queries: int | None = None,
    device: str | None = None,
) -> ScoreTable:
    """Score every (image layer, text layer) pair on the same n rows, under any metric of
    ``featcache.pipeline.alignment.METRICS``; one neighbour search per layer.

    ``calibrate`` > 0 subtracts the mean score over that many shuffled pairings, which removes
    the part of a score that grows with depth and width by itself.

    ``queries`` (mutual and LCS kNN only) searches the exact neighbours, among all n rows, of
    that many seeded random rows instead of every row: each layer's search costs queries x n x d
    instead of n^2 x d, and a score is the mean over those rows, an unbiased estimate of the
    all-row score (the same rows for every pair, so pairs are compared on equal terms). k
    stays the k of n rows. ``device``: where faiss searches (see featcache.pipeline.faiss_device).
    """
    if metric not in METRICS:
        raise FeatcacheError(f"unknown metric {metric!r}", f"choose one of: {', '.join(METRICS)}")
    n = getattr(image_feats, "n_rows", None) or len(next(iter(image_feats.values())))
    if n < 4 and metric in ("cknna", "unbiased_cka"):
        raise FeatcacheError(f"{metric} needs at least 4 rows (its unbiased HSIC divides by n - 3), got {n}")
    k = k_for(n, k, k_rule) if METRICS[metric].needs_neighbours else None
    rows = None
    if queries is not None and queries < n:
        if metric not in QUERY_METRICS or calibrate:
            raise FeatcacheError(f"query rows work with {', '.join(QUERY_METRICS)} and no calibration",
                                 "leave the number of query rows unset")
        rows = np.sort(np.random.default_rng([seed, 1]).permutation(n)[:queries])
    check_table_fits(metric, n, k, [_width(image_feats, name) for name in image_feats],
                     [_width(text_feats, name) for name in text_feats], None if rows is None else len(rows), calibrate)

    def prepared(feats) -> tuple[dict, set]:
        """Each layer prepared in turn (looked up once: a LayerRows reads it then), so only one
        layer's features are in memory at a time beside what the metric keeps of each."""
        out, const = {}, set()
        for name in feats:
            x = feats[name]
            # A layer that is the same for every row (a ViT's CLS at the embedding output) has no
            # neighbourhoods: its score is NaN, never best, rather than an artefact of tie order.
            if float(np.ptp(np.asarray(x, dtype=np.float32), axis=0).max(initial=0)) < 1e-6:
                const.add(name)
            else:
                out[name] = prepare(x, metric, k, rows, device)
            del x  # freed before the next layer is read, not after
        return out, const

    img, const_img = prepared(image_feats)
    txt, const_txt = prepared(text_feats)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(calibrate)]
    inverse = [np.argsort(p) for p in perms]
    score = METRICS[metric].score

    def pair_score(a: str, b: str) -> float:
        s = score(img[a], txt[b])
        # pairing row s with p[s]: the text layer re-paired, its neighbours mapped back to image rows
        return s - float(np.mean([score(img[a], permuted(txt[b], p, inv)) for p, inv in zip(perms, inverse)])) \
            if perms else s

    img_names, txt_names = list(image_feats), list(text_feats)
    scores = np.array([[np.nan if a in const_img or b in const_txt else pair_score(a, b) for b in txt_names]
                       for a in img_names], dtype=float)
    return ScoreTable(img_names, txt_names, scores.tolist(), metric, n, k, bool(perms), seed,
                      None if rows is None else len(rows))
