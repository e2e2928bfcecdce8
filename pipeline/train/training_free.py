"""Training-free alignment methods, fitted on cached training pairs and saved as runs.

- ``procrustes``: orthogonal Procrustes from image to text features (least squares when the
  widths differ); the text side is left as it is.
- ``csa``: canonical similarity analysis (Li et al., ICLR 2025) as the STRUCTURE authors run
  it: centre each modality on its training mean, fit linear CCA to ``sim_dim`` dimensions,
  compare the L2-normalised projections by cosine.
- ``csa+structure``: the authors' refinement: after the CCA fit, Adam on
  lambda_rs R_S + lambda_cca (-(sum_i z_img,i . z_txt,i) / k) for 10 epochs, then each
  projection whitened by its projected covariance (W <- W C^{-1/2}).
- ``asif``: relative representations (Norelli et al., NeurIPS 2023): similarities to the
  training pairs as anchors, top-k kept and raised to a power.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.arrays import normalise
from featcache.pipeline.common.losses import structure_regularizer
from featcache.pipeline.train.heads import AffineMap, RelativeMap

METHODS = ("procrustes", "csa", "csa+structure", "asif")


@dataclass
class FreeConfig:
    """Options of the training-free methods (defaults: the authors' configs and the ASIF paper)."""

    sim_dim: int = 512  # CCA dimensions (at most the smaller width)
    ridge: float = 1e-4  # added to each covariance's diagonal, relative to its mean eigenvalue
    refine_epochs: int = 10
    refine_lr: float = 5e-4
    refine_batch: int = 4096
    lambda_rs: float = 10.0
    lambda_cca: float = 1e-2
    refine_temperature: float = 0.2
    refine_levels: int = 1
    asif_k: int = 800
    asif_power: float = 8.0


def _inv_sqrt(cov: np.ndarray, ridge: float) -> np.ndarray:
    cov = cov + ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
    w, v = np.linalg.eigh(cov)
    return (v / np.sqrt(np.maximum(w, 1e-12))) @ v.T


def cca(x: np.ndarray, y: np.ndarray, dims: int, ridge: float = 1e-4):
    """Linear CCA in float64: (means, projections A, B, canonical correlations), both sides centred.

    Whiten each side, then the SVD of the whitened cross-covariance gives the canonical pairs.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    n = len(x) - 1
    wx, wy = _inv_sqrt(xc.T @ xc / n, ridge), _inv_sqrt(yc.T @ yc / n, ridge)
    u, rho, vt = np.linalg.svd(wx @ (xc.T @ yc / n) @ wy)
    dims = min(dims, len(rho))
    return mx, my, wx @ u[:, :dims], wy @ vt[:dims].T, rho[:dims]


def _refine(xi, xt, a, b, cfg: FreeConfig, seed: int):
    """CSA + R_S: Adam on both projections, then whitening by the projected covariance."""
    gen = torch.Generator().manual_seed(seed)
    xi, xt = torch.from_numpy(xi).float(), torch.from_numpy(xt).float()
    a = torch.nn.Parameter(torch.from_numpy(a).float())
    b = torch.nn.Parameter(torch.from_numpy(b).float())
    opt = torch.optim.Adam([a, b], lr=cfg.refine_lr)
    k = a.shape[1]
    for _ in range(cfg.refine_epochs):
        order = torch.randperm(len(xi), generator=gen)
        for s in range(0, len(xi), cfg.refine_batch):
            idx = order[s:s + cfg.refine_batch]
            if len(idx) < 2:
                continue
            zi, zt = xi[idx] @ a, xt[idx] @ b
            rs = (structure_regularizer(xi[idx], zi, cfg.refine_temperature, cfg.refine_levels, "inverse")
                  + structure_regularizer(xt[idx], zt, cfg.refine_temperature, cfg.refine_levels, "inverse")) / 2
            corr = -(zi * zt).sum() / k
            loss = cfg.lambda_rs * rs + cfg.lambda_cca * corr
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = []
    for w, x in ((a, xi), (b, xt)):
        w = w.detach().double().numpy()
        z = x.double().numpy() @ w
        out.append(w @ _inv_sqrt(np.cov(z, rowvar=False), 0.0))
    return out


def procrustes(xi: np.ndarray, xt: np.ndarray) -> tuple[np.ndarray, str]:
    """A map W from unit image rows to unit text rows: orthogonal Procrustes when the widths
    match, least squares otherwise."""
    x, y = normalise(xi).astype(np.float64), normalise(xt).astype(np.float64)
    if x.shape[1] == y.shape[1]:
        u, _, vt = np.linalg.svd(x.T @ y)
        return u @ vt, "procrustes"
    return np.linalg.lstsq(x, y, rcond=None)[0], "least-squares"


def solve_maps(method: str, xi: np.ndarray, xt: np.ndarray, cfg: FreeConfig, seed: int = 0):
    """Fit ``method`` on paired training features; returns (image map, text map, facts to record)."""
    if method not in METHODS:
        raise FeatcacheError(f"unknown method {method!r}", f"choose heads or one of: {', '.join(METHODS)}")
    d_i, d_t = xi.shape[1], xt.shape[1]
    if method == "procrustes":
        w, kind = procrustes(xi, xt)
        image = AffineMap(torch.zeros(d_i), torch.from_numpy(w).float(), unit=True)
        return image, AffineMap(torch.zeros(d_t), torch.eye(d_t), unit=True), {"fit": kind}
    if method == "asif":
        k = int(min(cfg.asif_k, len(xi)))
        image = RelativeMap(torch.from_numpy(np.ascontiguousarray(xi)), torch.tensor(k), torch.tensor(cfg.asif_power))
        text = RelativeMap(torch.from_numpy(np.ascontiguousarray(xt)), torch.tensor(k), torch.tensor(cfg.asif_power))
        return image, text, {"anchors": len(xi), "k": k, "power": cfg.asif_power}
    dims = min(cfg.sim_dim, d_i, d_t, len(xi) - 1)
    mx, my, a, b, rho = cca(xi, xt, dims, cfg.ridge)
    facts = {"sim_dim": int(dims), "canonical_correlations": [float(r) for r in rho[:10]]}
    if method == "csa+structure":
        a, b = _refine((xi - mx).astype(np.float32), (xt - my).astype(np.float32), a, b, cfg, seed)
    to_t = lambda v: torch.from_numpy(np.asarray(v, dtype=np.float32))
    return AffineMap(to_t(mx), to_t(a)), AffineMap(to_t(my), to_t(b)), facts
