"""Property-based tests (hypothesis) for blocking, padding and shapes."""
from __future__ import annotations

import torch
from _shared import dense_inverse, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import woodfisher_kernels as wk


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 300), c=st.integers(1, 64), lead=st.integers(1, 3))
def test_blocks_roundtrip_and_padding(d, c, lead):
    x = torch.randn(lead, d)
    xb = wk.to_blocks(x, c)
    assert xb.shape == (lead, wk.num_blocks(d, c), c)
    assert torch.equal(wk.from_blocks(xb, d), x)
    valid = wk.valid_mask(d, c)
    assert int(valid.sum()) == d
    assert torch.all(xb[:, ~valid] == 0)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 40), c=st.integers(1, 16), m=st.integers(1, 20),
       damp=st.floats(0.05, 5.0), seed=st.integers(0, 2 ** 16))
def test_padded_blocks_equal_unpadded_inverse(d, c, m, damp, seed):
    """Each real sub-block of the padded blockwise inverse equals the inverse built from
    that block's real entries alone; padded rows and columns are exactly I / damp."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(m, d, generator=gen, dtype=torch.float64)
    grads = wk.to_blocks(flat, c).transpose(0, 1).contiguous()
    inv = wk.fisher_inverse(grads, damp)
    valid = wk.valid_mask(d, c)
    for b in range(grads.shape[0]):
        n_real = int(valid[b].sum())
        ref = dense_inverse(flat[None, :, b * c: b * c + n_real], damp)[0]
        assert rel_err(inv[b, :n_real, :n_real], ref) <= 1e-10
        pad = inv[b, n_real:, :]
        expected = torch.zeros_like(pad)
        expected[:, n_real:] = torch.eye(c - n_real, dtype=torch.float64) / damp
        assert torch.allclose(pad, expected, rtol=1e-12, atol=0)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 4), c=st.integers(1, 24), k1=st.integers(1, 10), k2=st.integers(1, 10))
def test_streaming_updates_compose(b, c, k1, k2):
    """Updating with k1 then k2 gradients equals one update with all k1 + k2."""
    grads = torch.randn(b, k1 + k2, c, dtype=torch.float64)
    whole = wk.fisher_inverse(grads, 0.3, num_samples=7.0)
    inv = torch.eye(c, dtype=torch.float64).repeat(b, 1, 1) / 0.3
    wk.woodbury_update_(inv, grads[:, :k1].contiguous(), 7.0)
    wk.woodbury_update_(inv, grads[:, k1:].contiguous(), 7.0)
    assert rel_err(inv, whole) <= 1e-10
