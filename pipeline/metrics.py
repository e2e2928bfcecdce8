"""Retrieval recall and zero-shot accuracy, as ../shared/method.md defines them."""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _hits(top: np.ndarray, positives: Sequence[set[int]], offset: int, ks: Sequence[int]) -> np.ndarray:
    """hits[q, i] = 1 when query q has a correct item among its top ks[i]."""
    out = np.zeros((len(top), len(ks)), dtype=bool)
    for q, row in enumerate(top):
        pos = positives[offset + q]
        rank = next((r for r, item in enumerate(row) if item in pos), None)
        if rank is not None:
            out[q] = [rank < k for k in ks]
    return out


def retrieval_recall(query: np.ndarray, gallery: np.ndarray, positives: Sequence[set[int]],
                     ks: Sequence[int] = (1, 5, 10), batch: int = 8192) -> dict[int, float]:
    """Recall@K: the share of queries with at least one correct gallery row in their top K.

    Exact inner-product search with faiss over L2-normalised rows, in query batches, so a
    million-row gallery never needs a full query x gallery matrix in memory.
    """
    if len(query) != len(positives):
        raise ValueError("positives needs one set per query row")
    query, gallery = normalise(query), normalise(gallery)
    kmax = min(max(ks), len(gallery))
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    hits = np.zeros((len(query), len(ks)), dtype=bool)
    for s in range(0, len(query), batch):
        _, top = index.search(query[s:s + batch], kmax)
        hits[s:s + batch] = _hits(top, positives, s, ks)
    return {int(k): float(hits[:, i].mean()) for i, k in enumerate(ks)}


def retrieval_recall_full(query: np.ndarray, gallery: np.ndarray, positives: Sequence[set[int]],
                          ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """The same metric from the full similarity matrix and a full sort: the reference path."""
    sims = normalise(query) @ normalise(gallery).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, : max(ks)]
    hits = _hits(top, positives, 0, ks)
    return {int(k): float(hits[:, i].mean()) for i, k in enumerate(ks)}


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
