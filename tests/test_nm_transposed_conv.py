"""N:M on a transposed convolution named in ``modules=`` is refused: its weight is (in, out, *kernel) and the
runs, laid out along dim 1 like a convolution's input channels, went along its *output* channels (not the sum
a 2:4 sparse tensor core reduces over), while ``pattern_violations`` reported 0."""
import pytest
import torch
from torch import nn

import woodfisher as wf


class _Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Conv1d(8, 16, 3, padding=1)
        self.up = nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1)

    def forward(self, x):
        return self.up(torch.relu(self.pre(x)))


def _loader():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 8, 10, generator=gen), torch.randn(4, 8, 20, generator=gen)) for _ in range(4)]


def test_nm_on_a_transposed_conv_is_refused_before_anything_changes():
    torch.manual_seed(0)
    model = _Upsampler()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"pattern '2:4': \['up.weight'\] are transposed-convolution weights"):
        wf.prune_one_shot(model, _loader(), pattern="2:4", modules=["pre", "up"], num_grads=16,
                          loss_fn=nn.functional.mse_loss, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    res = wf.prune_one_shot(model, _loader(), pattern="2:4", modules=["pre"], num_grads=16,
                            loss_fn=nn.functional.mse_loss, progress=False)   # the conv alone: its input channels
    runs = (model.pre.weight != 0).reshape(16, 2, 4, 3).sum(2)
    assert res.sparsity == pytest.approx(0.5) and int(runs.max()) == 2 and int(runs.min()) == 2
    unstructured = wf.prune_one_shot(_Upsampler(), _loader(), sparsity=0.5, modules=["up"], num_grads=16,
                                     loss_fn=nn.functional.mse_loss, progress=False)
    assert unstructured.sparsity == pytest.approx(0.5, abs=0.01)
