"""Retrieval and zero-shot metrics against brute-force numpy references."""

import numpy as np
import pytest

from featcache.pipeline.evaluate.metrics import class_embeddings, retrieval_recall, retrieval_recall_full, zero_shot
from featcache.pipeline.evaluate.retrieval import retrieval_sets


def brute_recall(q, g, positives, ks):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = {}
    for k in ks:
        hits = []
        for i in range(len(q)):
            sims = g @ q[i]
            top = sorted(range(len(g)), key=lambda j: -sims[j])[:k]
            hits.append(any(j in positives[i] for j in top))
        out[k] = float(np.mean(hits))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_with_multiple_positives_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(60, 16)).astype(np.float32)
    source = rng.integers(0, 60, size=45)
    q = (g[source] + 1.0 * rng.normal(size=(45, 16))).astype(np.float32)
    # each query's own source row plus up to three random extra positives
    positives = [{int(s)} | set(rng.choice(60, size=int(rng.integers(0, 4)), replace=False).tolist()) for s in source]
    ks = (1, 5, 10)
    want = brute_recall(q, g, positives, ks)
    assert retrieval_recall(q, g, positives, ks) == pytest.approx(want)
    assert retrieval_recall_full(q, g, positives, ks) == pytest.approx(want)
    # chunked faiss path (small query batches) equals the full-matrix path
    assert retrieval_recall(q, g, positives, ks, batch=7) == retrieval_recall_full(q, g, positives, ks)
    assert 0 < want[1] < want[10] <= 1


def test_recall_perfect_and_k_larger_than_gallery():
    x = np.eye(4, dtype=np.float32)
    assert retrieval_recall(x, x, [{i} for i in range(4)], (1, 10)) == {1: 1.0, 10: 1.0}


def test_zero_shot_metrics():
    classes = np.eye(6, dtype=np.float32)
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 0])
    images = classes[[0, 1, 2, 3, 4, 0, 1, 0]]  # two of eight wrong
    m = zero_shot(images, labels, classes)
    assert m["top1"] == pytest.approx(6 / 8)
    assert m["mean_per_class_recall"] == pytest.approx(np.mean([2 / 3, 1, 1, 1, 1, 0]))
    assert m["top5"] >= m["top1"]


def test_class_embeddings_average_normalised_templates():
    prompts = np.array([[2.0, 0], [0, 1.0], [0, 3.0]], dtype=np.float32)
    emb = class_embeddings(prompts, np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(emb, [[np.sqrt(0.5), np.sqrt(0.5)], [0, 1]], atol=1e-6)


class FakeStore:
    """Just the fields retrieval_sets reads, for a hand-checkable example."""

    def __init__(self, ids, groups, texts=None, missing=None):
        self.ids, self.groups, self.texts = ids, groups, texts
        self.rows = len(ids)
        self.missing = np.zeros(len(ids), bool) if missing is None else np.asarray(missing)
        self.path = "fake"


def test_positive_rules_and_missing_images():
    images = FakeStore(["a", "b", "c"], ["a", "b", "c"], missing=[False, False, True])
    texts = FakeStore(["a#0", "a#1", "b#0", "c#0"], ["a", "a", "b", "c"], ["A flower.", "red", "a flower.", "x"])
    rows, caps, i2t, t2i = retrieval_sets(images, texts, "image")
    assert rows.tolist() == [0, 1] and caps.tolist() == [0, 1, 2]  # the missing image and its caption leave
    assert i2t == [{0, 1}, {2}] and t2i == [{0}, {0}, {1}]
    _, _, i2t, t2i = retrieval_sets(images, texts, "caption")
    assert i2t == [{0, 1, 2}, {0, 2}] and t2i == [{0, 1}, {0}, {0, 1}]
