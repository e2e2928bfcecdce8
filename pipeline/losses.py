"""The contrastive loss and the STRUCTURE regularizer, as ../shared/method.md states them."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

COMPILE = ("auto", "on", "off")


def compile_wanted(mode: str, device: torch.device) -> bool:
    """``auto`` compiles on CUDA only: on a CPU the compile time (about 45 s) outweighs its gain
    (about 1.2x on R_S at batch 2,048; docs/benchmarks.md)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def maybe_compile(fn, enabled: bool):
    """``fn`` through torch.compile when ``enabled``; the first call checks the compiled function
    forward and backward on its own arguments, and any failure there (no C++ compiler, an
    unsupported op) warns once and keeps the eager ``fn``, so training never depends on it."""
    if not enabled:
        return fn
    chosen = []

    def call(*args, **kwargs):
        if not chosen:
            chosen.append(_checked_compile(fn, args, kwargs))
        return chosen[0](*args, **kwargs)

    return call


def _checked_compile(fn, args, kwargs):
    try:
        compiled = torch.compile(fn, dynamic=True)
        out = [t for t in tree_leaves(compiled(*args, **kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        if out and inputs:  # compile the backward now, not in the middle of a run
            torch.autograd.grad(sum(t.sum() for t in out), inputs, allow_unused=True)
        return compiled
    except Exception as err:  # the compiler stack raises many types
        warnings.warn(f"torch.compile is not usable here ({type(err).__name__}: {str(err)[:200]}); "
                      "running eagerly", RuntimeWarning, stacklevel=3)
        return fn



def clip_loss(u: torch.Tensor, v: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs (u_i, v_i); inputs are L2-normalised here."""
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    logits = u @ v.T / temperature
    target = torch.arange(len(u), device=u.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


_LOG2 = math.log(2.0)
_LOG_EPS = math.log(1e-12)  # method.md's eps inside the logs, kept in log space: log(a + eps)


def _log_eps(log_a: torch.Tensor) -> torch.Tensor:
    """log(a + eps) from log a: logaddexp with log eps, so no probability underflows to log 0."""
    return torch.logaddexp(log_a, torch.tensor(_LOG_EPS, dtype=log_a.dtype, device=log_a.device))


CENTERINGS = ("none", "mean", "standard")
_STD_FLOOR = 1e-6
SIMILARITIES = ("cosine", "rbf", "spearman")


def _center(x: torch.Tensor, centering: str) -> torch.Tensor:
    if centering == "mean":
        return x - x.mean(0, keepdim=True)
    if centering == "standard":  # the released code's: unbiased std per dimension
        # A dimension constant over the batch (MiniLM's block.05 has one on Tux Paint) would be
        # 0/0 = NaN there; the floor leaves it at (about) zero, and changes nothing where std > 1e-6.
        return (x - x.mean(0, keepdim=True)) / x.std(0, keepdim=True).clamp_min(_STD_FLOOR)
    return x


def _walk(features: torch.Tensor, temperature: float, centering: str = "mean", center_first: bool = False,
          similarity: str = "cosine", gamma: float = 1.0) -> torch.Tensor:
    """Row log-softmax of the batch similarity matrix: log-probabilities of one random-walk step."""
    x = features.float()
    if center_first:
        x = _center(x, centering)
    x = F.normalize(x, dim=-1)
    if not center_first:
        x = _center(x, centering)
    if similarity == "rbf":  # exp(-gamma ||x_i - x_j||^2), no temperature
        s = torch.exp(-gamma * torch.cdist(x, x, p=2).pow(2))
    elif similarity == "spearman":  # hard ranks: no gradient reaches the head through this branch
        ranks = F.normalize(x.argsort(dim=-1).argsort(dim=-1).float(), dim=-1)
        s = ranks @ ranks.T / temperature
    else:
        s = x @ x.T / temperature
    return torch.log_softmax(s, dim=-1)


def structure_regularizer(
    x: torch.Tensor,
    z: torch.Tensor,
    temperature: float,
    levels: int = 1,
    weighting: str = "none",
    divergence: str = "reference",
    centering: str = "mean",
    center_first: bool = False,
    similarity: str = "cosine",
    gamma: float = 1.0,
    margin: float = 0.0,
) -> torch.Tensor:
    """R_S between frozen inputs ``x`` (B, d_in) and head outputs ``z`` (B, d_out), in float32.

    ``divergence="reference"`` is the released code's 1/2 [KL(M||Q) + KL(M||P)];
    ``"js"`` the textbook 1/2 [KL(P||M) + KL(Q||M)]. ``weighting`` is "none" (w_l = 1) or
    "inverse" (w_l = 1/l). The released code's ablation switches: ``centering``
    none|mean|standard, applied after the L2 normalisation or, with ``center_first``, before
    it; ``similarity`` cosine|rbf (with ``gamma``)|spearman; ``margin``: D_l <- max(0, D_l - margin).
    """
    if levels < 1:
        raise ValueError("levels must be >= 1")
    if weighting not in ("none", "inverse"):
        raise ValueError(f"weighting must be 'none' or 'inverse', got {weighting!r}")
    if divergence not in ("reference", "js"):
        raise ValueError(f"divergence must be 'reference' or 'js', got {divergence!r}")
    if centering not in CENTERINGS or similarity not in SIMILARITIES:
        raise ValueError(f"centering must be one of {CENTERINGS} and similarity one of {SIMILARITIES}")
    walk = dict(temperature=temperature, centering=centering, center_first=center_first, similarity=similarity,
                gamma=gamma)
    # In log space: log-softmax, log M by logaddexp, no log(p + eps). Higher levels multiply
    # probabilities (a matrix power has no cheap log form) and take one clamped log.
    with torch.autocast(device_type=z.device.type, enabled=False):
        log_p, log_q = _walk(x.detach(), **walk), _walk(z, **walk)
        p, q = log_p.exp(), log_q.exp()
        p_l, q_l, log_p_l, log_q_l = p, q, log_p, log_q
        tiny = torch.finfo(torch.float32).tiny
        total = z.new_zeros((), dtype=torch.float32)
        for level in range(1, levels + 1):
            if level > 1:
                p_l, q_l = p_l @ p, q_l @ q
                log_p_l, log_q_l = p_l.clamp_min(tiny).log(), q_l.clamp_min(tiny).log()
            log_m = torch.logaddexp(log_p_l, log_q_l) - _LOG2
            lm, lp, lq = _log_eps(log_m), _log_eps(log_p_l), _log_eps(log_q_l)  # each once, all KLs share
            if divergence == "reference":  # (KL(M||Q) + KL(M||P)) / 2, one pass over the B x B entries
                d = (log_m.exp() * (2 * lm - lq - lp)).sum(-1).mean() / 2
            else:  # (KL(P||M) + KL(Q||M)) / 2
                d = (p_l * (lp - lm) + q_l * (lq - lm)).sum(-1).mean() / 2
            if margin:
                d = torch.relu(d - margin)
            total = total + (1.0 / level if weighting == "inverse" else 1.0) * d
        return total / levels


def lambda_at(step: int, lam: float, warmup_steps: int) -> float:
    """lambda(t): linear ramp from 0 to ``lam`` over the first ``warmup_steps`` optimiser steps."""
    if warmup_steps <= 0:
        return lam
    return lam * min(1.0, step / warmup_steps)
