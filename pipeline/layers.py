"""Layer selection: cross-modal similarity of every (image layer, text layer) pair.

The mutual-kNN score is that of the Platonic Representation Hypothesis (Huh et al., 2024).
Each layer's neighbour lists depend on that layer alone, so the all-pairs table costs one
faiss search per layer, not one per pair.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from featcache.pipeline.metrics import normalise


def rice_k(n: int) -> int:
    """The Rice rule k = ceil(2 n^(1/3)); 35 for n = 5,000."""
    return max(1, math.ceil(2 * n ** (1 / 3) - 1e-9))


def knn(x: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of each row's k nearest neighbours by inner product, itself excluded."""
    x = normalise(x)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} rows, got {k}")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, idx = index.search(x, k + 1)
    # Self may sit anywhere among exact ties; drop it, or the (k+1)-th when it is absent.
    not_self = idx != np.arange(n)[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def overlap(na: np.ndarray, nb: np.ndarray) -> float:
    """Mean over rows of |N_a(s) ∩ N_b(s)| / k for two neighbour-index tables."""
    k = na.shape[1]
    hits = (na[:, :, None] == nb[:, None, :]).any(-1).sum(-1)
    return float(hits.mean() / k)


def mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mutual k-nearest-neighbour alignment of two feature sets of the same n rows, in [0, 1]."""
    if len(a) != len(b):
        raise ValueError(f"a and b need the same rows, got {len(a)} and {len(b)}")
    return overlap(knn(a, k), knn(b, k))


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    cross = np.linalg.norm(a.T @ b) ** 2
    return float(cross / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b) + 1e-12))


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


def score_table(
    image_feats: dict[str, np.ndarray],
    text_feats: dict[str, np.ndarray],
    metric: str = "mutual_knn",
    k: int | None = None,
    calibrate: int = 0,
    seed: int = 0,
) -> ScoreTable:
    """Score every (image layer, text layer) pair on the same n rows.

    ``calibrate`` > 0 subtracts the mean score over that many shuffled pairings, which removes
    the part of a score that grows with depth and width by itself.
    """
    n = len(next(iter(image_feats.values())))
    # A layer that is the same for every row (a ViT's CLS at the embedding output) has no
    # neighbourhoods: its score is NaN, never best, rather than an artefact of tie order.
    def constant(feats: dict) -> set:
        return {name for name, x in feats.items()
                if float(np.ptp(np.asarray(x, dtype=np.float32), axis=0).max(initial=0)) < 1e-6}

    const_img, const_txt = constant(image_feats), constant(text_feats)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(calibrate)]
    if metric == "mutual_knn":
        k = k or rice_k(n)
        ni = {name: knn(x, k) for name, x in image_feats.items() if name not in const_img}
        nt = {name: knn(x, k) for name, x in text_feats.items() if name not in const_txt}
        inverse = [np.argsort(p) for p in perms]

        def pair_score(a: str, b: str) -> float:
            s = overlap(ni[a], nt[b])
            # pairing s with p[s]: the text neighbours of p[s], mapped back to image rows
            return s - np.mean([overlap(ni[a], inv[nt[b][p]]) for p, inv in zip(perms, inverse)]) if perms else s
    elif metric == "cka":
        k = None

        def pair_score(a: str, b: str) -> float:
            s = linear_cka(image_feats[a], text_feats[b])
            return s - np.mean([linear_cka(image_feats[a], text_feats[b][p]) for p in perms]) if perms else s
    else:
        raise ValueError(f"unknown metric {metric!r}: use mutual_knn or cka")
    img_names, txt_names = list(image_feats), list(text_feats)
    scores = np.array([[np.nan if a in const_img or b in const_txt else pair_score(a, b) for b in txt_names]
                       for a in img_names], dtype=float)
    return ScoreTable(img_names, txt_names, scores.tolist(), metric, n, k, bool(perms), seed)
