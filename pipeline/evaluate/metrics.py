"""Retrieval recall and zero-shot accuracy, as ../shared/method.md defines them."""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np

from featcache.pipeline.common.arrays import normalise
from featcache.pipeline.common.device import flat_ip


def _first_ranks(top: np.ndarray, positives: Sequence[set[int]], offset: int) -> np.ndarray:
    """Rank (0-based) of each query's first correct item in ``top``; len(row) when none is there."""
    out = np.full(len(top), top.shape[1], dtype=np.int64)
    for q, row in enumerate(top):
        pos = positives[offset + q]
        out[q] = next((r for r, item in enumerate(row) if item in pos), top.shape[1])
    return out


def _recall(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    return {int(k): float((ranks < k).mean()) for k in ks}


def retrieval_ranks(query: np.ndarray, gallery: np.ndarray, positives: Sequence[set[int]], kmax: int = 10,
                    batch: int = 8192, block: int = 1 << 16) -> np.ndarray:
    """Each query's first correct rank among its top ``kmax`` (``kmax`` when none is there).

    Exact inner-product search with faiss over L2-normalised rows, in query batches, so a
    million-row gallery never needs a full query x gallery matrix in memory; on the GPU when
    faiss sees one (``FEATCACHE_FAISS_DEVICE=cpu`` forces the CPU). The gallery is normalised
    and indexed ``block`` rows at a time and the per-block top ``kmax`` merged, so beyond the
    caller's gallery the memory is two blocks, not two more copies of the whole gallery.
    """
    if len(query) != len(positives):
        raise ValueError("positives needs one set per query row")
    query = normalise(query)
    kmax = min(kmax, len(gallery))
    top = _top(query, gallery, kmax, block, batch)
    ranks = np.empty(len(query), dtype=np.int64)
    for s in range(0, len(query), batch):
        ranks[s:s + batch] = _first_ranks(top[s:s + batch], positives, s)
    return ranks


def _top(query: np.ndarray, gallery: np.ndarray, kmax: int, block: int, batch: int) -> np.ndarray:
    """Gallery rows (n_query, kmax) by descending cosine, exact, merged over gallery blocks.

    Each gallery block is normalised and indexed once, and every query batch searched against
    it; only the (n_query, kmax) heap stays between blocks.
    """
    heap = faiss.ResultHeap(len(query), kmax, keep_max=True) if len(gallery) > block else None
    for start in range(0, len(gallery), block):
        part = normalise(gallery[start:start + block])
        k = min(kmax, len(part))
        index = flat_ip(part, k=k)
        found = [index.search(query[s:s + batch], k) for s in range(0, len(query), batch)]
        d, i = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
        if heap is None:  # one block: the plain search
            return i
        heap.add_result(np.ascontiguousarray(d), np.ascontiguousarray(np.where(i >= 0, i + start, -1)))
    heap.finalize()
    return heap.I


def retrieval_recall(query: np.ndarray, gallery: np.ndarray, positives: Sequence[set[int]],
                     ks: Sequence[int] = (1, 5, 10), batch: int = 8192) -> dict[int, float]:
    """Recall@K: the share of queries with at least one correct gallery row in their top K."""
    return _recall(retrieval_ranks(query, gallery, positives, max(ks), batch), ks)


def retrieval_recall_full(query: np.ndarray, gallery: np.ndarray, positives: Sequence[set[int]],
                          ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """The same metric from the full similarity matrix and a full sort: the reference path."""
    sims = normalise(query) @ normalise(gallery).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, : max(ks)]
    return _recall(_first_ranks(top, positives, 0), ks)


def zero_shot(image_emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray) -> dict[str, float]:
    """Top-1, top-5 (with at least 5 classes) and mean per-class recall of cosine classification."""
    sims = normalise(image_emb) @ normalise(class_emb).T
    order = np.argsort(-sims, axis=1, kind="stable")
    labels = np.asarray(labels)
    top1 = order[:, 0] == labels
    out = {"top1": float(top1.mean())}
    if class_emb.shape[0] >= 5:
        out["top5"] = float((order[:, :5] == labels[:, None]).any(1).mean())
    present = np.unique(labels)
    out["mean_per_class_recall"] = float(np.mean([top1[labels == c].mean() for c in present]))
    return out


def class_embeddings(prompt_emb: np.ndarray, prompt_class: np.ndarray, n_classes: int) -> np.ndarray:
    """Per class: normalise each template embedding, average, normalise again."""
    e = normalise(prompt_emb)
    out = np.stack([e[prompt_class == c].mean(0) for c in range(n_classes)])
    return normalise(out)
