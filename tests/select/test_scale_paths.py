"""The scale paths of stage two: query-row layer tables, row-subset reads, faiss device choice."""

from pathlib import Path

import faiss
import numpy as np
import pytest

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import CorruptChunk, FeatureStore
from featcache.pipeline.common import device as faiss_device
from featcache.pipeline.features import ConcatStore
from featcache.pipeline.select.metrics import Layer, edge_keys, knn, mutual_knn_score, prepare
from featcache.pipeline.select.table import score_table


def brute_neighbours(x, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_query_rows_get_the_neighbours_of_the_full_search():
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    rows = np.array([3, 50, 51, 299])
    assert np.array_equal(knn(x, 7, rows), knn(x, 7)[rows])
    assert np.array_equal(knn(x, 7, rows), brute_neighbours(x, 7)[rows])


def test_overlap_by_sorted_keys_equals_the_k_by_k_comparison():
    rng = np.random.default_rng(1)
    n, k = 200, 9
    a = np.stack([rng.choice(n, k, replace=False) for _ in range(n)])
    b = np.stack([rng.choice(n, k, replace=False) for _ in range(n)])
    b[:50] = a[:50][:, ::-1]  # some rows share every neighbour, in another order
    want = float((a[:, :, None] == b[:, None, :]).any(-1).sum(-1).mean() / k)
    got = mutual_knn_score(Layer(None, a, edge_keys(a, n)), Layer(None, b, edge_keys(b, n)))
    assert got == want and 0.25 < got < 1


def test_query_row_table_is_the_mean_over_those_rows():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(400, 6))
    img = {f"i{i}": (base @ rng.normal(size=(6, 10)) + i * rng.normal(size=(400, 10))).astype(np.float32)
           for i in range(1, 3)}
    txt = {"t": (base @ rng.normal(size=(6, 8)) + rng.normal(size=(400, 8))).astype(np.float32)}
    full = score_table(img, txt, k=8)
    sub = score_table(img, txt, k=8, queries=120)
    assert sub.queries == 120 and full.queries is None and sub.k == full.k
    rows = np.sort(np.random.default_rng([0, 1]).permutation(400)[:120])  # the table's seeded rows
    for i, name in enumerate(img):
        na, nb = brute_neighbours(img[name], 8)[rows], brute_neighbours(txt["t"], 8)[rows]
        want = np.mean([len(set(p) & set(q)) / 8 for p, q in zip(na, nb)])
        assert sub.scores[i][0] == pytest.approx(want, abs=1e-12)
        assert sub.scores[i][0] != full.scores[i][0]  # a subset mean, not the all-row mean
    assert score_table(img, txt, k=8, queries=400).scores == full.scores  # all rows: the exact table
    with pytest.raises(FeatcacheError):
        score_table(img, txt, metric="cknna", k=8, queries=100)
    with pytest.raises(FeatcacheError):
        score_table(img, txt, k=8, queries=100, calibrate=2)
    with pytest.raises(ValueError):
        mutual_knn_score(prepare(img["i1"], "mutual_knn", 8, rows), prepare(txt["t"], "mutual_knn", 8))


def _store(path: Path, rows=100, width=6, chunk_rows=16, seed=3) -> tuple[FeatureStore, np.ndarray]:
    data = np.random.default_rng(seed).normal(size=(rows, width)).astype(np.float16)
    store = FeatureStore.create_or_open(path, identity={}, versions={}, ids=[str(i) for i in range(rows)],
                                        groups=["g"] * rows, texts=None, width=width, chunk_rows=chunk_rows)
    store.ensure_layers(["a"])
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        store.write_chunk(c, {"a": data[sl]}, np.zeros(sl.stop - sl.start, dtype=bool))
    return store, data


def test_read_rows_equals_a_whole_read_and_keeps_its_checks(tmp_path):
    store, data = _store(tmp_path / "s.zarr")
    rows = np.array([99, 0, 17, 17, 5, 64, 63])  # unsorted, repeated, across chunk edges
    got = store.read_rows("a", rows)
    assert got.dtype == np.float32 and np.array_equal(got, store.read("a")[rows])
    assert np.array_equal(got, data[rows].astype(np.float32))
    chunk = tmp_path / "s.zarr" / "layers" / "a" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunk, match="chunk 1 of a fails its checksum"):
        store.read_rows("a", np.array([20]))
    assert np.array_equal(store.read_rows("a", np.array([0, 40])), data[[0, 40]].astype(np.float32))
    (tmp_path / "s.zarr" / "layers" / "a" / "c" / "2" / "0").unlink()
    with pytest.raises(CorruptChunk, match="chunk 2 of a is marked done but its data is missing"):
        store.read_rows("a", np.array([0]))



def test_a_combined_source_reads_rows_part_by_part_as_its_whole_read_would(tmp_path):
    """ConcatStore.read_rows (a+b) maps each row to its part and reads that part chunk by chunk:
    equal to the whole read, in the order asked, across the boundary between parts."""
    a, data_a = _store(tmp_path / "a.zarr", rows=40)
    b, data_b = _store(tmp_path / "b.zarr", rows=25, seed=4)  # other values: a row read from the wrong part shows
    both = ConcatStore([a, b], ["a", "b"])
    rows = np.array([64, 0, 39, 40, 41, 39, 5, 40])  # both ends, the boundary, repeats, unsorted
    got = both.read_rows("a", rows)
    assert np.array_equal(got, both.read("a")[rows])
    assert np.array_equal(got, np.concatenate([data_a, data_b])[rows].astype(np.float32))
    assert both.read_rows("a", np.array([], dtype=np.int64)).shape == (0, 6)
    with pytest.raises(IndexError):
        both.read_rows("a", np.array([65]))
    assert both.parts == [a, b] and a.parts == [a] and both.content_sha256() is None


def test_read_rows_refuses_rows_outside_the_store_and_masks(tmp_path):
    """A negative row or one past the last chunk is an IndexError, not a chunk that 'does not
    match its seal' (which sent users to verify --repair on a sound store); a boolean mask,
    once read as rows 0 and 1, is refused; a 2-D array of rows reads as a whole read's [rows]."""
    a, _ = _store(tmp_path / "a.zarr", rows=40)
    b, _ = _store(tmp_path / "b.zarr", rows=25, seed=4)
    both = ConcatStore([a, b], ["a", "b"])
    for source in (a, both):
        for bad in ([-1], [source.rows], [0, 200]):
            with pytest.raises(IndexError, match=f"of {source.rows}"):
                source.read_rows("a", np.array(bad))
        with pytest.raises(TypeError, match="not a boolean mask"):
            source.read_rows("a", np.ones(source.rows, dtype=bool))
        grid = np.array([[39, 0], [source.rows - 1, 39]])
        assert np.array_equal(source.read_rows("a", grid), source.read("a")[grid])


# -- faiss device choice: GPU logic tested on CPU with a stand-in faiss GPU API ----------------
class FakeGpu:
    def __init__(self):
        self.moved = []

    def StandardGpuResources(self):
        return "resources"

    def index_cpu_to_gpu(self, res, dev, index):
        self.moved.append((res, dev))
        return index  # the CPU index stands in for the GPU one


@pytest.fixture()
def fake_gpu(monkeypatch):
    fake = FakeGpu()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", fake.StandardGpuResources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake.index_cpu_to_gpu, raising=False)
    monkeypatch.setattr(faiss_device, "_resources", None)
    monkeypatch.delenv("FEATCACHE_FAISS_DEVICE", raising=False)
    return fake


def test_auto_uses_the_gpu_index_when_faiss_sees_a_gpu(fake_gpu):
    x = np.random.default_rng(4).normal(size=(50, 8)).astype(np.float32)
    assert faiss_device.use_gpu() and faiss_device.use_gpu("gpu")
    want = knn(x, 5, device="cpu")
    assert fake_gpu.moved == []
    assert np.array_equal(knn(x, 5), want)  # auto: through the GPU branch
    assert fake_gpu.moved == [("resources", 0)]
    assert not faiss_device.use_gpu(k=faiss_device.GPU_MAX_K + 1)  # beyond the GPU's k: CPU


def test_cpu_is_the_fallback_and_can_be_forced(fake_gpu, monkeypatch):
    monkeypatch.setenv("FEATCACHE_FAISS_DEVICE", "cpu")
    assert not faiss_device.use_gpu()
    monkeypatch.setenv("FEATCACHE_FAISS_DEVICE", "tpu")
    with pytest.raises(FeatcacheError, match="unknown faiss device"):
        faiss_device.use_gpu()
    monkeypatch.delenv("FEATCACHE_FAISS_DEVICE")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert not faiss_device.use_gpu()
    with pytest.raises(FeatcacheError, match="faiss sees no GPU"):
        faiss_device.use_gpu("gpu")
    monkeypatch.delattr(faiss, "get_num_gpus")  # faiss-cpu builds without GPU symbols
    assert faiss_device.gpu_count() == 0 and not faiss_device.use_gpu()
    assert fake_gpu.moved == []


@pytest.mark.parametrize("block", [7, 64, 1 << 16])
def test_retrieval_over_gallery_blocks_equals_the_full_sort(block):
    from featcache.pipeline.evaluate.metrics import retrieval_ranks, retrieval_recall_full

    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(150, 16)).astype(np.float32)
    src = rng.integers(0, 150, size=40)
    query = gallery[src] + 1.5 * rng.normal(size=(40, 16)).astype(np.float32)
    positives = [{int(s), int(s + 1) % 150} for s in src]
    ranks = retrieval_ranks(query, gallery, positives, 10, batch=9, block=block)
    sims = query.astype(np.float64) @ (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).T.astype(np.float64)
    order = np.argsort(-sims, axis=1)[:, :10]
    want = [next((r for r, g in enumerate(row) if g in p), 10) for row, p in zip(order, positives)]
    assert ranks.tolist() == want and 0 < np.mean(ranks < 10) < 1
    assert {k: float((ranks < k).mean()) for k in (1, 5, 10)} == retrieval_recall_full(query, gallery, positives)


def test_require_finite_checks_every_block_of_a_float16_table():
    """Finiteness is checked block by block (no n x d float32 copy); a NaN in a late block counts."""
    from featcache.cache.errors import FeatcacheError
    from featcache.pipeline.common.arrays import require_finite

    class Store:
        path = "s.zarr"

    x = np.zeros((20_000, 4), dtype=np.float16)
    assert require_finite(x, Store(), "block.00") is x
    x[19_999, 3] = np.inf
    with pytest.raises(FeatcacheError, match="non-finite"):
        require_finite(x, Store(), "block.00")
