"""Bad input gets a ValueError naming the argument, and nothing is modified."""
from __future__ import annotations

import pytest
import torch

import woodfisher_kernels as wk


def _inv(b=2, c=5):
    return wk.fisher_inverse(torch.randn(b, 7, c), 0.5)


def _assert_refused(fn, match, *watched):
    before = [t.clone() for t in watched]  # NaN-aware exact comparison below
    with pytest.raises(ValueError, match=match):
        fn()
    for t, b in zip(watched, before):
        assert torch.allclose(t, b, rtol=0, atol=0, equal_nan=True), "a refused call modified its input"


GOOD_GRADS = torch.randn(2, 3, 5)


@pytest.mark.parametrize("grads,match", [
    (GOOD_GRADS.half(), "grads must have dtype"),
    (GOOD_GRADS.long(), "grads must have dtype"),
    (GOOD_GRADS[0], "grads must have 3 dimensions"),
    (torch.randn(2, 0, 5), "grads has an empty dimension"),
    (torch.randn(0, 3, 5), "grads has an empty dimension"),
    (torch.randn(2, 3, 4), r"grads must have shape \(2, k, 5\)"),
    (torch.randn(3, 3, 5), r"grads must have shape \(2, k, 5\)"),
    (GOOD_GRADS.double(), "grads has dtype torch.float64 but inv"),
    (torch.full((2, 3, 5), float("nan")), "grads contains NaN"),
    (torch.full((2, 3, 5), float("inf")), "grads contains NaN or Inf"),
    ([[1.0]], "grads must be a torch.Tensor"),
])
def test_woodbury_update_refuses_bad_grads(grads, match):
    inv = _inv()
    _assert_refused(lambda: wk.woodbury_update_(inv, grads, 3.0), match, inv)


def test_woodbury_update_refuses_other_device():
    inv = _inv()
    meta = torch.empty(2, 3, 5, device="meta")
    _assert_refused(lambda: wk.woodbury_update_(inv, meta, 3.0), "grads is on meta", inv)


@pytest.mark.parametrize("num_samples", [0, -1.0, float("nan"), float("inf"), "3", True])
def test_woodbury_update_refuses_bad_num_samples(num_samples):
    inv = _inv()
    _assert_refused(lambda: wk.woodbury_update_(inv, GOOD_GRADS, num_samples), "num_samples", inv)


def test_woodbury_update_refuses_bad_inverse_and_backend():
    inv = _inv()
    bad = inv.clone()
    bad[0, 0, 0] = float("nan")
    _assert_refused(lambda: wk.woodbury_update_(bad, GOOD_GRADS, 3.0), "inv contains NaN", bad)
    rect = torch.randn(2, 5, 4)
    _assert_refused(lambda: wk.woodbury_update_(rect, GOOD_GRADS, 3.0), "inv must hold square", rect)
    _assert_refused(lambda: wk.woodbury_update_(inv, GOOD_GRADS, 3.0, backend="gpu"), "backend must be", inv)
    _assert_refused(lambda: wk.woodbury_update_(inv, GOOD_GRADS, 3.0, backend="cuda"), "backend='cuda'", inv)
    inv64 = inv.double()
    grads64 = GOOD_GRADS.double()
    if "triton" in wk.available_backends("woodbury_update_"):
        _assert_refused(lambda: wk.woodbury_update_(inv64, grads64, 3.0, backend="triton"),
                        "float32 only", inv64)


@pytest.mark.parametrize("damp", [0, -1e-5, float("nan"), None])
def test_fisher_inverse_refuses_bad_damp(damp):
    with pytest.raises(ValueError, match="damp"):
        wk.fisher_inverse(GOOD_GRADS, damp)
    with pytest.raises(ValueError, match="damp"):
        wk.lowrank_inverse(GOOD_GRADS, damp)


def test_fisher_inverse_refuses_bad_num_samples_and_form():
    with pytest.raises(ValueError, match="num_samples"):
        wk.fisher_inverse(GOOD_GRADS, 0.1, num_samples=0)
    with pytest.raises(ValueError, match="form"):
        wk.blockwise_inverse(GOOD_GRADS, 0.1, form="dense")


def test_obs_ops_refuse_bad_inputs():
    inv = _inv()
    w = torch.randn(2, 5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 5\)"):
        wk.obs_saliency(inv, torch.randn(2, 4))
    with pytest.raises(ValueError, match="weights contains NaN"):
        wk.obs_saliency(inv, torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match="loss_grad"):
        wk.obs_saliency(inv, w, torch.randn(3, 5))
    with pytest.raises(ValueError, match="prune_mask must have dtype"):
        wk.obs_update(inv, w, mask.float())
    with pytest.raises(ValueError, match="prune_mask must have shape"):
        wk.obs_update(inv, w, mask[:, :4])
    with pytest.raises(ValueError, match="weights has dtype"):
        wk.obs_update(inv, w.double(), mask)
    _assert_refused(lambda: wk.obs_update(inv, w, mask, backend="nope"), "backend", inv, w, mask)


def test_group_ops_refuse_bad_index():
    inv = _inv()
    w = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"index entries must lie in \[0, 5\)"):
        wk.gather_rows(inv, torch.full((2, 1, 2), 5))
    with pytest.raises(ValueError, match="index must have 2 blocks"):
        wk.gather_subblocks(inv, torch.zeros(3, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="groups must have dtype"):
        wk.group_obs_saliency(inv, w, torch.zeros(2, 1, 2))
    groups = torch.tensor([[[0, 1]], [[2, 3]]])
    with pytest.raises(ValueError, match="prune must have shape"):
        wk.group_obs_update(inv, w, groups, torch.ones(2, 2, dtype=torch.bool))


def test_non_contiguous_inverse_is_updated_in_place():
    inv = _inv().transpose(1, 2)                       # a symmetric view, not contiguous
    expected = inv.contiguous().clone()
    wk.woodbury_update_(expected, GOOD_GRADS, 3.0)
    wk.woodbury_update_(inv, GOOD_GRADS, 3.0)
    assert torch.allclose(inv, expected, atol=1e-6)


def test_huge_finite_inputs_are_not_mistaken_for_inf():
    """The finiteness check sums the input first; a sum that overflows is re-checked entrywise."""
    inv = _inv()
    huge = torch.full((2, 5), 3e38)
    assert wk.obs_update(inv, huge, torch.zeros(2, 5, dtype=torch.bool)).shape == (2, 5)
    with pytest.raises(ValueError, match="weights contains NaN or Inf"):
        wk.obs_update(inv, torch.cat([huge[:, :4], torch.full((2, 1), float("inf"))], 1),
                      torch.zeros(2, 5, dtype=torch.bool))


# The NaN / Inf check of fisher_inverse and woodbury_update_ reads only the blocks the kernel flags
# (woodfisher_kernels._numerics.repair): this holds only if a non-finite entry anywhere in a block's
# inputs always fails that block, on every backend. Planted at random places, in one block of many.
@pytest.mark.parametrize("backend,device", __import__("_shared").marked_backend_params())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_entry_anywhere_is_named_on_every_backend(backend, device, value):
    gen = torch.Generator().manual_seed(0)
    trials = 4 if __import__("_shared").is_interpreted(backend, device) else 12
    for trial in range(trials):
        b, m, c = 5, int(torch.randint(1, 20, (), generator=gen)), int(torch.randint(2, 40, (), generator=gen))
        grads = torch.randn(b, m, c, generator=gen)
        where = tuple(int(torch.randint(0, s, (), generator=gen)) for s in (b, m, c))
        bad = grads.clone()
        bad[where] = value
        _assert_refused(lambda: wk.fisher_inverse(bad.to(device), 1e-2, backend=backend),
                        "grads contains NaN or Inf", bad)
        inv = wk.fisher_inverse(grads.to(device), 1e-2, backend=backend)
        bad_d = bad.to(device)
        _assert_refused(lambda: wk.woodbury_update_(inv, bad_d, float(m), backend=backend),
                        "grads contains NaN or Inf", inv)
        spoiled = inv.clone()
        i, j = (int(torch.randint(0, c, (), generator=gen)) for _ in range(2))
        spoiled[where[0], i, j] = value
        _assert_refused(lambda: wk.woodbury_update_(spoiled, grads.to(device), float(m), backend=backend),
                        "inv contains NaN or Inf", spoiled)
        for on_failure in ("raise", "recompute"):  # a failed block is explained by its input, not by kappa
            _assert_refused(lambda: wk.fisher_inverse(bad.to(device), 1e-2, backend=backend, on_failure=on_failure),
                            "grads contains NaN or Inf", bad)
