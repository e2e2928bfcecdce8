"""Layer selection metrics against brute-force numpy."""

import numpy as np
import pytest

from featcache.pipeline.select.metrics import knn, linear_cka
from featcache.pipeline.select.table import mutual_knn, rice_k, score_table


def brute_mutual_knn(a, b, k):
    def neighbours(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row)[:k]) for row in s]

    na, nb = neighbours(a), neighbours(b)
    return float(np.mean([len(x & y) / k for x, y in zip(na, nb)]))


@pytest.mark.parametrize("seed,k", [(0, 3), (1, 10), (2, 25)])
def test_mutual_knn_equals_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(120, 16))
    b = a @ rng.normal(size=(16, 12)) + 0.5 * rng.normal(size=(120, 12))  # partly shared structure
    got = mutual_knn(a.astype(np.float32), b.astype(np.float32), k)
    assert got == pytest.approx(brute_mutual_knn(a, b, k), abs=1e-9)
    assert 0.0 < got < 1.0


def test_identical_spaces_score_one_and_self_is_excluded():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    assert mutual_knn(x, x, 5) == 1.0
    assert not (knn(x, 5) == np.arange(50)[:, None]).any()


def test_rice_rule():
    assert rice_k(5000) == 35
    assert rice_k(1000) == 20


def test_all_pairs_table_equals_per_pair_calls():
    rng = np.random.default_rng(3)
    img = {f"block.{i:02d}": rng.normal(size=(80, 10)).astype(np.float32) for i in range(3)}
    txt = {f"block.{i:02d}": rng.normal(size=(80, 7)).astype(np.float32) for i in range(2)}
    table = score_table(img, txt, k=6)
    for i, a in enumerate(img):
        for j, b in enumerate(txt):
            assert table.scores[i][j] == pytest.approx(mutual_knn(img[a], txt[b], 6), abs=1e-12)
    cka = score_table(img, txt, metric="cka")
    assert cka.scores[1][0] == pytest.approx(linear_cka(img["block.01"], txt["block.00"]))


def test_calibrated_score_removes_chance_level():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(200, 8)).astype(np.float32)
    raw = score_table({"a": a}, {"b": a.copy()}, k=10)
    cal = score_table({"a": a}, {"b": a.copy()}, k=10, calibrate=5)
    noise = score_table({"a": a}, {"b": rng.normal(size=(200, 8)).astype(np.float32)}, k=10, calibrate=5)
    assert raw.scores[0][0] == 1.0
    assert cal.scores[0][0] == pytest.approx(1.0 - 10 / 199, abs=0.03)  # minus chance overlap k/(n-1)
    assert abs(noise.scores[0][0]) < 0.03


def test_constant_layers_score_nan_per_modality():
    rng = np.random.default_rng(5)
    img = {"embed": np.ones((40, 4), np.float32), "block.00": rng.normal(size=(40, 4)).astype(np.float32)}
    txt = {"embed": rng.normal(size=(40, 4)).astype(np.float32)}  # same name, not constant
    table = score_table(img, txt, k=5)
    assert np.isnan(table.scores[0][0]) and np.isfinite(table.scores[1][0])
    assert table.best() == ("block.00", "embed")


def test_the_table_estimate_grows_as_the_metrics_do():
    from featcache.pipeline.select.table import table_bytes

    widths = [384] * 3
    hcs = [table_bytes("hcs", n, None, widths, widths) for n in (1000, 2000)]
    assert 3.5 < hcs[1] / hcs[0] < 4.1  # n x n walk matrices dominate
    knn_ = [table_bytes("mutual_knn", n, 20, widths, widths) for n in (10_000, 20_000)]
    assert 1.9 < knn_[1] / knn_[0] < 2.1  # linear in n at a fixed k
    assert table_bytes("mutual_knn", 50_000, 74, widths, widths, queries=5000) < knn_[1] * 3  # queries cut it
    assert table_bytes("lcs_knn", 5000, 1000, widths, widths) > 19 * 2**30  # (k+1)^2 int32 per row: 20.8 GB
    assert table_bytes("mutual_knn", 5000, 20, widths, widths, calibrate=10) > table_bytes(
        "mutual_knn", 5000, 20, widths, widths)


def test_a_table_that_cannot_fit_is_refused_before_any_layer_is_read(monkeypatch):
    from featcache.cache.errors import FeatcacheError
    from featcache.pipeline.common import device

    monkeypatch.setattr(device, "available_bytes", lambda dev: 64 * 2**20)  # 64 MiB left
    read = []

    class Feats(dict):
        def __getitem__(self, name):
            read.append(name)
            return super().__getitem__(name)

    rng = np.random.default_rng(0)
    img = Feats({"a": rng.standard_normal((3000, 64)).astype(np.float32)})
    txt = Feats({"b": rng.standard_normal((3000, 64)).astype(np.float32)})
    with pytest.raises(FeatcacheError, match=r"hcs layer table on 3,000 pairs \(--n\).*needs about") as err:
        score_table(img, txt, "hcs")
    assert "lower --n" in err.value.hint and "\n" not in err.value.message
    assert read == ["a", "b"]  # widths from shapes only: nothing scored
    assert score_table(img, txt, "mutual_knn").n == 3000  # a small table still fits 64 MiB
