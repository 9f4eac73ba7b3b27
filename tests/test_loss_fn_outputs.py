"""A caller's loss_fn: the outputs it receives (whole_outputs), and a weight regulariser it cannot add to the
Fisher; per-sample gradients against a float64 torch.func reference."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import woodfisher as wf
from woodfisher.losses import whole_outputs


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.cls, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.cls(h), self.aux(h)


def _aux_loss(outputs, target):
    logits, aux = outputs
    return nn.functional.cross_entropy(logits, target) + aux.pow(2).mean()


def _data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)], x, y


def test_whole_outputs_gives_loss_fn_the_tuple_and_the_per_sample_gradients_of_that_loss():
    torch.manual_seed(0)
    model = TwoHeads()
    loader, x, y = _data()
    curv = wf.estimate_curvature(model, loader, loss_fn=whole_outputs(_aux_loss), num_grads=24, block_size=None,
                                 damp=1e-3, progress=False)
    m64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m64.named_parameters()}

    def loss(p, xi, yi):
        return _aux_loss(functional_call(m64, p, (xi[None].double(),)), yi[None])
    ref = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for name in ("body.weight", "cls.weight", "aux.weight"):
        got = curv.grads[name].transpose(0, 1).reshape(24, -1)[:, : params[name].numel()].double()
        assert torch.allclose(got, ref[name].reshape(24, -1), rtol=1e-4, atol=1e-6), name
    assert ref["aux.weight"].abs().sum() > 0  # the auxiliary term reaches its head


def test_loss_fn_given_the_predictions_only_says_how_to_get_the_whole_outputs():
    loader, _, _ = _data()
    with pytest.raises(ValueError, match=r"received the predictions only .*whole_outputs"):
        wf.prune_one_shot(TwoHeads(), loader, sparsity=0.5, loss_fn=_aux_loss, num_grads=24, progress=False)


def test_whole_outputs_refuses_a_non_callable():
    with pytest.raises(ValueError, match="loss_fn"):
        whole_outputs(3)


def test_a_weight_regulariser_in_loss_fn_is_named_in_a_warning_and_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    loader, _, _ = _data()

    def regularised(out, target):
        return nn.functional.cross_entropy(out, target) + 1e-2 * sum(p.pow(2).sum() for p in model.parameters())
    opts = dict(num_grads=24, block_size=8, damp=1e-3, progress=False)
    with pytest.warns(UserWarning, match="left out of the Fisher"):
        with_reg = wf.estimate_curvature(model, loader, loss_fn=regularised, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loss of the outputs only: no notice
        plain = wf.estimate_curvature(model, loader, loss_fn=nn.functional.cross_entropy, **opts)
    assert all(torch.equal(with_reg.grads[n], plain.grads[n]) for n in plain.grads)
