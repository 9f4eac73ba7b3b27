"""The stated float32 accuracy as a function of kappa, on every backend of this process.

Against a float64 reference built from the SVD of the gradients (``testing.svd_inverse``;
a dense float64 inverse is itself wrong at these condition numbers), over the table
c in {64, 257}, m in {c/2, 2c+1}, damp in {1e-8, 1e-5, 1e-1}, gradient scale in
{1e-6, 1, 1e6}, Gaussian and rank-1 gradients, for the one-shot build (``fisher_inverse``),
the streaming build (``woodbury_update_`` in chunks of 64 from I/damp) and the low-rank
form (``lowrank_inverse``, forced also for m > c; on the backends with a low-rank factor,
torch and the C kernel). Contract (woodfisher_kernels._numerics):

- a returned inverse is finite, has a positive diagonal, and its per-block relative
  errors (largest diagonal entry; spectral norm) are <= ``error_bound(kappa)``
  (8 eps32 (1 + kappa)), failed blocks having been recomputed in float64;
- a ValueError (naming damp and kappa) only where float64 cannot do it either
  (``error_bound(kappa, float64) >= 1``), or, for the streaming update whose running
  inverse is stored in float32, where float32 cannot (``error_bound(kappa) >= 1``).

Triton runs in its interpreter on the CPU, so it gets one block and a subset of the table
(c = 64 at four (damp, scale) pairs, streaming without rank-1, plus one c = 257 case); the
torch backend runs the whole table on two blocks (cuda and triton too on a GPU).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from _shared import backend_params, is_interpreted

import woodfisher_kernels as wk
from woodfisher_kernels import testing

TRITON_SUBSET = {(1e-8, 1e-6), (1e-5, 1.0), (1e-1, 1e6), (1e-8, 1.0)}      # (damp, scale) on c = 64


def _cases():
    for (backend, device), (c, m, damp, scale, rank1) in itertools.product(backend_params(),
                                                                           testing.precision_cases()):
        if (backend, device) == ("torch", "cuda"):
            continue                                    # same code as torch on the CPU
        forms = testing.FORMS if backend in testing.LOWRANK_BACKENDS else ("build", "stream")
        if is_interpreted(backend, device):
            small = c == 64 and (damp, scale) in TRITON_SUBSET
            one_big = (c, m, damp, scale, rank1) == (257, 128, 1e-5, 1.0, False)
            if not (small or one_big):
                continue
            forms = ("build",) if one_big or rank1 else ("build", "stream")
        for form in forms:
            yield pytest.param(backend, device, form, c, m, damp, scale, rank1,
                               id=f"{backend}-{form}-c{c}-m{m}-d{damp:g}-s{scale:g}{'-rank1' if rank1 else ''}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN from a kernel: recomputed
@pytest.mark.parametrize("backend,device,form,c,m,damp,scale,rank1", list(_cases()))
def test_stated_accuracy_or_stated_error(backend, device, form, c, m, damp, scale, rank1):
    grads = testing.synthetic_grads(1 if is_interpreted(backend, device) else 2, m, c, scale, rank1)
    ref = testing.svd_inverse(grads, damp)
    kappa = float(ref.kappa.max())
    try:
        inv = testing.build_inverse(form, grads.to(device), damp, backend).cpu()
    except ValueError as exc:
        limit_dtype = torch.float32 if form == "stream" else torch.float64
        assert wk.error_bound(kappa, limit_dtype) >= 1.0, f"refused at kappa {kappa:.3g}: {exc}"
        assert "damp" in str(exc) and "kappa" in str(exc)
        return
    assert bool(torch.isfinite(inv).all())
    assert bool((torch.diagonal(inv, dim1=1, dim2=2) > 0).all())
    bound = wk.error_bound(ref.kappa, torch.float32)
    diag_err = testing.diag_error(inv, ref.diag)
    norm_err = testing.spectral_error(inv, ref.inverse)
    assert bool((diag_err <= bound).all()), f"diag error {diag_err.tolist()} > bound {bound.tolist()}"
    assert bool((norm_err <= bound).all()), f"spectral error {norm_err.tolist()} > bound {bound.tolist()}"


def test_the_table_reaches_every_regime():
    """The table covers accurate float32, float32 failures recomputed in float64, and refusals."""
    kappas = [float(testing.svd_inverse(testing.synthetic_grads(1, m, c, s, r), d).kappa.max())
              for c, m, d, s, r in testing.precision_cases(block_sizes=(64,))]
    bounds = [wk.error_bound(k) for k in kappas]
    assert min(bounds) < 1e-5 and any(1e-3 < b < 1 for b in bounds)
    assert any(b >= 1 and wk.error_bound(k, torch.float64) < 1e-3 for k, b in zip(kappas, bounds))
    assert any(wk.error_bound(k, torch.float64) >= 1 for k in kappas)


def test_condition_estimate_brackets_the_exact_kappa():
    for c, m, damp, scale, rank1 in testing.precision_cases(block_sizes=(64,), damps=(1e-5,)):
        grads = testing.synthetic_grads(2, m, c, scale, rank1)
        exact = testing.svd_inverse(grads, damp).kappa
        est = wk.condition_estimate(grads, damp)
        upper = wk.condition_estimate(grads, damp, upper=True)
        assert bool((est <= exact * (1 + 1e-4)).all()) and bool((est >= 0.9 * exact).all())
        assert bool((upper >= exact * (1 - 1e-4)).all()) and bool((upper <= min(m, c) * exact * 1.001).all())
