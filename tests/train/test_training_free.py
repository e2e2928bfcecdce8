"""CCA against its definition in float64, and ASIF's relative representation by hand."""

import numpy as np
import pytest
import torch

from featcache.pipeline.train.heads import RelativeMap
from featcache.pipeline.train.training_free import cca


def test_cca_matches_the_definition():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 3))
    x = np.hstack([z, rng.normal(size=(400, 5))]) @ rng.normal(size=(8, 8))
    y = np.hstack([z + 0.3 * rng.normal(size=(400, 3)), rng.normal(size=(400, 3))]) @ rng.normal(size=(6, 6))
    mx, my, a, b, rho = cca(x, y, dims=6, ridge=0.0)
    # the canonical correlations: square roots of the eigenvalues of Sxx^-1 Sxy Syy^-1 Syx
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    eig = np.sort(np.linalg.eigvals(np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)).real)[::-1]
    assert rho == pytest.approx(np.sqrt(np.clip(eig[:6], 0, None)), abs=1e-8)
    assert rho[:3].min() > 0.8 > rho[3:].max()  # three shared directions were planted
    # the projections: unit variance, uncorrelated within a side, paired correlations equal rho
    u, v = (x - mx) @ a, (y - my) @ b
    n = len(x) - 1
    assert u.T @ u / n == pytest.approx(np.eye(6), abs=1e-8)
    assert v.T @ v / n == pytest.approx(np.eye(6), abs=1e-8)
    assert u.T @ v / n == pytest.approx(np.diag(rho), abs=1e-8)


def test_cca_matches_cca_zoo_up_to_sign():
    """The authors' own CCA dependency gives the same correlations and projections (up to sign
    and per-component scale, which each library normalises its own way)."""
    linear = pytest.importorskip("cca_zoo.linear", reason="cca-zoo is in the test extra")
    rng = np.random.default_rng(3)
    z = rng.normal(size=(500, 3))
    x = np.hstack([z, rng.normal(size=(500, 6))]) @ rng.normal(size=(9, 9))
    y = np.hstack([z + 0.5 * rng.normal(size=(500, 3)), rng.normal(size=(500, 4))]) @ rng.normal(size=(7, 7))
    mx, my, a, b, rho = cca(x, y, dims=5, ridge=0.0)
    zoo = linear.CCA(n_components=5).fit([x, y])
    zu, zv = zoo.transform([x, y])
    zoo_rho = np.array([np.corrcoef(zu[:, i], zv[:, i])[0, 1] for i in range(5)])
    assert rho == pytest.approx(zoo_rho, abs=1e-6)
    unit = lambda m: (m - m.mean(0)) / m.std(0)
    for ours, theirs in (((x - mx) @ a, zu), ((y - my) @ b, zv)):
        sign = np.sign(np.sum(unit(ours) * unit(theirs), axis=0))
        assert unit(ours) * sign == pytest.approx(unit(theirs), abs=1e-6)


def test_asif_keeps_the_top_k_similarities_raised_to_p():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    head = RelativeMap(anchors, torch.tensor(2), torch.tensor(3.0))
    out = head(torch.tensor([[2.0, 0.0]]))
    unit = torch.nn.functional.normalize(anchors, dim=-1)
    sims = unit @ torch.tensor([1.0, 0.0])
    want = torch.zeros(4)
    top = sims.topk(2)
    want[top.indices] = top.values ** 3
    assert torch.allclose(out[0], want)
