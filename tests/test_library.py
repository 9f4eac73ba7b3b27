"""The public ops as torch.library custom ops: opcheck for every op, torch.compile(fullgraph).

``torch.library.opcheck`` checks the schema (mutation / aliasing declared correctly,
e.g. ``woodbury_update_`` mutates ``inv`` only), the fake kernels against the real ones
(shapes, dtypes, strides), the autograd registration and AOT dispatch with dynamic shapes.
"""
from __future__ import annotations

import pytest
import torch

import woodfisher_kernels as wk
from woodfisher_kernels import testing

OPS = torch.ops.woodfisher_ops
B, M, C = 3, 6, 5


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(B, M, C, generator=gen)
    inv = wk.fisher_inverse(grads, 0.5)
    weights = torch.randn(B, C, generator=gen)
    mask = torch.rand(B, C, generator=gen) < 0.5
    groups = torch.tensor([[0, 1], [2, 3]]).expand(B, 2, 2).contiguous()
    prune = torch.tensor([True, False]).expand(B, 2).contiguous()
    return grads, inv, weights, mask, groups, prune


def _samples():
    grads, inv, weights, mask, groups, prune = _inputs()
    more = torch.randn(B, 4, C)
    return {
        "fisher_inverse": [(grads, 0.5, 6.0, "torch", "recompute", True), (grads, 0.5, 6.0, "auto", "raise", False)],
        "woodbury_update_": [(inv.clone(), more, 6.0, "torch", "recompute", True)],
        "obs_saliency": [(inv, weights, None, "torch", True), (inv, weights, weights.neg(), "auto", False)],
        "obs_update": [(inv, weights, mask, None, "torch", True), (inv, weights, mask, weights.neg(), "auto", True)],
        "inverse_diagonal": [(inv, True)],
        "gather_rows": [(inv, groups)],
        "gather_subblocks": [(inv, groups)],
        "group_obs_saliency": [(inv, weights, groups, True), (inv, weights, groups, False)],
        "group_obs_update": [(inv, weights, groups, prune, True), (inv, weights, groups, prune, False)],
        "condition_estimate": [(grads, 0.5, 6.0, 20, False), (grads, 0.5, 6.0, 5, True)],
    }


def test_every_op_has_samples_and_a_fake_kernel():
    declared = {name for name in dir(OPS) if not name.startswith("_") and hasattr(getattr(OPS, name), "default")}
    assert declared == set(_samples())


@pytest.mark.parametrize("name", sorted(_samples()))
def test_opcheck(name):
    for args in _samples()[name]:
        torch.library.opcheck(getattr(OPS, name).default, args)


def test_opcheck_on_the_triton_backend():
    if "triton" not in testing.backends("fisher_inverse"):
        pytest.skip("triton is not installed")
    grads, inv, weights, mask, _, _ = _inputs()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.library.opcheck(OPS.fisher_inverse.default, (grads.to(dev), 0.5, 6.0, "triton", "recompute", True))
    torch.library.opcheck(OPS.woodbury_update_.default,
                          (inv.clone().to(dev), grads.to(dev), 6.0, "triton", "recompute", True))
    torch.library.opcheck(OPS.obs_update.default, (inv.to(dev), weights.to(dev), mask.to(dev), None, "triton", True))


def _obs_step(grads, weights, mask):
    """A small OBS step through the public ops only: inverse, update, statistic, weight update."""
    inv = wk.fisher_inverse(grads, 0.1)
    wk.woodbury_update_(inv, grads[:, :2], 10.0, check_finite=False)
    rho = wk.obs_saliency(inv, weights, check_finite=False)
    return wk.obs_update(inv, weights, mask, check_finite=False), rho, wk.inverse_diagonal(inv)


def test_torch_compile_fullgraph_matches_eager():
    """Dynamo + AOT autograd (fake kernels, the in-place update functionalised), CPU.

    ``aot_eager`` rather than inductor keeps the suite fast (inductor's C++ toolchain takes
    ~30 s here); the graph is the same one inductor receives (checked by hand with inductor).
    """
    grads, _, weights, mask, _, _ = _inputs(seed=1)
    eager = _obs_step(grads, weights, mask)
    torch._dynamo.reset()
    compiled = torch.compile(_obs_step, fullgraph=True, backend="aot_eager")(grads, weights, mask)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_group_ops_and_validation_inside_the_graph():
    grads, _, weights, _, groups, prune = _inputs(seed=2)

    def step(g, w):
        inv = wk.fisher_inverse(g, 0.1)
        rho = wk.obs_saliency(inv, w)
        mask = rho <= rho.median(dim=1, keepdim=True).values
        return wk.group_obs_update(inv, w, groups, prune), wk.obs_update(inv, w, mask), wk.condition_estimate(g, 0.1)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(grads, weights), step(grads, weights)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="grads contains NaN"):
        compiled(torch.full_like(grads, float("nan")), weights)
