"""Each operator against a direct transcription of CRATE.md (column-vector notation)."""

import math

import pytest
import torch

from crate_lm.model.attention import build_attention_mask
from crate_lm.model.crate import ISTA, MSSA
from tests.conftest import small_config


def layer_norm(z, ln):
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, unbiased=False, keepdim=True)
    return (z - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def randomise(module):
    """Random values everywhere, LayerNorm affine included, so no term can hide."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("variant", ["crate", "overcomplete", "alpha"])
def test_ista_matches_equations(variant, steps):
    cfg = small_config(ista=variant, ista_steps=steps, ista_eta=0.3, ista_lambda=0.05)
    ista = randomise(ISTA(cfg)).double()
    z = torch.randn(3, 7, cfg.d_model, dtype=torch.float64)
    eta, lam = cfg.ista_eta, cfg.ista_lambda
    D = ista.dict
    expected = []
    for zb in z:  # one sequence at a time, tokens as columns
        y = layer_norm(zb, ista.ln).T  # d x N
        if variant == "crate":
            a = y
            for _ in range(steps):
                a = torch.relu(a + eta * D.T @ (y - D @ a) - eta * lam)
            out = a
        else:
            a = torch.zeros(D.shape[1], y.shape[1], dtype=y.dtype)  # A_0 = 0
            for _ in range(steps):
                a = torch.relu(a + eta * D.T @ (y - D @ a) - eta * lam)
            out = D @ a if variant == "overcomplete" else zb.T + ista.dict_out @ a
        expected.append(out.T)
    got = ista(z)
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-10)
    # and in fp32 to the acceptance tolerance
    got32 = ista.float()(z.float())
    torch.testing.assert_close(got32, torch.stack(expected).float(), rtol=0, atol=1e-5)


def test_ista_code_is_sparse_and_nonnegative():
    cfg = small_config(ista="overcomplete")
    ista = ISTA(cfg)
    codes = []
    ista.hook_code.register_forward_hook(lambda m, i, o: codes.append(o))
    ista(torch.randn(2, 5, cfg.d_model))
    (code,) = codes
    assert code.shape == (2, 5, cfg.dict_width)
    assert (code >= 0).all()
    assert (code == 0).any()


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [True, False])
def test_mssa_matches_equations(impl, causal):
    cfg = small_config(attn_impl=impl)
    mssa = randomise(MSSA(cfg))
    b, n, d, k = 2, 9, cfg.d_model, cfg.n_heads
    p = d // k
    z = torch.randn(b, n, d)
    pad = torch.ones(b, n, dtype=torch.long)
    pad[1, -3:] = 0  # padding mask exercised when bidirectional
    mask = build_attention_mask(causal=causal, q_len=n, k_len=n, attention_mask=None if causal else pad)
    got = mssa(z, mask)

    W_U, W_out, b_out = mssa.proj_u.weight, mssa.out.weight, mssa.out.bias
    expected = torch.empty_like(z)
    for i in range(b):
        y = layer_norm(z[i], mssa.ln)
        heads = []
        for h in range(k):
            U_k = W_U[h * p : (h + 1) * p].T  # d x p
            Q = y @ U_k
            S = Q @ Q.T / math.sqrt(p)
            allowed = torch.ones(n, n, dtype=torch.bool)
            if causal:
                allowed = allowed.tril()
            else:
                allowed = allowed & pad[i].bool()[None, :]
            A = torch.softmax(S.masked_fill(~allowed, float("-inf")), dim=-1)
            heads.append(A @ Q)
        expected[i] = z[i] + torch.cat(heads, dim=-1) @ W_out.T + b_out
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
