"""Float64 numpy transcriptions of ../shared/method.md's losses, the references the tests
compare featcache's torch code against (tests/train/test_losses.py, tests/select/test_alignment_metrics.py)."""

import numpy as np


def ref_clip(u, v, tau):
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = u @ v.T / tau

    def ce(logits):  # cross-entropy with the diagonal as targets
        logits = logits - logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -np.mean(np.diag(logp))

    return (ce(s) + ce(s.T)) / 2


def ref_structure(x, z, tau, levels, weighting, divergence, eps=1e-12, centering="mean", center_first=False,
                  similarity="cosine", gamma=1.0, margin=0.0):
    def centre(a):
        if centering == "mean":
            return a - a.mean(0)
        if centering == "standard":
            return (a - a.mean(0)) / a.std(0, ddof=1)
        return a

    def walk(a):
        if center_first:
            a = centre(a)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)  # step 1: normalise rows
        if not center_first:
            a = centre(a)  # then centre (by default: subtract the batch mean)
        if similarity == "rbf":
            d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
            s = np.exp(-gamma * d2)
        elif similarity == "spearman":
            r = np.argsort(np.argsort(a, axis=1), axis=1).astype(float)
            r = r / np.linalg.norm(r, axis=1, keepdims=True)
            s = r @ r.T / tau
        else:
            s = a @ a.T / tau  # step 2: diagonal kept
        e = np.exp(s - s.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)  # step 3: row softmax

    def kl(a, b):
        return np.mean(np.sum(a * (np.log(a + eps) - np.log(b + eps)), axis=1))

    p, q = walk(x), walk(z)
    total = 0.0
    for level in range(1, levels + 1):
        pl, ql = np.linalg.matrix_power(p, level), np.linalg.matrix_power(q, level)  # step 4
        m = (pl + ql) / 2
        d = (kl(m, ql) + kl(m, pl)) / 2 if divergence == "reference" else (kl(pl, m) + kl(ql, m)) / 2
        d = max(0.0, d - margin)
        total += (1.0 / level if weighting == "inverse" else 1.0) * d  # step 6
    return total / levels
