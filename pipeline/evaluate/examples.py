"""A seeded sample of retrieval queries with their top K both ways: what a gallery page shows.

Recall@K says how often the right item is near the top; looking at the queries says why it is
not (near-duplicate stamps, captions that fit several images). The sample is drawn by seed, so
two runs' pages show the same queries and can be compared side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.evaluate.reads import Reads
from featcache.pipeline.evaluate.retrieval import RetrievalConfig, RetrievalPairs, retrieval_pairs


@dataclass
class Hit:
    index: int  # into the gallery: image_rows (caption queries) or caption_rows (image queries)
    score: float  # cosine of the two embeddings
    correct: bool


@dataclass
class Query:
    index: int  # into the query side: caption_rows or image_rows
    hits: list[Hit]  # the top K, best first
    first_correct: int  # 0-based rank of the best-ranked correct item over the whole gallery
    correct: list[int]  # every correct gallery index, best-ranked first


@dataclass
class Examples:
    pairs: RetrievalPairs
    seed: int
    k: int
    text_to_image: list[Query]
    image_to_text: list[Query]


def sample(n_total: int, n: int, seed: int, direction: int) -> list[int]:
    """``n`` of ``n_total`` query indices, in order; each direction draws its own sample, so
    asking for more queries of one never changes the other's."""
    if n < 1:
        raise FeatcacheError(f"the number of example queries must be at least 1, got {n}")
    rng = np.random.default_rng([seed, direction])
    return sorted(int(i) for i in rng.choice(n_total, size=min(n, n_total), replace=False))


def ranked(query: np.ndarray, gallery: np.ndarray, index: int, positives: set[int], k: int) -> Query:
    """One query's full ranking. Exact ties (identical captions embed identically) are ordered
    by gallery position, as the metrics' reference path sorts; faiss may order them otherwise, so
    a rank here can differ from Recall@K's only within a tie."""
    order = np.argsort(-(gallery @ query), kind="stable")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    correct = sorted(positives, key=lambda g: position[g])
    hits = [Hit(int(g), float(gallery[g] @ query), int(g) in positives) for g in order[:k]]
    return Query(index, hits, int(position[correct[0]]) if correct else len(order), correct)


def retrieval_examples(cfg: RetrievalConfig, queries: int = 20, seed: int = 0, k: int = 5,
                       reads: Reads | None = None, run_dir=None) -> Examples:
    """``queries`` captions with their top ``k`` images, and ``queries`` images with their top
    ``k`` captions, under the run's heads and ``cfg``'s positive rule."""
    p = retrieval_pairs(cfg, reads, run_dir)
    t2i = [ranked(p.et[q], p.ei, q, p.t2i[q], k) for q in sample(len(p.caption_rows), queries, seed, 0)]
    i2t = [ranked(p.ei[q], p.et, q, p.i2t[q], k) for q in sample(len(p.image_rows), queries, seed, 1)]
    return Examples(p, seed, k, t2i, i2t)
