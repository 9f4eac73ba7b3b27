"""The fused C kernel (backend "cpu", csrc/cpu/woodbury_cpu.c) against float64 references.

It must compute what the torch fallback computes: the same inverses within the stated
float32 bound, the same failure flags, any block size (padding to 16 / K to 8 is exact),
any number of gradients (remainder chunks), build and update, and a result that does not
depend on how the blocks are split over threads. The op-level tests (test_ops.py,
test_precision_table.py) also run on this backend through ``backend_params``.
"""
from __future__ import annotations

import pytest
import torch

import woodfisher_kernels as wk
from woodfisher_kernels import _cpu, _woodbury, reference, testing

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="the C kernel is not built here (no C compiler)")


def _grads(b, m, c, seed=0, scale=0.1):
    return torch.randn(b, m, c, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("c", [1, 15, 16, 17, 64, 100, 130])
@pytest.mark.parametrize("m", [0, 1, 9, 33])
def test_build_matches_float64_within_the_stated_bound(c, m):
    damp = 1e-2
    grads = _grads(3, m, c, seed=c * 100 + m)
    out, bad = _cpu.woodbury_blocks(grads, max(m, 1), None, damp)
    ref = testing.svd_inverse(grads, damp, max(m, 1))
    assert not bad.any()
    err = testing.spectral_error(out, ref.inverse)
    assert (err <= wk.error_bound(ref.kappa)).all(), (err, wk.error_bound(ref.kappa))
    torch.testing.assert_close(out, out.transpose(1, 2), rtol=0, atol=1e-5 * float(out.abs().max()))


@pytest.mark.parametrize("c,k", [(20, 5), (64, 64), (48, 3)])
@pytest.mark.parametrize("chunk", [1, 8, 13, 64])
def test_update_matches_float64_for_any_chunk(c, k, chunk):
    damp, n = 1e-1, 50.0
    start = _grads(2, 40, c, seed=1)
    inv = _cpu.woodbury_blocks(start, n, None, damp)[0]
    new_grads = _grads(2, k, c, seed=2)
    out, bad = _cpu.woodbury_blocks(new_grads, n, inv, chunk=chunk)
    both = torch.cat([start, new_grads], dim=1)
    ref = testing.svd_inverse(both, damp, n)
    assert not bad.any()
    assert (testing.spectral_error(out, ref.inverse) <= wk.error_bound(ref.kappa)).all()


def test_same_result_as_the_torch_fallback_and_independent_of_threads():
    grads = _grads(7, 40, 72, seed=3)
    one, _ = _cpu.woodbury_blocks(grads, 40.0, None, 1e-3, threads=1)
    split, _ = _cpu.woodbury_blocks(grads, 40.0, None, 1e-3, threads=3)
    assert torch.equal(one, split)                      # blocks are independent: bitwise equal
    torch_out, _ = _woodbury.woodbury_blocks(grads, 40.0, None, 1e-3)
    torch.testing.assert_close(one, torch_out, rtol=1e-4, atol=1e-4 * float(torch_out.abs().max()))


def test_failure_flags_match_the_torch_fallback():
    """An indefinite starting inverse makes S indefinite; a non-finite one gives a non-finite result."""
    c = 24
    inv = torch.eye(c).repeat(4, 1, 1)
    inv[1] = -torch.eye(c)                              # S = N I + G (-I) G^T: indefinite
    inv[2, 3, 5] = inv[2, 5, 3] = float("inf")
    grads = _grads(4, 10, c, seed=4, scale=3.0)
    _, bad = _cpu.woodbury_blocks(grads, 1.0, inv)
    _, bad_torch = _woodbury.woodbury_blocks(grads, 1.0, inv)
    assert bad.tolist() == bad_torch.tolist() == [False, True, True, False]


def test_public_ops_use_it_and_recompute_failed_blocks_in_float64():
    c = 24
    inv = torch.eye(c).repeat(2, 1, 1) * 1e-3
    grads = _grads(2, 6, c, seed=5, scale=1e3)           # kappa ~1e12: float32 rounding may fail blocks
    new = inv.clone()
    wk.woodbury_update_(new, grads, 1.0, backend="cpu")
    ref = torch.linalg.inv(torch.linalg.inv(inv.double()) + grads.double().transpose(1, 2) @ grads.double())
    assert torch.isfinite(new).all() and (torch.diagonal(new, dim1=1, dim2=2) > 0).all()
    assert float(testing.spectral_error(new, ref).max()) < 1e-2
    with pytest.raises(ValueError, match="backend"):
        wk.fisher_inverse(grads.double(), 1e-3, backend="cpu")


@pytest.mark.parametrize("isa", _cpu.ISAS)
def test_every_instruction_set_instance_is_correct(isa):
    """Each compiled instance (AVX-512, AVX2 + FMA, baseline) the CPU runs gives the same inverses."""
    grads = _grads(3, 21, 40, seed=6)
    if _cpu.ISAS.index(isa) > _cpu.ISAS.index(_cpu.best_isa()):
        with pytest.raises(RuntimeError, match="does not support"):
            _cpu.woodbury_blocks(grads, 21.0, None, 1e-2, isa=isa)
        return
    out, bad = _cpu.woodbury_blocks(grads, 21.0, None, 1e-2, isa=isa)
    ref = testing.svd_inverse(grads, 1e-2, 21.0)
    assert not bad.any()
    assert (testing.spectral_error(out, ref.inverse) <= wk.error_bound(ref.kappa)).all()


# ---- the low-rank factor (csrc/cpu/lowrank_cpu_kernel.h) ---------------------------------------------------

@pytest.mark.parametrize("m,c", [(1, 16), (7, 17), (8, 16), (33, 100), (64, 256), (100, 130), (256, 272)])
@pytest.mark.parametrize("damp", [1e-1, 1e-5])
def test_lowrank_factor_matches_float64(m, c, damp):
    """A = L^-1 G and diag(F^-1) against float64; padding of m to 8 and c to 16 is exact."""
    grads = _grads(3, m, c, seed=m * 1000 + c)
    factor, diag, bad = _cpu.lowrank_factor(grads, damp, float(m))
    a64, d64, _ = reference.lowrank_factor(grads.double(), damp, float(m))
    ref = testing.svd_inverse(grads, damp, float(m))
    assert not bad.any()
    assert (testing.diag_error(torch.diag_embed(diag), ref.diag) <= wk.error_bound(ref.kappa)).all()
    assert float((factor.double() - a64).abs().max() / a64.abs().max()) < 1e-5   # A's entries are <= 1


@pytest.mark.parametrize("m,c", [(40, 3300), (64, 4096)])
def test_lowrank_factor_of_wide_blocks_in_column_panels(m, c):
    """Blocks wider than one ~256 KiB panel (whole layers) are summed panel by panel: same result."""
    grads = _grads(2, m, c, seed=12)
    factor, diag, bad = _cpu.lowrank_factor(grads, 1e-1, float(m))
    a64, d64, _ = reference.lowrank_factor(grads.double(), 1e-1, float(m))
    assert not bad.any()
    assert float(((diag.double() - d64) / d64).abs().max()) < 1e-5
    assert float((factor.double() - a64).abs().max() / a64.abs().max()) < 1e-5


def test_lowrank_factor_is_the_torch_one_and_independent_of_threads():
    grads = _grads(9, 40, 96, seed=7)
    one = _cpu.lowrank_factor(grads, 1e-3, 40.0, threads=1)
    split = _cpu.lowrank_factor(grads, 1e-3, 40.0, threads=4)
    assert all(torch.equal(x, y) for x, y in zip(one, split))
    torch_factor, torch_diag, _ = reference.lowrank_factor(grads, 1e-3, 40.0)
    torch.testing.assert_close(one[0], torch_factor, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one[1], torch_diag, rtol=1e-4, atol=0)


def test_lowrank_failure_flags_match_the_torch_implementation():
    """NaN, Inf and float32 overflow in a block's gradients flag that block only, as in torch."""
    grads = _grads(5, 12, 32, seed=8)
    grads[1, 3, 4] = float("nan")
    grads[2, 0, 0] = float("inf")
    grads[3] *= 1e25                                   # squares overflow float32: the Gram is Inf
    bad = _cpu.lowrank_factor(grads, 1e-2, 12.0)[2]
    bad_torch = reference.lowrank_factor(grads, 1e-2, 12.0)[2]
    assert bad.tolist() == bad_torch.tolist() == [False, True, True, True, False]


@pytest.mark.parametrize("isa", _cpu.ISAS)
def test_lowrank_every_instruction_set_instance(isa):
    grads = _grads(2, 24, 80, seed=9)
    if _cpu.ISAS.index(isa) > _cpu.ISAS.index(_cpu.best_isa()):
        with pytest.raises(RuntimeError, match="does not support"):
            _cpu.lowrank_factor(grads, 1e-2, 24.0, isa=isa)
        return
    diag = _cpu.lowrank_factor(grads, 1e-2, 24.0, isa=isa)[1]
    ref = testing.svd_inverse(grads, 1e-2, 24.0)
    assert (testing.diag_error(torch.diag_embed(diag), ref.diag) <= wk.error_bound(ref.kappa)).all()


def test_lowrank_beyond_the_kernel_limit_uses_torch(monkeypatch):
    grads = _grads(2, 20, 64, seed=10)
    monkeypatch.setattr(_cpu, "MAX_LOWRANK_GRADS", 16)
    assert all(torch.equal(x, y) for x, y in zip(_cpu.lowrank_factor(grads, 1e-2, 20.0),
                                                 reference.lowrank_factor(grads, 1e-2, 20.0)))


def test_public_lowrank_inverse_runs_the_kernel_on_cpu_float32():
    grads = _grads(4, 16, 48, seed=11)
    expected = _cpu.lowrank_factor(grads, 1e-2, 16.0)
    for backend in ("auto", "cpu"):
        inv = wk.lowrank_inverse(grads, 1e-2, backend=backend)
        assert torch.equal(inv.factor, expected[0]) and torch.equal(inv.diag(), expected[1])
    assert torch.equal(wk.lowrank_inverse(grads, 1e-2, backend="torch").factor,
                       reference.lowrank_factor(grads, 1e-2, 16.0)[0])
    assert torch.equal(wk.blockwise_inverse(grads, 1e-2, form="lowrank", backend="cpu").factor, expected[0])
    with pytest.raises(ValueError, match="backend"):
        wk.lowrank_inverse(grads.double(), 1e-2, backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        wk.lowrank_inverse(grads, 1e-2, backend="gpu")


def test_raw_kernels_refuse_other_dtypes_instead_of_reading_garbage():
    grads = _grads(2, 4, 32, seed=13)
    with pytest.raises(ValueError, match="float32"):
        _cpu.lowrank_factor(grads.double(), 1e-2, 4.0)
    with pytest.raises(ValueError, match="float32"):
        _cpu.woodbury_blocks(grads.half(), 4.0, None, 1e-2)
    with pytest.raises(ValueError, match="float32"):
        _cpu.woodbury_blocks(grads, 4.0, torch.eye(32, dtype=torch.float64).repeat(2, 1, 1))


def test_a_kernel_built_without_its_c_entry_points_falls_back_to_torch(monkeypatch):
    """A library that loads but lacks the wf_* symbols (the C file compiled as C++ by torch's
    BuildExtension once did this) makes the backend unavailable with a warning, not an error."""
    import ctypes.util
    import importlib.util
    import types

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a library without the entry points")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(origin=libm)
                        if name.endswith("._cpu_kernels") else real_find_spec(name, *a))
    _cpu._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="unusable .*torch fallback"):
            assert not _cpu.available()
    finally:
        monkeypatch.undo()
        _cpu._library.cache_clear()
    assert _cpu.available()
