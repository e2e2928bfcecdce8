"""The torch exact search against faiss-cpu, and which search ``auto`` chooses."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common import device as faiss_device
from featcache.pipeline.common import torch_knn
from featcache.pipeline.common.arrays import normalise
from featcache.pipeline.common.torch_knn import TorchFlatIP


def _faiss_cpu(x: np.ndarray, q: np.ndarray, k: int):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)


def _agree_ties_aside(x, q, d_ref, i_ref, d, i, tol=1e-5) -> float:
    """The share of neighbours found by both (as sets per row), after checking that both lists
    are exact: each holds neighbours whose float64 scores are the true top k, to ``tol`` (which
    of two near-tied rows comes first, or last in, is the summation order's choice)."""
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=tol)
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    k = i.shape[1]
    top = -np.sort(-exact, axis=1)[:, :k]
    for found in (i, i_ref):
        np.testing.assert_allclose(np.take_along_axis(exact, found, axis=1), top, rtol=0, atol=tol)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(i, i_ref)]))


@pytest.mark.parametrize("n, d, k, gallery_block, score_bytes", [
    (2000, 48, 10, 1 << 16, 1 << 27),  # one block each way
    (2000, 48, 75, 300, 40_000),  # many gallery and query blocks: the running top-k merge
])
def test_torch_search_equals_faiss_cpu_ties_aside(monkeypatch, n, d, k, gallery_block, score_bytes):
    monkeypatch.setattr(torch_knn, "GALLERY_BLOCK", gallery_block)
    monkeypatch.setattr(torch_knn, "SCORE_BYTES", {"cpu": score_bytes, "cuda": score_bytes})
    rng = np.random.default_rng(1)
    x = normalise(rng.normal(size=(n, d)).astype(np.float32))
    q = np.ascontiguousarray(x[rng.choice(n, 500, replace=False)])
    index = TorchFlatIP(d, torch.device("cpu"))
    index.add(x[:1234])
    index.add(x[1234:])  # added in two parts, as faiss allows
    assert index.ntotal == n
    d_ref, i_ref = _faiss_cpu(x, q, k)
    got_d, got_i = index.search(q, k)
    assert got_i.dtype == np.int64 and got_d.dtype == np.float32
    assert _agree_ties_aside(x, q, d_ref, i_ref, got_d, got_i) >= 0.999


def test_exact_ties_and_more_neighbours_than_rows():
    x = np.repeat(normalise(np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)), 2, axis=0)
    index = TorchFlatIP(8, torch.device("cpu"))
    index.add(x)
    d, i = index.search(x, 12)
    d_ref, i_ref = _faiss_cpu(x, x, 10)
    np.testing.assert_allclose(d[:, :10], d_ref, atol=1e-6)
    assert [set(r[:2]) for r in i] == [{2 * (j // 2), 2 * (j // 2) + 1} for j in range(10)]  # a row and its twin
    assert (i[:, 10:] == -1).all() and np.isneginf(d[:, 10:]).all()  # padded as faiss pads


def test_flat_ip_goes_through_torch_when_asked(monkeypatch):
    x = normalise(np.random.default_rng(3).normal(size=(300, 16)).astype(np.float32))
    monkeypatch.setenv("FEATCACHE_FAISS_DEVICE", "torch")
    index = faiss_device.flat_ip(x, k=5)
    assert isinstance(index, TorchFlatIP)
    d_ref, i_ref = _faiss_cpu(x, x, 5)
    d, i = index.search(x, 5)
    assert _agree_ties_aside(x, x, d_ref, i_ref, d, i) >= 0.999
    assert isinstance(faiss_device.flat_ip(x, "cpu", 5), faiss.IndexFlatIP)  # a caller's device wins


def test_auto_takes_torch_when_torch_sees_cuda_and_faiss_no_gpu(monkeypatch):
    monkeypatch.delenv("FEATCACHE_FAISS_DEVICE", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert faiss_device.search_backend() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert faiss_device.search_backend() == "torch"
    assert faiss_device.search_backend("cpu") == "cpu" and not faiss_device.use_gpu()
    with pytest.raises(FeatcacheError, match="faiss sees no GPU"):
        faiss_device.search_backend("gpu")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    assert faiss_device.search_backend() == "gpu"  # faiss-gpu first where it is there
    assert faiss_device.search_backend(k=faiss_device.GPU_MAX_K + 1) == "torch"  # beyond its k
    monkeypatch.setenv("FEATCACHE_FAISS_DEVICE", "torch")
    assert faiss_device.search_backend() == "torch"
