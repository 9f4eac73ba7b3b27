"""The public masks helpers refuse malformed input with a ValueError naming the argument."""
import pytest
import torch

import woodfisher as wf


@pytest.mark.parametrize("scores, pruned, match", [
    ([torch.randn(4, 4)], None, "scores must be a dict"),
    ({"a": [1.0, 2.0]}, None, "scores must be a dict"),
    ({}, None, "scores is empty"),
    ({"a": torch.randn(4, 4)}, [torch.ones(4, 4, dtype=torch.bool)], "pruned must be a dict"),
    ({"a": torch.randn(4, 4)}, {"a": torch.ones(3, dtype=torch.bool)}, r"pruned\['a'\].*\(4, 4\)"),
    ({"a": torch.randn(4, 4)}, {"a": torch.ones(4, 4)}, r"pruned\['a'\] must be a bool"),
], ids=["list", "not-tensors", "empty", "pruned-list", "pruned-shape", "pruned-float"])
def test_select_masks_refuses_malformed_input(scores, pruned, match):
    with pytest.raises(ValueError, match=match):
        wf.select_masks(scores, 0.5, pruned=pruned)


def test_select_masks_keeps_pruned_entries_pruned():
    scores = {"a": torch.arange(8.0).reshape(2, 4)}
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, 3] = False  # the highest score, pruned before
    masks = wf.select_masks(scores, 0.5, pruned={"a": keep})  # 4 of 8 kept: the 4 best live scores, 3 to 6
    assert masks["a"].tolist() == [[False, False, False, True], [True, True, True, False]]


def test_sparsity_of_counts_zeros_and_is_zero_without_entries():
    assert wf.sparsity_of({}) == 0.0  # as documented: 0.0 for no entries (it returned 1.0)
    assert wf.sparsity_of({"a": torch.zeros(0, dtype=torch.bool)}) == 0.0
    mask = torch.tensor([True, False, False, True])
    assert wf.sparsity_of({"a": mask, "b": torch.ones(4, dtype=torch.bool)}) == pytest.approx(2 / 8)
    assert wf.sparsity_of({"a": mask.float()}) == pytest.approx(0.5)
