"""nn.MultiheadAttention reads its projection weights directly (never calling out_proj), so no export can swap
them for sparse layers: to_sparse / 2:4 leave them dense with one warning naming the modules and their zero
fractions, and the CLI's summary reports them as left dense (not silently absent)."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.export.cli import _converted


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.att(x, x, x, need_weights=False)[0].mean(1))


def _zero(weight: torch.Tensor, fraction: float) -> None:
    """Exactly ``fraction`` of the entries set to zero (the first ones in storage order)."""
    with torch.no_grad():
        weight.view(-1)[: round(fraction * weight.numel())] = 0


def _model(attention_zeros=(0.75, 0.875)):
    torch.manual_seed(0)
    model = Attn().eval()
    _zero(model.att.in_proj_weight, attention_zeros[0])
    _zero(model.att.out_proj.weight, attention_zeros[1])
    _zero(model.fc.weight, 0.75)
    return model


def _export(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = wf.export.to_sparse(model, **kw)
    return out, [str(w.message) for w in caught if "MultiheadAttention" in str(w.message)]


def test_to_sparse_names_the_attention_left_dense():
    model = _model()
    out, said = _export(model)
    assert isinstance(out.fc, wf.export.SparseLinear) and isinstance(out.att, nn.MultiheadAttention)
    assert len(said) == 1 and "'att (in_proj_weight 75.0% zeros, out_proj.weight 87.5% zeros)'" in said[0]
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)


def test_dense_attention_below_the_threshold_is_not_reported():
    _, said = _export(_model((0.25, 0.5)))          # min_sparsity 0.7: dense anyway, nothing to say
    assert not said
    _, said = _export(_model((0.0, 0.0)), min_sparsity=0.0)
    assert not said                                 # no zero at all


def test_cli_summary_counts_the_attention_as_left_dense():
    model = _model()
    args = argparse.Namespace(format="csr", min_sparsity=0.7, conv=False)
    exported, _ = _export(model)
    line = _converted(exported, model, args)
    assert line == ("converted to csr: fc (75.0% zeros); left dense (nn.MultiheadAttention reads its weights "
                    "directly): att (in_proj_weight 75.0% zeros, out_proj.weight 87.5% zeros)")
    dense = _model()
    with pytest.raises(ValueError) as info:
        _converted(dense, dense, argparse.Namespace(format="csr", min_sparsity=0.8, conv=False))
    # the sparsest convertible layer is fc (75%), not the attention's out_proj (87.5%, never converted)
    assert str(info.value) == ("--format csr converted no layer, nothing written: no Linear layer has >= 0.8 zeros "
                               "(--min-sparsity; the sparsest: fc, 75.0%); nn.MultiheadAttention weights stay dense "
                               "(read directly by attention): att (in_proj_weight 75.0% zeros, out_proj.weight 87.5% "
                               "zeros)")


@pytest.mark.parametrize("name", ["att", "att.in_proj_weight", "att.out_proj", "att.out_proj.weight"])
def test_naming_the_attention_or_its_projections_says_why_it_stays_dense(name):
    shown = name.removesuffix(".weight")   # a module's weight is named by its module
    with pytest.raises(ValueError, match=rf"names: '{shown}' belongs to an nn.MultiheadAttention, which reads"):
        wf.export.to_sparse(_model(), names=[name])
