"""Every alignment metric against a float64 transcription of ../shared/method.md (the PRH code)."""

import math

import numpy as np
import pytest
from transcriptions import ref_structure

from featcache.pipeline.select.metrics import METRICS, alignment_score, k_for
from featcache.pipeline.select.table import score_table


def pair(seed, n=60, d=12):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    b = a @ rng.normal(size=(d, 9)) + 0.7 * rng.normal(size=(n, 9))  # partly shared structure
    return a, b


def neighbours(x, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :k]


def ref_cycle(a, b, k):
    na, nb = neighbours(a, k), neighbours(b, k)
    return np.mean([i in set(na[nb[i]].ravel()) for i in range(len(a))])


def ref_lcs(a, b, k):
    def lcs(x, y):
        dp = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
        for i in range(1, len(x) + 1):
            for j in range(1, len(y) + 1):
                dp[i][j] = dp[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(dp[i - 1][j], dp[i][j - 1])
        return dp[-1][-1]

    na, nb = neighbours(a, k), neighbours(b, k)
    return np.mean([lcs(list(x), list(y)) for x, y in zip(na, nb)])


def hsic_unbiased(K, L):  # Song et al. 2012, eq. 5, as the PRH code writes it
    m = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    return ((K * L.T).sum() + K.sum() * L.sum() / ((m - 1) * (m - 2)) - 2 * (K @ L).sum() / (m - 2)) / (m * (m - 3))


def ref_cknna(a, b, k):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    K, L, n = a @ a.T, b @ b.T, len(a)

    def sim(K, L):
        mask = np.zeros((n, n))
        mk, ml = np.zeros((n, n)), np.zeros((n, n))
        for M, S in ((mk, K), (ml, L)):
            s = S.copy()
            np.fill_diagonal(s, -np.inf)
            np.put_along_axis(M, np.argsort(-s, axis=1)[:, :k], 1.0, axis=1)
        mask = mk * ml
        return hsic_unbiased(mask * K, mask * L)

    return sim(K, L) / (math.sqrt(sim(K, K) * sim(L, L)) + 1e-6)


def ref_unbiased_cka(a, b):
    K, L = a @ a.T, b @ b.T
    return hsic_unbiased(K, L) / (math.sqrt(hsic_unbiased(K, K) * hsic_unbiased(L, L)) + 1e-6)


def ref_svcca(a, b, keep=0.99, dims=10):
    def reduce(x):
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        r = int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), keep) + 1)
        return u[:, :r] * s[:r]

    ra, rb = reduce(a), reduce(b)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    saa, sbb, sab = ra.T @ ra, rb.T @ rb, ra.T @ rb

    def inv_sqrt(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(w ** -0.5) @ v.T

    rho = np.linalg.svd(inv_sqrt(saa) @ sab @ inv_sqrt(sbb), compute_uv=False)
    return float(np.mean(rho[:dims]))


@pytest.mark.parametrize("seed,k", [(0, 4), (1, 9)])
def test_neighbour_metrics_are_exact(seed, k):
    a, b = pair(seed)
    assert alignment_score(a, b, "cycle_knn", k) == ref_cycle(a, b, k)
    assert alignment_score(a, b, "lcs_knn", k) == ref_lcs(a, b, k)
    assert alignment_score(a, a, "lcs_knn", k) == k  # identical lists: the whole list is common


@pytest.mark.parametrize("seed,k", [(2, 5), (3, 12)])
def test_cknna_matches_the_dense_reference(seed, k):
    a, b = pair(seed)
    assert alignment_score(a, b, "cknna", k) == pytest.approx(ref_cknna(a, b, k), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", [4, 5])
def test_kernel_and_subspace_metrics(seed):
    a, b = pair(seed, n=80)
    assert alignment_score(a, b, "unbiased_cka") == pytest.approx(ref_unbiased_cka(a, b), abs=1e-6)
    assert alignment_score(a, b, "svcca") == pytest.approx(ref_svcca(a, b), abs=1e-6)
    assert alignment_score(a, a, "unbiased_cka") == pytest.approx(1.0, abs=1e-5)


def test_hcs_is_exp_minus_structure():
    a, b = pair(6, n=40)
    want = math.exp(-ref_structure(a, b, 0.05, 3, "inverse", "reference"))
    assert alignment_score(a, b, "hcs") == pytest.approx(want, rel=1e-5)
    assert alignment_score(a, a, "hcs") == pytest.approx(1.0, abs=1e-6)


def test_k_rules():
    assert [k_for(5000, None, r) for r in ("rice", "sqrt", "sturges")] == [35, 71, 14]
    assert k_for(5000, 7, "rice") == 7 and k_for(10, 50) == 9


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_table_equals_per_pair_scores_for_every_metric(metric):
    rng = np.random.default_rng(8)
    img = {f"block.{i:02d}": rng.normal(size=(40, 10)).astype(np.float32) for i in range(2)}
    txt = {f"block.{i:02d}": rng.normal(size=(40, 6)).astype(np.float32) for i in range(2)}
    table = score_table(img, txt, metric=metric, k_rule="sqrt")
    for i, a in enumerate(img):
        for j, b in enumerate(txt):
            assert table.scores[i][j] == pytest.approx(alignment_score(img[a], txt[b], metric, k_rule="sqrt"),
                                                       rel=1e-9, abs=1e-12)


def test_hcs_released_equals_a_transcription_and_tends_to_zero():
    """The released AlignmentMetrics.hcs, transcribed in float64 numpy: normalise, subtract the raw
    mean, row softmax, L powers, textbook JS summed over all n^2 entries, 1/l weights, mean over L."""
    from featcache.pipeline.select.metrics import hcs, hcs_released

    def reference(a, b, levels=3, tau=0.05, eps=1e-8):
        def walk(x):
            xn = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps) - x.mean(0, keepdims=True)
            s = xn @ xn.T / tau
            e = np.exp(s - s.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

        pa, pb = walk(a), walk(b)
        total, qa, qb = 0.0, pa, pb
        for level in range(1, levels + 1):
            if level > 1:
                qa, qb = qa @ pa, qb @ pb
            m = 0.5 * (qa + qb) + eps
            total += 0.5 * ((qb * np.log(qb / m)).sum() + (qa * np.log(qa / m)).sum()) / level
        return float(np.exp(-total / levels))

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 6))
    assert hcs_released(a, b) == pytest.approx(reference(a, b), rel=1e-9)
    big_a, big_b = rng.normal(size=(300, 8)), rng.normal(size=(300, 6))
    assert hcs_released(big_a, big_b) < 1e-10 < 0.1 < hcs(big_a, big_b) <= 1.0  # summed over n^2: vanishes with n
