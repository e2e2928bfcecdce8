"""Alignment metrics between two feature sets of the same n rows (Platonic Representation
Hypothesis set, as ../shared/method.md states them), built for tables of many layers.

Each metric is a pair of functions: ``prepare(x, k)`` computes what depends on one layer alone
(its L2-normalised rows, its k-nearest-neighbour table: one faiss search per layer) and
``score(a, b)`` combines two prepared layers. A whole layer table therefore costs one
neighbour search per layer, never one per pair. ``permuted(state, p, inv)`` re-pairs a prepared
layer by a permutation of rows, for chance-level calibration, without a new search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from featcache.pipeline.common.arrays import normalise
from featcache.pipeline.common.device import flat_ip

K_RULES = ("fixed", "rice", "sqrt", "sturges")


def k_for(n: int, k: int | None = None, rule: str = "rice") -> int:
    """Neighbours per row: a fixed k, or Rice 2 n^(1/3), square root sqrt(n), Sturges log2(n) + 1."""
    if k is None:
        if rule == "rice":
            k = math.ceil(2 * n ** (1 / 3) - 1e-9)
        elif rule == "sqrt":
            k = math.ceil(math.sqrt(n) - 1e-9)
        elif rule == "sturges":
            k = math.ceil(math.log2(n) + 1 - 1e-9)
        else:
            raise ValueError(f"k rule must be one of {K_RULES[1:]} (or give k), got {rule!r}")
    return max(1, min(int(k), n - 1))


def knn(x: np.ndarray, k: int, queries: np.ndarray | None = None, device: str | None = None) -> np.ndarray:
    """Indices (m, k) of the k nearest neighbours by cosine among all n rows, itself excluded,
    nearest first, of each row in ``queries`` (all rows, m = n, when None).

    Exact flat search. Only the query rows are searched, so m query rows cost m x n x d,
    not n x n x d; their neighbour lists are exactly those of the full search.
    """
    x = normalise(x)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} rows, got {k}")
    rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    index = flat_ip(x, device, k + 1)
    _, idx = index.search(x if queries is None else x[rows], k + 1)
    # Self may sit anywhere among exact ties; drop it, or the (k+1)-th when it is absent.
    not_self = idx != rows[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def edge_keys(nn: np.ndarray, n: int) -> np.ndarray:
    """The neighbour lists as one sorted int64 array of keys row * n + neighbour.

    Rows are sorted one by one and laid out in row order, so the whole array is sorted: two
    layers' lists then intersect by one binary search of m k keys, O(m k log(m k)), instead
    of comparing every pair of a row's k x k entries, O(m k^2).
    """
    return (np.arange(len(nn), dtype=np.int64)[:, None] * n + np.sort(nn, axis=1)).reshape(-1)


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of ``keys`` occur in ``sorted_keys``."""
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


@dataclass(frozen=True)
class Layer:
    """One prepared layer: unit rows and (where the metric needs them) nearest neighbours."""

    x: np.ndarray
    nn: np.ndarray | None = None  # (m, k): the neighbours of the query rows (all rows when m = n)
    keys: np.ndarray | None = None  # edge_keys(nn): the same lists, sorted, for O(m k log) overlaps
    queries: np.ndarray | None = None  # the query rows when only some rows were searched

    @classmethod
    def of(cls, x: np.ndarray, nn: np.ndarray | None, queries: np.ndarray | None = None) -> "Layer":
        return cls(x, nn, None if nn is None else edge_keys(nn, len(x)), queries)


def permuted(state: Layer, p: np.ndarray, inv: np.ndarray) -> Layer:
    """The layer re-paired so that row s stands where row p[s] stood (neighbours mapped back)."""
    if state.queries is not None:
        raise ValueError("a layer searched on query rows only cannot be re-paired; calibrate on all rows")
    return Layer.of(state.x[p], None if state.nn is None else inv[state.nn[p]])


def _same_rows(a: Layer, b: Layer) -> None:
    if (a.queries is None) != (b.queries is None) or (a.queries is not None and not np.array_equal(a.queries, b.queries)):
        raise ValueError("the two layers were searched on different query rows")


def _full(a: Layer, what: str) -> None:
    if a.queries is not None:
        raise ValueError(f"{what} needs the neighbour lists of every row; search without queries")


# -- neighbour metrics -------------------------------------------------------------------------
def mutual_knn_score(a: Layer, b: Layer) -> float:
    """Mean over (query) rows of |N_A(i) ∩ N_B(i)| / k, by one sorted-key intersection."""
    _same_rows(a, b)
    m, k = a.nn.shape
    shared = int(_member(a.keys, b.keys).sum())  # lists hold distinct rows, so each match is one neighbour
    return float(np.float64(shared) / m / k)


def cycle_knn_score(a: Layer, b: Layer) -> float:
    """Share of rows i that return to i: i's neighbours in B, then those rows' neighbours in A."""
    _full(a, "cycle_knn")
    _full(b, "cycle_knn")
    n, k = a.nn.shape
    # i returns when some j in N_B(i) has i in N_A(j): the key j * n + i is an edge of A
    back = b.nn * n + np.arange(n, dtype=np.int64)[:, None]
    return float(_member(a.keys, back.reshape(-1)).reshape(n, k).any(1).mean())


def lcs_knn_score(a: Layer, b: Layer) -> float:
    """Mean length of the longest common subsequence of the two ordered neighbour lists."""
    _same_rows(a, b)
    n, k = a.nn.shape
    dp = np.zeros((n, k + 1, k + 1), dtype=np.int32)
    for i in range(1, k + 1):  # the classic DP, vectorised over rows
        same = a.nn[:, i - 1, None] == b.nn  # (n, k)
        for j in range(1, k + 1):
            dp[:, i, j] = np.where(same[:, j - 1], dp[:, i - 1, j - 1] + 1,
                                   np.maximum(dp[:, i - 1, j], dp[:, i, j - 1]))
    return float(dp[:, k, k].mean())


def _hsic_unbiased_pattern(n: int, rows: np.ndarray, cols: np.ndarray, kv: np.ndarray, lv: np.ndarray) -> float:
    """Unbiased HSIC (Song et al., 2012, eq. 5) of two kernels that are zero off one sparse pattern.

    O(nnz) instead of O(n^2): sum(K o L^T) pairs each entry with its transpose, and
    sum(K L) = colsum(K) . rowsum(L).
    """
    keys = rows * n + cols
    order = np.argsort(keys)
    sorted_keys = keys[order]
    t = cols * n + rows
    pos = np.searchsorted(sorted_keys, t)
    pos = np.minimum(pos, len(sorted_keys) - 1)
    hit = sorted_keys[pos] == t
    term1 = float(np.sum(kv[hit] * lv[order[pos[hit]]]))
    term2 = float(kv.sum()) * float(lv.sum()) / ((n - 1) * (n - 2))
    term3 = 2.0 * float(np.bincount(cols, kv, n) @ np.bincount(rows, lv, n)) / (n - 2)
    return (term1 + term2 - term3) / (n * (n - 3))


def _masked_hsic(a: Layer, b: Layer, mask_rows: np.ndarray, mask_cols: np.ndarray) -> float:
    kv = np.einsum("ij,ij->i", a.x[mask_rows].astype(np.float64), a.x[mask_cols].astype(np.float64))
    lv = np.einsum("ij,ij->i", b.x[mask_rows].astype(np.float64), b.x[mask_cols].astype(np.float64))
    return _hsic_unbiased_pattern(len(a.x), mask_rows, mask_cols, kv, lv)


def _mutual_pattern(a: Layer, b: Layer) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) where j is among the k nearest neighbours of i in both A and B."""
    _full(a, "cknna")
    n, k = a.nn.shape
    rows = np.repeat(np.arange(n), k)
    cols = a.nn.reshape(-1)
    keep = _member(b.keys, rows * n + cols)
    return rows[keep], cols[keep]


def cknna_score(a: Layer, b: Layer) -> float:
    """CKA on the mutual k-nearest-neighbour pairs only, with the unbiased HSIC (Huh et al., 2024)."""
    kl = _masked_hsic(a, b, *_mutual_pattern(a, b))
    kk = _masked_hsic(a, a, *_mutual_pattern(a, a))
    ll = _masked_hsic(b, b, *_mutual_pattern(b, b))
    return kl / (math.sqrt(kk * ll) + 1e-6) if kk * ll > 0 else float("nan")


# -- kernel and subspace metrics ---------------------------------------------------------------
def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019), biased HSIC, in feature space."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    cross = np.linalg.norm(a.T @ b) ** 2
    return float(cross / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b) + 1e-12))


def _hsic_unbiased_linear(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased HSIC of the linear kernels K = A A^T, L = B B^T, in O(n d^2), never forming K."""
    n = len(a)
    ka, lb = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)  # the diagonals, removed
    term1 = np.linalg.norm(a.T @ b) ** 2 - ka @ lb
    k_rows, l_rows = a @ a.sum(0) - ka, b @ b.sum(0) - lb  # row sums of K~ and L~
    term2 = k_rows.sum() * l_rows.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 * (k_rows @ l_rows) / (n - 2)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def unbiased_cka(a: np.ndarray, b: np.ndarray) -> float:
    """CKA with the unbiased HSIC estimator, linear kernels on the features as given."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    kl, kk, ll = _hsic_unbiased_linear(a, b), _hsic_unbiased_linear(a, a), _hsic_unbiased_linear(b, b)
    return kl / (math.sqrt(kk * ll) + 1e-6) if kk * ll > 0 else float("nan")


def svcca(a: np.ndarray, b: np.ndarray, keep: float = 0.99, dims: int = 10) -> float:
    """SVCCA: keep the SVD directions holding 99% of the variance, then the mean of the top
    ``dims`` canonical correlations between the two reduced sets."""
    def reduce(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.mean(0)
        x = x / (x.std(0) + 1e-8)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        var = np.cumsum(s**2) / max(float((s**2).sum()), 1e-300)
        r = int(np.searchsorted(var, keep) + 1)
        return u[:, :r] * s[:r]

    qa, _ = np.linalg.qr(reduce(a))
    qb, _ = np.linalg.qr(reduce(b))
    rho = np.linalg.svd(qa.T @ qb, compute_uv=False)  # the canonical correlations
    return float(np.mean(np.clip(rho[:dims], 0.0, 1.0)))


def hcs(a: np.ndarray, b: np.ndarray, levels: int = 3, temperature: float = 0.05) -> float:
    """exp(-R_S) between the two sets, L levels with 1/l weights: a similarity in [0, 1].

    O(n^2) memory and O(L n^3) time: score it on a subsample (``--n 1000``)."""
    import torch

    from featcache.pipeline.common.losses import structure_regularizer

    ta, tb = torch.from_numpy(np.asarray(a, dtype=np.float32)), torch.from_numpy(np.asarray(b, dtype=np.float32))
    return float(math.exp(-structure_regularizer(ta, tb, temperature, levels, "inverse").item()))


def hcs_released(a: np.ndarray, b: np.ndarray, levels: int = 3, temperature: float = 0.05,
                 eps: float = 1e-8) -> float:
    """The released code's ``AlignmentMetrics.hcs``, for comparisons with published numbers.

    It differs from :func:`hcs` in three ways, kept as released: each side is L2-normalised and
    then has the mean of its *unnormalised* features subtracted; the Jensen-Shannon divergence is
    the textbook one against the mixture; and it is summed over all n^2 entries rather than
    averaged over rows, so it grows with n and the score tends to 0 as n grows (about 1e-18 on 300 random rows).
    """
    import torch

    def walk(x: torch.Tensor) -> torch.Tensor:
        xn = x / (x.norm(dim=1, keepdim=True) + eps) - x.mean(0, keepdim=True)
        return torch.softmax(xn @ xn.T / temperature, dim=1)

    pa, pb = (walk(torch.from_numpy(np.asarray(v, dtype=np.float64))) for v in (a, b))
    total, pa_l, pb_l = 0.0, pa, pb
    for level in range(1, levels + 1):
        if level > 1:
            pa_l, pb_l = pa_l @ pa, pb_l @ pb
        m = 0.5 * (pa_l + pb_l) + eps
        js = 0.5 * ((pb_l * torch.log(pb_l / m)).sum() + (pa_l * torch.log(pa_l / m)).sum())
        total += float(js) / level
    return math.exp(-total / levels)


# -- the registry the table uses -----------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    needs_neighbours: bool
    score: Callable[[Layer, Layer], float]


METRICS: dict[str, Metric] = {
    "mutual_knn": Metric(True, mutual_knn_score),
    "cycle_knn": Metric(True, cycle_knn_score),
    "lcs_knn": Metric(True, lcs_knn_score),
    "cknna": Metric(True, cknna_score),
    "cka": Metric(False, lambda a, b: linear_cka(a.x, b.x)),
    "unbiased_cka": Metric(False, lambda a, b: unbiased_cka(a.x, b.x)),
    "svcca": Metric(False, lambda a, b: svcca(a.x, b.x)),
    "hcs": Metric(False, lambda a, b: hcs(a.x, b.x)),
    "hcs_released": Metric(False, lambda a, b: hcs_released(a.x, b.x)),
}


QUERY_METRICS = ("mutual_knn", "lcs_knn")  # per-row means: a subset of query rows estimates them


NEIGHBOURS_ONLY = ("mutual_knn", "cycle_knn", "lcs_knn")  # scores that read the neighbour lists alone


def prepare(x: np.ndarray, metric: str, k: int | None, queries: np.ndarray | None = None,
            device: str | None = None) -> Layer:
    """What one layer contributes to every pair it is in (its neighbour search happens here).

    ``queries``: search the neighbours of these rows only (among all rows); the mutual and LCS
    kNN scores are then means over those rows, an unbiased estimate of the all-row mean.
    """
    m = METRICS[metric]
    if queries is not None and metric not in QUERY_METRICS:
        raise ValueError(f"{metric} needs every row's neighbours; query rows work with {', '.join(QUERY_METRICS)}")
    unit = normalise(x) if metric not in ("cka", "unbiased_cka", "svcca") else np.asarray(x, dtype=np.float32)
    if not m.needs_neighbours:
        return Layer(unit)
    layer = Layer.of(unit, knn(unit, k, queries, device), queries)
    if metric in NEIGHBOURS_ONLY:  # the rows are not needed past the search: keep n rows of width 0
        layer = replace(layer, x=np.empty((len(unit), 0), dtype=np.float32))
    return layer


def alignment_score(a: np.ndarray, b: np.ndarray, metric: str = "mutual_knn", k: int | None = None,
                    k_rule: str = "rice") -> float:
    """The alignment of two feature sets of the same rows under ``metric`` (see METRICS)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if len(a) != len(b):
        raise ValueError(f"a and b need the same rows, got {len(a)} and {len(b)}")
    k = k_for(len(a), k, k_rule) if METRICS[metric].needs_neighbours else None
    return METRICS[metric].score(prepare(a, metric, k), prepare(b, metric, k))
