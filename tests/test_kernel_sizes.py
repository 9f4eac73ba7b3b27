"""Bytes budgets: one parser (woodfisher_kernels.sizes) for the kernel library and the pruner alike."""
from __future__ import annotations

import pytest
import torch

import woodfisher_kernels as wk
from woodfisher import PruneConfig
from woodfisher.memory import parse_bytes as pruner_parse_bytes

SPELLINGS = [("1GB", 10**9), ("512MiB", 512 * 2**20), ("1.5 GB", 1_500_000_000), ("4gib", 4 * 2**30),
             ("2e9", 2 * 10**9), (" 3 KiB ", 3 * 1024), ("7B", 7), ("1TB", 10**12), ("10", 10)]
BAD = ["1 GX", "abc", "", "-1GB", "1,5GB", "GB", "0", "0MiB"]


def test_the_pruner_uses_the_kernel_librarys_parser():
    assert pruner_parse_bytes is wk.parse_bytes


@pytest.mark.parametrize("text,expect", SPELLINGS)
def test_every_spelling_means_the_same_bytes_everywhere(text, expect):
    assert wk.parse_bytes(text) == expect
    assert PruneConfig(sparsity=0.5, memory_budget=text).memory_budget == expect
    # choose_form: the string and the number pick the same form (and refuse the same budgets)
    for m, c, b in ((8, 64, 3), (64, 8, 3), (1000, 1000, 50)):
        try:
            want = wk.choose_form(m, c, b, expect)
        except ValueError as err:
            with pytest.raises(ValueError, match="memory_budget") as got:
                wk.choose_form(m, c, b, text)
            assert str(got.value) == str(err)
        else:
            assert wk.choose_form(m, c, b, text) == want


def test_a_string_budget_decides_the_form_at_its_byte_boundary():
    """m = 8, c = 64, B = 3, float32: the form cheaper in flops is kept while it fits the budget, and a budget
    below both forms is refused; the boundaries are the documented byte counts (c^2 and m c + m^2 per block)."""
    m, c, b = 8, 64, 3
    seq, lowrank = b * c * c * 4, b * (m * c + m * m) * 4
    preferred = wk.choose_form(m, c, b)
    need = lowrank if preferred == "lowrank" else seq
    assert wk.choose_form(m, c, b, f"{need}B") == preferred
    with pytest.raises(ValueError, match="memory_budget"):
        wk.choose_form(m, c, b, f"{min(seq, lowrank) - 1}B")


def test_blockwise_inverse_takes_a_string_budget():
    g = torch.randn(2, 8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    by_string = wk.blockwise_inverse(g, 0.1, memory_budget="1MiB")
    by_number = wk.blockwise_inverse(g, 0.1, memory_budget=2**20)
    assert type(by_string) is type(by_number)
    dense = lambda inv: inv if isinstance(inv, torch.Tensor) else inv.dense()  # noqa: E731
    ref = torch.linalg.inv(0.1 * torch.eye(64, dtype=torch.float64) + g.transpose(1, 2) @ g / 8)
    torch.testing.assert_close(dense(by_string), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad", BAD)
def test_bad_budgets_are_refused_naming_the_argument(bad):
    g = torch.randn(2, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="memory_budget"):
        wk.choose_form(8, 16, 2, bad)
    for form in ("auto", "sequential", "lowrank"):
        with pytest.raises(ValueError, match="memory_budget"):
            wk.blockwise_inverse(g, 0.1, form=form, memory_budget=bad)
    with pytest.raises(ValueError, match="memory_budget"):
        PruneConfig(sparsity=0.5, memory_budget=bad)
