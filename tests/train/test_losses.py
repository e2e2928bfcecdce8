"""The losses against a straightforward float64 numpy transcription of ../shared/method.md."""

import numpy as np
import pytest
import torch
from transcriptions import ref_clip, ref_structure

from featcache.pipeline.common.losses import clip_loss, lambda_at, structure_regularizer


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_loss_matches_reference(seed):
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
    got = clip_loss(torch.tensor(u), torch.tensor(v), 0.05).item()
    assert got == pytest.approx(ref_clip(u, v, 0.05), rel=1e-6)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("weighting", ["none", "inverse"])
@pytest.mark.parametrize("divergence", ["reference", "js"])
def test_structure_matches_reference(levels, weighting, divergence):
    rng = np.random.default_rng(levels)
    x, z = rng.normal(size=(24, 12)), rng.normal(size=(24, 6))
    got = structure_regularizer(torch.tensor(x, dtype=torch.float32), torch.tensor(z, dtype=torch.float32),
                                0.5, levels, weighting, divergence)
    assert got.dtype == torch.float32
    want = ref_structure(x, z, 0.5, levels, weighting, divergence)
    assert want > 1e-4  # a non-trivial value, so agreement means something
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("switches", [
    {"centering": "none"}, {"centering": "standard"}, {"centering": "standard", "center_first": True},
    {"center_first": True}, {"similarity": "rbf"}, {"similarity": "rbf", "gamma": 3.0},
    {"similarity": "spearman"}, {"margin": 0.01}, {"margin": 10.0}, {"similarity": "spearman", "centering": "none"},
])
@pytest.mark.parametrize("levels", [1, 2])
def test_released_code_switches_match_reference(switches, levels):
    rng = np.random.default_rng(11 + levels)
    x, z = rng.normal(size=(20, 10)), rng.normal(size=(20, 7))
    got = structure_regularizer(torch.tensor(x, dtype=torch.float32), torch.tensor(z, dtype=torch.float32),
                                0.5, levels, "inverse", "reference", **switches)
    want = ref_structure(x, z, 0.5, levels, "inverse", "reference", **switches)
    if switches.get("margin") == 10.0:
        assert got.item() == 0.0 == want  # the margin swallows the divergence
    else:
        assert want > 1e-5 and got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_structure_at_paper_temperature_matches_reference():
    rng = np.random.default_rng(7)
    x, z = rng.normal(size=(32, 16)), rng.normal(size=(32, 16))
    got = structure_regularizer(torch.tensor(x, dtype=torch.float32), torch.tensor(z, dtype=torch.float32), 0.05, 2)
    assert got.item() == pytest.approx(ref_structure(x, z, 0.05, 2, "none", "reference"), rel=1e-3)


@pytest.mark.parametrize("divergence", ["reference", "js"])
def test_structure_is_zero_when_z_is_x(divergence):
    x = torch.randn(20, 10)
    assert structure_regularizer(x, x.clone(), 0.05, 3, "inverse", divergence).item() == pytest.approx(0.0, abs=1e-6)


def test_structure_gradient_flows_to_outputs_only():
    x = torch.randn(10, 6, requires_grad=True)
    z = torch.randn(10, 4, requires_grad=True)
    structure_regularizer(x, z, 0.1).backward()
    assert x.grad is None and z.grad is not None and z.grad.abs().sum() > 0


def test_lambda_ramp():
    assert lambda_at(0, 10, 1000) == 0
    assert lambda_at(500, 10, 1000) == pytest.approx(5)
    assert lambda_at(5000, 10, 1000) == 10
    assert lambda_at(3, 10, 0) == 10


@pytest.mark.parametrize("center_first", [False, True])
def test_standard_centering_survives_a_constant_dimension(center_first):
    """Real features can hold a dimension that never varies (MiniLM block.05 on Tux Paint):
    standardising it must not turn the loss or its gradient into NaN."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    x[:, 3] = 0.25  # constant over the batch
    z = torch.randn(32, 8, requires_grad=True)
    value = structure_regularizer(x, z, 0.07, centering="standard", center_first=center_first)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


def test_compile_falls_back_to_eager_when_unavailable(monkeypatch):
    from featcache.pipeline.common.losses import maybe_compile

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    x, z = torch.randn(12, 6), torch.randn(12, 4, requires_grad=True)
    rs = maybe_compile(structure_regularizer, True)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        got = rs(x, z, 0.1)
    assert got.item() == structure_regularizer(x, z, 0.1).item()
    got.backward()
    assert z.grad is not None


@pytest.mark.parametrize("levels", [1, 2])  # 1: the fused Function inside the compiled graph
def test_compiled_structure_equals_eager_forward_and_backward(levels):
    """torch.compile of the whole R_S (``--compile on``) keeps its value and gradient."""
    import warnings

    from featcache.pipeline.common.losses import maybe_compile

    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(24, 12)), dtype=torch.float32)
    z0 = torch.tensor(rng.normal(size=(24, 6)), dtype=torch.float32)
    rs = maybe_compile(structure_regularizer, True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        values = []
        for f in (structure_regularizer, rs):
            z = z0.clone().requires_grad_()
            v = f(x, z, 0.5, levels)
            v.backward()
            values.append((v.item(), z.grad))
    fallback = [w for w in seen if issubclass(w.category, RuntimeWarning) and "torch.compile" in str(w.message)]
    if fallback:  # a fallback here would test nothing
        pytest.skip(f"torch.compile unavailable on this machine: {fallback[0].message}")
    assert values[1][0] == pytest.approx(values[0][0], rel=1e-5, abs=1e-7)
    assert values[0][0] == pytest.approx(ref_structure(x.double().numpy(), z0.double().numpy(), 0.5, levels, "none",
                                                       "reference"), rel=1e-4)
    assert torch.allclose(values[1][1], values[0][1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("switches", [
    {}, {"centering": "standard", "center_first": True}, {"similarity": "rbf", "gamma": 2.0},
    {"similarity": "spearman"}, {"levels": 2, "weighting": "inverse", "divergence": "js", "margin": 0.001},
])
def test_structure_under_vmap_equals_each_cell(switches):
    """Vectorised sweep cells take R_S through torch.func.vmap: every switch must batch exactly."""
    from torch.func import vmap

    torch.manual_seed(0)
    x, z, tau = torch.randn(3, 16, 10), torch.randn(3, 16, 6), torch.tensor([0.05, 0.1, 0.5])
    got = vmap(lambda a, b, t: structure_regularizer(a, b, t, stacked=True, **switches))(x, z, tau)
    want = torch.stack([structure_regularizer(x[c], z[c], float(tau[c]), **switches) for c in range(3)])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # benchmarks/gpu_smoke.sh runs these on CUDA


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("switches", [{}, {"centering": "none"}, {"centering": "standard", "center_first": True},
                                      {"margin": 1e-3}])
def test_closed_form_gradient_equals_autograd(switches, compiled, device):
    """The default R_S's gradient is written out by hand (losses._CosineStructure, eager or with
    its core compiled): value and gradient must equal autograd's through the log-space form that
    levels > 1 still use."""
    from featcache.pipeline.common.losses import multilevel, walk_log_probs

    torch.manual_seed(1)
    x, z0 = torch.randn(48, 12, device=device), torch.randn(48, 6, device=device)
    walk = {k: v for k, v in switches.items() if k != "margin"}
    grads = []
    for fused in (True, False):
        z = z0.clone().requires_grad_()
        if fused:
            v = structure_regularizer(x, z, 0.07, compiled=compiled, **switches)
        else:
            v = multilevel(walk_log_probs(x, 0.07, **walk), walk_log_probs(z, 0.07, **walk), 1, "none", "reference",
                            switches.get("margin", 0.0))
        v.backward()
        grads.append((v.item(), z.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5, abs=1e-7)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-8)
    assert grads[0][1].abs().sum() > 0


def test_closed_form_gradient_under_vmap_equals_each_cell():
    """Stacked sweep cells backpropagate through the hand-written gradient under vmap."""
    from torch.func import vmap

    torch.manual_seed(2)
    x, w = torch.randn(3, 32, 10), torch.randn(3, 10, 6, requires_grad=True)
    vmap(lambda a, b: structure_regularizer(a, a @ b, 0.1, stacked=True))(x, w).sum().backward()
    got, w.grad = w.grad, None
    sum(structure_regularizer(x[c], x[c] @ w[c], 0.1) for c in range(3)).backward()
    assert torch.allclose(got, w.grad, rtol=1e-5, atol=1e-8)


def test_core_compiles_only_where_it_pays():
    from featcache.pipeline.common.losses import core_compiled

    assert core_compiled("auto", 4096) and not core_compiled("auto", 559)
    assert not core_compiled("off", 4096) and not core_compiled("on", 4096)  # on: the whole R_S instead


def _autograd_clip(u, v, tau):
    """The CLIP loss as cross-entropy through autograd: what losses._ClipLoss writes out."""
    u, v = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(v, dim=-1)
    logits = u @ v.T / tau
    target = torch.arange(len(u))
    return (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2


@pytest.mark.parametrize("learn_temperature", [False, True])
def test_clip_closed_form_gradient_equals_autograd(learn_temperature):
    torch.manual_seed(3)
    u0, v0 = torch.randn(40, 8), torch.randn(40, 8)
    got = []
    for f in (clip_loss, _autograd_clip):
        u, v = u0.clone().requires_grad_(), v0.clone().requires_grad_()
        log_tau = torch.tensor(0.07).log().requires_grad_(learn_temperature)
        loss = f(u, v, log_tau.exp())
        loss.backward()
        got.append((loss.item(), u.grad, v.grad, log_tau.grad))
    (l1, gu1, gv1, gt1), (l2, gu2, gv2, gt2) = got
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert torch.allclose(gu1, gu2, atol=1e-7, rtol=1e-4) and torch.allclose(gv1, gv2, atol=1e-7, rtol=1e-4)
    if learn_temperature:
        assert gt1.item() == pytest.approx(gt2.item(), rel=1e-4, abs=1e-7) and gt1.item() != 0


def test_clip_closed_form_gradient_under_vmap_equals_each_cell():
    from torch.func import vmap

    torch.manual_seed(4)
    u, v = torch.randn(3, 24, 6), torch.randn(3, 24, 6)
    w = torch.randn(3, 6, 6, requires_grad=True)
    log_tau = torch.tensor([0.03, 0.05, 0.1]).log().requires_grad_()
    vmap(lambda a, b, m, t: clip_loss(a @ m, b, t.exp()))(u, v, w, log_tau).sum().backward()
    got_w, got_t = w.grad, log_tau.grad
    w.grad = log_tau.grad = None
    sum(_autograd_clip(u[c] @ w[c], v[c], log_tau[c].exp()) for c in range(3)).backward()
    assert torch.allclose(got_w, w.grad, atol=1e-7, rtol=1e-4)
    assert torch.allclose(got_t, log_tau.grad, atol=1e-7, rtol=1e-4)
