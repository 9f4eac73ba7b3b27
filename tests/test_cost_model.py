"""The cost model behind backend="auto" (woodfisher_kernels._cost): CPU tests of its decisions.

The model's predicted times decide; these tests check the rules it must follow (nothing
more than 2x slower than the best candidate; the order of the ranking), the decisions a
roofline argument fixes (the fused kernels win where they keep the block on chip; the
one-CTA-per-block tiled kernel loses when blocks are fewer than SMs), and that the model's
geometry matches the kernels' launch rules. The model's agreement with the compiled
kernels' resources is checked by python -m benchmarks.static_model --check in CI.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from woodfisher_kernels import _cost, _dispatch
from woodfisher_kernels._triton import woodbury as triton_wb

ALL = ("cuda", "triton", "torch")
SHAPES = list(itertools.product((7, 50, 64, 128, 200, 256, 1000, 1448), (1, 16, 80, 400, 1024),
                                (1, 8, 200, 100_000)))


def _times(op, shape, k=None, spec=_cost.H100, names=ALL):
    return {n: _cost.predict(op, n, shape, k, spec).seconds for n in names}


@pytest.mark.parametrize("op", ["fisher_inverse", "woodbury_update_"])
def test_ranking_is_by_predicted_time_and_drops_slow_candidates(op):
    for c, m, b in SHAPES:
        shape, k = ((b, m, c), None) if op == "fisher_inverse" else ((b, c, c), m)
        ranked = _cost.rank(op, shape, k, torch.device("cpu"), ALL)
        times = _times(op, shape, k)
        best = min(times.values())
        assert ranked and set(ranked) <= set(ALL)
        assert times[ranked[0]] == best
        assert [times[n] for n in ranked] == sorted(times[n] for n in ranked)
        assert all(times[n] <= _cost.MAX_SLOWDOWN * best for n in ranked)
        assert all(n in ranked for n in ALL if times[n] <= _cost.MAX_SLOWDOWN * best)


def test_rank_keeps_only_candidates():
    assert _cost.rank("fisher_inverse", (4, 16, 64), None, torch.device("cpu"), ("torch",)) == ["torch"]
    assert _cost.rank("fisher_inverse", (4, 16, 64), None, torch.device("cpu"), ()) == []
    assert set(_cost.rank("obs_update", (4, 64, 64), None, torch.device("cpu"), ("triton", "torch"))) <= {
        "triton", "torch"}


@pytest.mark.parametrize("c", [50, 64, 128, 200])
@pytest.mark.parametrize("m", [1, 16, 130, 1024])
def test_fused_cuda_kernel_first_while_the_block_stays_on_chip(c, m):
    """c <= the shared-memory limit: F is read once and written once; it beats the
    per-chunk cuBLAS form (F through memory per chunk) and the Triton kernels."""
    b = 25_557_032 // c
    assert _cost.cuda_path(c, m) == "shared"
    assert _cost.rank("fisher_inverse", (b, m, c), None, torch.device("cpu"), ALL)[0] == "cuda"
    assert _cost.rank("woodbury_update_", (b, c, c), m, torch.device("cpu"), ALL)[0] == "cuda"


def test_tiled_cuda_kernel_dropped_when_blocks_leave_sms_idle():
    """One CTA per block: 4 blocks of 1024 use 4 of 132 SMs; cuBLAS uses all of them."""
    shape = (4, 1024, 1024)
    times = _times("fisher_inverse", shape)
    assert times["cuda"] > _cost.MAX_SLOWDOWN * times["torch"]
    assert "cuda" not in _cost.rank("fisher_inverse", shape, None, torch.device("cpu"), ALL)


def test_streaming_single_gradient_is_memory_bound():
    """k = 1: every backend is bound by moving F; the fused kernel moves it once."""
    for c in (64, 128):
        preds = {n: _cost.predict("woodbury_update_", n, (100_000, c, c), 1) for n in ALL}
        assert all(p.bound == "memory" for p in preds.values())
        assert preds["cuda"].bytes <= min(p.bytes for p in preds.values())


def test_predictions_scale_with_the_work():
    small = _cost.predict("fisher_inverse", "cuda", (10_000, 64, 64))
    large = _cost.predict("fisher_inverse", "cuda", (10_000, 128, 64))
    assert large.flops == pytest.approx(2 * small.flops)
    assert large.seconds > small.seconds
    assert _cost.predict("fisher_inverse", "cuda", (10_000, 64, 64), spec=_cost.H200).seconds <= small.seconds


def test_model_geometry_follows_the_launch_rules():
    """Chunk widths and Triton variants as the kernels choose them."""
    assert [_cost.chunk_width(k) for k in (1, 4, 5, 31, 32, 33, 1000)] == [4, 4, 8, 32, 32, 32, 32]
    assert _cost.cuda_path(128, 1000) == "shared" and _cost.cuda_path(256, 1) == "tiled"
    shared_max = max(c for c in range(1, 400) if _cost.cuda_shared_smem(c, 32) <= _cost.H100.smem_optin)
    assert _cost.cuda_path(shared_max, 1000) == "shared" and _cost.cuda_path(shared_max + 1, 1000) == "tiled"
    for c in (7, 50, 64, 65, 1000):
        assert triton_wb.use_tiled(c) == (max(16, 1 << (c - 1).bit_length()) > 64)


def test_dispatch_uses_the_model_on_cuda_float32(monkeypatch):
    """select(auto) asks rank() for CUDA float32 tensors (a stand-in tensor type here)."""
    calls = []

    def fake_rank(op, shape, num_grads, device, candidates):
        calls.append((op, shape, num_grads, tuple(candidates)))
        return ["torch"]

    class FakeCuda:
        is_cuda, dtype, shape, device = True, torch.float32, (3, 5, 64), torch.device("cpu")

    monkeypatch.setattr(_cost, "rank", fake_rank)
    impl = _dispatch.select("woodbury_update_", "auto", FakeCuda(), 5)
    assert impl is _dispatch.implementations("woodbury_update_")["torch"]
    assert calls == [("woodbury_update_", (3, 5, 64), 5, tuple(_dispatch.available("woodbury_update_")))]
