"""The contrastive loss and the STRUCTURE regularizer, as ../shared/method.md states them."""

from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

COMPILE = ("auto", "on", "off")


def compile_wanted(mode: str) -> bool:
    """Whether the whole loss goes through torch.compile: ``on`` only. Its first compile takes
    45 s on a CPU and 86 s on an H200 for a small further gain (docs/benchmarks.md)."""
    return mode == "on"


CORE_COMPILE_MIN_BATCH = 2048


def core_compiled(mode: str, batch: int) -> bool:
    """Whether R_S's elementwise core is compiled: under ``auto`` (the default) from batch 2,048
    up. Its compile takes 5-10 s once per process and saves about 0.25 s per B = 4,096 step on a
    CPU (docs/benchmarks.md); at Tux Paint's full batch of 559 it saves 1-2 ms, so it would never
    pay. ``on`` compiles all of R_S instead."""
    return mode == "auto" and batch >= CORE_COMPILE_MIN_BATCH


def maybe_compile(fn, enabled: bool, quiet: bool = False):
    """``fn`` through torch.compile when ``enabled``; the first call checks the compiled function
    forward and backward on its own arguments, and any failure there (no C++ compiler, an
    unsupported op) warns once (unless ``quiet``) and keeps the eager ``fn``, so training never
    depends on it."""
    if not enabled:
        return fn
    chosen = []

    def call(*args, **kwargs):
        if not chosen:
            chosen.append(_checked_compile(fn, args, kwargs, quiet))
        return chosen[0](*args, **kwargs)

    return call


def _checked_compile(fn, args, kwargs, quiet: bool = False):
    if quiet:  # inductor's C++ toolchain probe warns about CUDA_HOME on every CPU-only machine
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        compiled = torch.compile(fn, dynamic=True)
        out = [t for t in tree_leaves(compiled(*args, **kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        if out and inputs:  # compile the backward now, not in the middle of a run
            torch.autograd.grad(sum(t.sum() for t in out), inputs, allow_unused=True)
        return compiled
    except Exception as err:  # the compiler stack raises many types
        if quiet:
            return fn
        warnings.warn(f"torch.compile is not usable here ({type(err).__name__}: {str(err)[:200]}); "
                      "running eagerly", RuntimeWarning, stacklevel=3)
        return fn


def clip_loss(u: torch.Tensor, v: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs (u_i, v_i); inputs are L2-normalised here."""
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    inv_tau = 1.0 / temperature if torch.is_tensor(temperature) else u.new_tensor(1.0 / temperature)
    if torch.is_grad_enabled():
        return _ClipLoss.apply(u, v, inv_tau)[0]
    return _clip_parts(u @ v.mT, inv_tau, with_grad=False)[0]


def _clip_parts(s: torch.Tensor, inv_tau: torch.Tensor, with_grad: bool):
    """The loss from the cosine matrix ``s`` (row i: u_i against every v_j), and, when
    ``with_grad``, dL/d(logits) = (row softmax + column softmax - 2 I) / 2B in closed form plus
    dL/d(1/tau) = sum(dL/d(logits) * s). Cross-entropy through autograd keeps a log-softmax per
    direction and their gradients: about eight B x B matrices where this keeps one."""
    n = s.shape[-1]
    logits = s * inv_tau
    rows, cols = torch.logsumexp(logits, -1), torch.logsumexp(logits, -2)
    diag = logits.diagonal(dim1=-2, dim2=-1)
    loss = ((rows - diag).mean(-1) + (cols - diag).mean(-1)) / 2
    if not with_grad:
        return loss, None, None
    g = torch.sub(logits, rows.unsqueeze(-1)).exp_()
    g.add_(logits.sub_(cols.unsqueeze(-2)).exp_()).div_(2 * n)
    g.diagonal(dim1=-2, dim2=-1).sub_(1.0 / n)
    return loss, g, torch.linalg.vecdot(g, s).sum(-1)


class _ClipLoss(torch.autograd.Function):
    """The CLIP loss with its gradient computed in the forward pass (see _clip_parts)."""

    generate_vmap_rule = True  # stacked sweep cells call it under vmap

    @staticmethod
    def forward(u, v, inv_tau):
        return _clip_parts(u @ v.mT, inv_tau, with_grad=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, v, inv_tau = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(u, v, inv_tau, output[1], output[2])

    @staticmethod
    def backward(ctx, grad_loss, _g, _d):
        u, v, inv_tau, g, d_inv_tau = ctx.saved_tensors
        scale = grad_loss * inv_tau
        return (g @ v) * scale, (g.mT @ u) * scale, d_inv_tau * grad_loss


_LOG2 = math.log(2.0)


_EPS = 1e-12  # method.md's eps inside the logs


_LOG_EPS = math.log(_EPS)  # the same eps in log space: log(a + eps) = logaddexp(log a, log eps)


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


def _features(x: torch.Tensor, centering: str, center_first: bool) -> torch.Tensor:
    """Rows L2-normalised and centred (in method.md's order, or centred first)."""
    x = x.float()
    if center_first:
        x = _center(x, centering)
    x = F.normalize(x, dim=-1)
    return x if center_first else _center(x, centering)


def _scaled_rows(features: torch.Tensor, temperature, centering: str, center_first: bool,
                 similarity: str) -> torch.Tensor:
    """Rows y whose products y y^T are the cosine (or rank) similarities over tau: tau is folded
    into the rows (a B x d scaling) rather than applied to the B x B matrix (a pass)."""
    x = _features(features, centering, center_first)
    if similarity == "spearman":  # hard ranks: no gradient reaches the head through this branch
        x = F.normalize(x.argsort(dim=-1).argsort(dim=-1).float(), dim=-1)
    return x * (1.0 / temperature) ** 0.5


def _logits(features: torch.Tensor, temperature, centering: str = "mean", center_first: bool = False,
            similarity: str = "cosine", gamma: float = 1.0) -> torch.Tensor:
    """The batch similarity matrix whose row softmax is one random-walk step."""
    if similarity == "rbf":  # exp(-gamma ||x_i - x_j||^2), no temperature
        x = _features(features, centering, center_first)
        return torch.exp(-gamma * torch.cdist(x, x, p=2).pow(2))
    y = _scaled_rows(features, temperature, centering, center_first, similarity)
    return y @ y.mT


def walk_log_probs(features: torch.Tensor, temperature, **switches) -> torch.Tensor:
    """Row log-softmax of the batch similarity matrix: log-probabilities of one random-walk step."""
    return torch.log_softmax(_logits(features, temperature, **switches), dim=-1)


def _frozen_walk(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen side's walk: P and L(P) = log(P + eps), computed once and shared by every KL."""
    p = torch.softmax(logits, dim=-1)
    return p, torch.add(p, _EPS).log_()


def _divergence(s: torch.Tensor, s_frozen: torch.Tensor, with_grad: bool):
    """method.md's D = 1/2 [KL(M||Q) + KL(M||P)] (row sums, batch mean) from the head side's
    logits ``s`` and the frozen side's ``s_frozen``, and, when ``with_grad``, dD/ds in closed form.

    In probability space, with eps = 1e-12 inside every log as method.md writes it: the eps
    keeps each log finite, so this is as exact as the log-space form (log-softmax, logaddexp),
    whose gradients it matches to 2e-10 at B = 4,096, and costs 3 transcendentals per entry
    against its 11 (docs/benchmarks.md). Buffers are reused in place: each fresh B x B buffer
    costs page faults as well as a pass, and these passes are all of R_S but its matrix products.
    """
    p, lp = _frozen_walk(s_frozen)
    q = torch.softmax(s, dim=-1)
    m = torch.add(p, q).mul_(0.5)
    m_eps, q_eps = torch.add(m, _EPS), torch.add(q, _EPS)
    lm = torch.log(m_eps)
    t = torch.log(q_eps).neg_().add_(lm).add_(lm).sub_(lp)  # 2 L(m) - L(q) - L(p)
    value = torch.linalg.vecdot(m, t).mean() / 2
    if not with_grad:
        return value, None
    # dD/dq = (t/4 + m / (2 (m + eps)) - m / (2 (q + eps))) / B, then through the row softmax:
    # dD/ds = q * (g - sum_j q_j g_j).
    r_m, r_q = m_eps.reciprocal_().mul_(m), q_eps.reciprocal_().mul_(m)  # m / (m + eps), m / (q + eps)
    g = t.mul_(0.25).add_(r_m, alpha=0.5).sub_(r_q, alpha=0.5)
    h = g.mul_(q)
    h.sub_(q * h.sum(-1, keepdim=True))
    return value, h.div_(s.shape[-2])


def _symmetrize(h: torch.Tensor) -> torch.Tensor:
    return h + h.mT


_CORES: dict[bool, tuple] = {}


def _cores(compiled: bool) -> tuple:
    """(divergence, symmetrize), eager or through torch.compile. Compiled, each is a
    loop or two (the divergence 3.7x and the transposed add 2.3x faster at B = 4,096 on a CPU)
    for a compile of seconds, once per process; where compiling fails they stay eager, quietly."""
    if compiled not in _CORES:
        _CORES[compiled] = tuple(maybe_compile(f, compiled, quiet=True)
                                 for f in (_divergence, _symmetrize))
    return _CORES[compiled]


class _CosineStructure(torch.autograd.Function):
    """D of the default R_S from the head side's scaled rows y (logits y y^T), with its gradient
    in closed form: dD/dy = (H + H^T) y for H = dD/ds, computed in the forward pass. Autograd
    would keep about a dozen B x B tensors alive, run a pass for each in backward, and take two
    B x B x d products for the gradient of y y^T where this takes one."""

    generate_vmap_rule = True  # stacked sweep cells call it under vmap

    @staticmethod
    def forward(y, s_frozen, compiled):
        return _cores(compiled)[0](y @ y.mT, s_frozen, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.compiled = inputs[2]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, grad_value, _grad_of_h):
        y, h = ctx.saved_tensors
        return (_cores(ctx.compiled)[1](h) @ y) * grad_value, None, None


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
    compiled: bool = False,
    stacked: bool = False,
) -> torch.Tensor:
    """R_S between frozen inputs ``x`` (B, d_in) and head outputs ``z`` (B, d_out), in float32.

    ``divergence="reference"`` is the released code's 1/2 [KL(M||Q) + KL(M||P)];
    ``"js"`` the textbook 1/2 [KL(P||M) + KL(Q||M)]. ``weighting`` is "none" (w_l = 1) or
    "inverse" (w_l = 1/l). The released code's ablation switches: ``centering``
    none|mean|standard, applied after the L2 normalisation or, with ``center_first``, before
    it; ``similarity`` cosine|rbf (with ``gamma``)|spearman; ``margin``: D_l <- max(0, D_l - margin).
    ``compiled``: the default's elementwise work through torch.compile (see _cores).
    ``stacked``: called under vmap (stacked sweep cells), where ``requires_grad`` cannot be seen:
    the closed-form gradient is then built whenever gradients are enabled, and the core is eager.
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
    with torch.autocast(device_type=z.device.type, enabled=False):
        if levels == 1 and divergence == "reference":  # the default: fused, with a closed-form gradient
            compiled = compiled and not stacked  # a compiled function cannot run under vmap
            with torch.no_grad():  # the frozen side: no graph
                s_frozen = _logits(x.detach(), **walk)
            if similarity == "cosine" and torch.is_grad_enabled() and (z.requires_grad or stacked):
                y = _scaled_rows(z, temperature, centering, center_first, similarity)
                d = _CosineStructure.apply(y, s_frozen, compiled)[0]
            else:  # no gradient wanted, or rbf / spearman: autograd through the same arithmetic
                d = _cores(compiled)[0](_logits(z, **walk), s_frozen, False)[0]
            return torch.relu(d - margin) if margin else d
        with torch.no_grad():
            log_p = walk_log_probs(x.detach(), **walk)
        return multilevel(log_p, walk_log_probs(z, **walk), levels, weighting, divergence, margin)


def multilevel(log_p, log_q, levels: int, weighting: str, divergence: str, margin: float) -> torch.Tensor:
    """Every level and divergence through autograd. Higher levels multiply probabilities (a
    matrix power has no cheap log form) and take one clamped log."""
    p, q = log_p.exp(), log_q.exp()
    p_l, q_l, log_p_l, log_q_l = p, q, log_p, log_q
    tiny = torch.finfo(torch.float32).tiny
    total = log_q.new_zeros(())
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
