"""The building blocks a method of one's own uses (StepContext.obs_saliency / obs_update / inverse_diagonal) for
every form of the inverse (dense, low-rank, offloaded), against float64: the full empirical Fisher of each
block, its exact inverse, the saliency w^2 / (2 [F^-1]_qq) and the OBS update -F^-1 v (WoodFisher paper,
Eqs. 10-11)."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import woodfisher as wf
from woodfisher.methods import METHODS, PruningMethod

N, DAMP, NAMES = 48, 1e-3, ("0.weight", "2.weight")
SEEN = {}


class Recorded(PruningMethod):
    """Prunes by the OBS saliency with the OBS update, through the StepContext helpers; records what it saw."""
    name = "test_ctx_obs"
    curvature = "blockwise"

    def step(self, ctx):
        sal = {t.name: ctx.obs_saliency(t) for t in ctx.targets}
        keep = ctx.select(sal)
        SEEN.update(sal=sal, diag={t.name: ctx.inverse_diagonal(t) for t in ctx.targets}, keep=keep)
        return {t.name: ctx.obs_update(t, keep[t.name]) for t in ctx.targets}, keep


@pytest.fixture
def registered():
    before = dict(METHODS)
    wf.register_method(Recorded)
    yield
    METHODS.clear()
    METHODS.update(before)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 10, generator=gen), torch.randint(0, 4, (N,), generator=gen)
    return model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, N, 16)], x, y


def _reference(model, x, y, block, keep):
    """float64 (diag of F^-1, saliency, OBS-updated weights) per weight, for the keep-masks given."""
    m64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m64.named_parameters()}
    loss = lambda p, xi, yi: nn.functional.cross_entropy(functional_call(m64, p, (xi[None],)), yi[None])  # noqa
    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    out = {}
    for name in NAMES:
        w, d = params[name].flatten(), params[name].numel()
        c = d if block is None else block
        b = -(-d // c)
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-1], b * c - d)], -1)  # noqa: E731
        g = pad(grads[name].reshape(N, d)).reshape(N, b, c).transpose(0, 1)
        inv = torch.linalg.inv(DAMP * torch.eye(c, dtype=torch.float64) + g.transpose(1, 2) @ g / N)
        diag = torch.diagonal(inv, dim1=1, dim2=2)
        wb, pruned = pad(w).reshape(b, c), pad(~keep[name].flatten()).reshape(b, c)
        v = torch.where(pruned, wb / diag, torch.zeros_like(wb))
        new = (wb - (inv @ v[..., None])[..., 0]).masked_fill(pruned, 0.0)
        shape = params[name].shape
        out[name] = tuple(t.flatten()[:d].reshape(shape) for t in (diag, wb ** 2 / (2 * diag), new))
    return out


@pytest.mark.parametrize("block, form", [(1, None), (10, None), (None, None), (10, "offload")],
                         ids=["c1", "c10", "whole-layer", "c10-offload"])
def test_step_context_obs_helpers_match_float64(block, form, registered):
    model, loader, x, y = _setup()
    extra = {} if form is None else dict(inverse_form=form, memory_budget=1e6)
    pruned = copy.deepcopy(model)
    curv = wf.estimate_curvature(pruned, loader, method="test_ctx_obs", num_grads=N, block_size=block, damp=DAMP,
                                 progress=False, **extra)
    wf.prune_with(pruned, curv, 0.5)
    ref = _reference(model, x, y, block, SEEN["keep"])
    for name in NAMES:
        diag, sal, new = ref[name]
        torch.testing.assert_close(SEEN["diag"][name].double(), diag, rtol=2e-5, atol=0)
        torch.testing.assert_close(SEEN["sal"][name].double(), sal, rtol=2e-5, atol=1e-12)
        got = dict(pruned.named_parameters())[name].detach().double()
        torch.testing.assert_close(got, new, rtol=1e-4, atol=1e-6 * float(new.abs().max()))
    same = copy.deepcopy(model)  # the built-in method on the same gradients: the same masks and weights
    wf.prune_one_shot(same, loader, sparsity=0.5, num_grads=N, num_steps=1, block_size=block, damp=DAMP,
                      progress=False, **extra)
    for name in NAMES:
        assert torch.equal(dict(same.named_parameters())[name] != 0, SEEN["keep"][name])
