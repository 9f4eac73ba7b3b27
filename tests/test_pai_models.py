"""Pruning at initialization on the models users bring: attention, half precision, token inputs.

References are independent: finite differences of float64 gradients for Hessian-vector
products through attention, the float32 run of the same weights for half-precision
models, closed forms for SynFlow through an embedding.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from woodfisher.batches import to_batch
from woodfisher.pai import CRITERIA, SECOND_ORDER, compute_scores, hutchinson_diagonal, prune_at_init, synflow_scores
from woodfisher.pai.estimators import hessian_gradient_product, loss_gradient


def encoder():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                         nn.Flatten(), nn.Linear(8 * 3, 3)).double()


def token_data(n=16, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_hessian_gradient_product_through_attention_matches_finite_differences():
    """H v through nn.TransformerEncoderLayer (fused SDPA by default) against central
    differences of float64 gradients, which need no double backward."""
    model, data = encoder(), token_data()
    names = ["1.self_attn.in_proj_weight", "1.linear1.weight", "3.weight"]
    g = loss_gradient(model, data, params=names)
    hv = hessian_gradient_product(model, data, g, params=names)
    params = dict(model.named_parameters())

    def grad_at(shift):
        state = {n: params[n].detach() + shift * g[n] for n in names}
        state = {n: t.requires_grad_(True) for n, t in state.items()}
        total = {n: 0 for n in names}
        for x, y in data:
            loss = F.cross_entropy(functional_call(model, state, (x,)), y) * x.shape[0] / 16
            for n, gi in zip(names, torch.autograd.grad(loss, list(state.values()))):
                total[n] = total[n] + gi
        return total

    eps = 1e-5
    plus, minus = grad_at(eps), grad_at(-eps)
    for n in names:
        torch.testing.assert_close(hv[n], (plus[n] - minus[n]) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_every_criterion_runs_on_a_transformer_encoder():
    data = token_data()
    for crit in SECOND_ORDER + ("grasp", "snip", "synflow"):
        model = encoder()
        res = prune_at_init(model, data, sparsity=0.5, criterion=crit, num_probes=2, synflow_iterations=3,
                            progress=False)
        assert "1.self_attn.in_proj_weight" in res.masks, crit  # read by MHA without a submodule call
        assert abs(res.sparsity - 0.5) < 1e-3, crit
        zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in res.masks)
        assert zeros == sum(int((~m).sum()) for m in res.masks.values()), crit


def test_hutchinson_through_attention_autograd_equals_func():
    model, data = encoder(), token_data()
    a = hutchinson_diagonal(model, data, num_probes=3, generator=torch.Generator().manual_seed(4))
    b = hutchinson_diagonal(model, data, num_probes=3, hvp="func", generator=torch.Generator().manual_seed(4))
    for n in a.diag:
        torch.testing.assert_close(a.diag[n], b.diag[n], rtol=1e-9, atol=1e-12)


def half_mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_masks_agree_with_float32_run(dtype):
    """Every criterion on a half model against the float32 run of the same (rounded) weights:
    statistics in float32, so no score underflows to 0 and the kept sets agree."""
    low = half_mlp().to(dtype)
    ref = copy.deepcopy(low).float()
    g = torch.Generator().manual_seed(0)
    x = (0.05 * torch.randn(64, 48, generator=g)).to(dtype)
    y = torch.randint(0, 10, (64,), generator=g)
    low_data = [(x[i:i + 32], y[i:i + 32]) for i in (0, 32)]
    ref_data = [(a.float(), b) for a, b in low_data]
    opts = dict(sparsity=0.9, num_probes=4, synflow_iterations=5, progress=False)
    for crit in CRITERIA:
        s_low = compute_scores(low, low_data, crit, num_probes=4, generator=torch.Generator().manual_seed(1),
                               input_shape=(48,))
        s_ref = compute_scores(ref, ref_data, crit, num_probes=4, generator=torch.Generator().manual_seed(1),
                               input_shape=(48,))
        for n in s_ref:
            assert s_low[n].dtype == torch.float32
            assert int((s_low[n] == 0).sum()) <= int((s_ref[n] == 0).sum()), (crit, n)
        r_low = prune_at_init(copy.deepcopy(low), low_data, criterion=crit, **opts)
        r_ref = prune_at_init(copy.deepcopy(ref), ref_data, criterion=crit, **opts)
        kept_low = torch.cat([m.flatten() for m in r_low.masks.values()])
        kept_ref = torch.cat([m.flatten() for m in r_ref.masks.values()])
        overlap = float((kept_low & kept_ref).sum()) / float(kept_ref.sum())
        assert overlap >= 0.95, (crit, overlap)


def embedding_net(bias=False):
    torch.manual_seed(5)
    return nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(4 * 3, 6, bias=bias), nn.ReLU(),
                         nn.Linear(6, 3, bias=bias))


def test_synflow_through_an_embedding_closed_form():
    """All-ones one-hot input: every position of the embedding output is s = sum_v |E_v|, so
    R = 1^T |W2| |W1| x with x = (s, s, s)."""
    model = embedding_net()
    tokens = [(torch.randint(0, 20, (8, 3)), torch.randint(0, 3, (8,)))]
    names = ["0.weight", "2.weight", "4.weight"]
    s = synflow_scores(model, params=names, example=None, input_shape=(3,))
    e, w1, w2 = (model[i].weight.detach().double().abs() for i in (0, 2, 4))
    x = e.sum(0).repeat(3)
    c = w2.sum(0) @ w1  # dR/dx, (12,)
    torch.testing.assert_close(s["2.weight"].double(), w1 * w2.sum(0)[:, None] * x[None, :], rtol=1e-6, atol=0)
    torch.testing.assert_close(s["4.weight"].double(), w2 * (w1 @ x)[None, :], rtol=1e-6, atol=0)
    torch.testing.assert_close(s["0.weight"].double(), e * c.view(3, 4).sum(0)[None, :], rtol=1e-6, atol=0)
    from_tokens = synflow_scores(model, params=names, example=to_batch(tokens[0]))
    for n in names:
        torch.testing.assert_close(from_tokens[n], s[n], rtol=0, atol=0)
    res = prune_at_init(embedding_net(), tokens, sparsity=0.8, criterion="synflow", synflow_iterations=10,
                        progress=False)  # input structure read from the loader's integer batch
    assert set(res.masks) == {"2.weight", "4.weight"} and abs(res.sparsity - 0.8) < 0.02
