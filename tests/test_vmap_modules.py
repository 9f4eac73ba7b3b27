"""BatchNorm as a per-channel affine map under vmap (woodfisher.vmap_modules): the same per-sample gradients as a
float64 autograd loop over single samples, fewer dispatched operators, and the model left as it was."""
from __future__ import annotations

import pytest
import torch
from _dispatch import OperatorCount
from torch import nn

import woodfisher as wf
from woodfisher.targets import resolve_targets
from woodfisher.vmap_modules import batch_norm_as_affine


def _with_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters (not the identity a fresh layer has)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(c, generator=g, dtype=m.running_var.dtype) + 0.5)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.randn(c, generator=g, dtype=m.weight.dtype))
                    m.bias.copy_(torch.randn(c, generator=g, dtype=m.bias.dtype))
    return model.eval()


MODELS = {
    "bn1d_flat": lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)),
    "bn1d_seq": lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(4 * 4, 3)),
    "bn2d_no_affine": lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                                            nn.Flatten(), nn.Linear(4 * 9, 3)),
    "bn3d": lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(2 * 8, 3)),
}
SHAPES = {"bn1d_flat": (6,), "bn1d_seq": (2, 6), "bn2d_no_affine": (2, 5, 5), "bn3d": (1, 3, 3, 3)}


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_gradients_through_batch_norm_equal_a_float64_loop(name):
    torch.manual_seed(0)
    model = _with_stats(MODELS[name]().double())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, *SHAPES[name], generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    targets = resolve_targets(model)
    got = wf.GradientCollector(model, [(x, y)], targets, num_grads=6, progress=False).collect()
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for t in targets:
            torch.testing.assert_close(got[t.name][i], t.param.grad.flatten(), rtol=1e-10, atol=1e-12)
    assert not any("forward" in vars(m) for m in model.modules())  # the model's own forward is back


def test_float32_gradients_match_native_batch_norm_and_the_model_is_restored():
    """float32 ResNet-like block: the affine form and native_batch_norm (the model's own forward, a loop) agree to
    float32 rounding; train mode and a caller-replaced forward are left alone."""
    torch.manual_seed(2)
    model = _with_stats(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    targets = resolve_targets(model)
    got = wf.GradientCollector(model, [(x, y)], targets, num_grads=8, progress=False).collect()
    loop = wf.GradientCollector(model, [(x, y)], targets, num_grads=8, progress=False, fisher_batch_size=1)
    loop._use_vmap = False  # the autograd loop: the model's own forward, native_batch_norm
    ref = loop.collect()
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)
    bn = model[1]
    with batch_norm_as_affine(model):
        assert "forward" in vars(bn)
        bn.train()
        out_train = bn(torch.randn(4, 8, 2, 2))  # batch statistics in train mode: the layer's own forward
        assert torch.allclose(out_train.mean((0, 2, 3)), bn.bias, atol=1e-5)
        bn.eval()
    assert "forward" not in vars(bn)
    replaced = model[4]
    replaced.forward = lambda inp: inp  # the caller's own replacement stays in place
    with batch_norm_as_affine(model):
        assert replaced.forward(torch.ones(1)) == 1
    assert "forward" in vars(replaced)


def test_no_native_batch_norm_under_vmap():
    torch.manual_seed(3)
    model = _with_stats(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(4 * 9, 3)))
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    collector = wf.GradientCollector(model, [(x, y)], resolve_targets(model), num_grads=4, progress=False)
    with OperatorCount() as count:
        collector.collect()
    assert torch.ops.aten.native_batch_norm.default not in count.seen
    assert torch.ops.aten.clone.default not in count.seen  # the batching rule's per-sample copies
    # the per-channel scale and shift are computed once, before the call, for all layers (foreach kernels)
    assert torch.ops.aten.rsqrt.default not in count.seen
    assert torch.ops.aten.sub.Tensor not in count.seen
    assert count.seen[torch.ops.aten._foreach_rsqrt_.default] == 1


def test_a_differentiated_batch_norm_weight_is_not_taken_from_before_the_transform():
    """A layer whose weight is differentiated (``torch.func.grad`` over it) computes its scale inside the transform:
    the gradient is the native layer's (float64 autograd as the reference), not the one of a constant scale."""
    torch.manual_seed(4)
    bn = _with_stats(nn.BatchNorm2d(3).double())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    weight = bn.weight.detach().clone()

    def loss(w):
        return torch.func.functional_call(bn, {"weight": w}, (x,)).square().sum()

    with batch_norm_as_affine(bn):  # scale and shift computed from the layer's own tensors
        got = torch.func.grad(loss)(weight)
    want = torch.autograd.grad(bn(x).square().sum(), bn.weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_folded_output_equals_the_layer_own_eval_output(affine):
    """``x * scale + shift`` with the scale and shift computed before the block is the layer's eval-mode output
    (float64), for the model's own tensors (``state=None``)."""
    torch.manual_seed(6)
    model = _with_stats(nn.Sequential(nn.BatchNorm2d(3, affine=affine), nn.BatchNorm1d(4, eps=1e-3)).double())
    x2, x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    want = model[0](x2), model[1](x1)
    with batch_norm_as_affine(model), OperatorCount() as count:
        got = model[0](x2), model[1](x1)
    assert torch.ops.aten.native_batch_norm.default not in count.seen
    assert torch.ops.aten.rsqrt.default not in count.seen
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
