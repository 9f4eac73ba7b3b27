"""The training-loop Fisher (woodfisher.hooks.FisherHook) against a one-shot build from the same gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import woodfisher_kernels as wk
from woodfisher import attach_masks, prune_with
from woodfisher.hooks import FisherHook
from woodfisher.targets import resolve_targets


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 5))
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, 10, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(12)]
    return model, data


def _train(model, data, hook, steps):
    """SGD steps; returns {name: (used steps, numel)} the gradients the hook should have seen."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.attach(opt)
    seen = {t.name: [] for t in hook.targets}
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if not hook.ready and i % hook.every == 0:
            for t in hook.targets:
                seen[t.name].append((t.param.grad * hook.keep[t.name]).reshape(-1).clone())
        opt.step()
    hook.detach()
    return {n: torch.stack(v) for n, v in seen.items()}


def _reference(hook, grads, name):
    """float64 (damp I + G^T G / N)^-1 of the recorded gradients, blockwise."""
    layout = [t for t in hook.targets if t.name == name][0]
    return wk.fisher_inverse(layout.grad_blocks(grads[name].double()), hook.config.damp, hook.config.num_grads,
                             backend="torch")


@pytest.mark.parametrize("block_size,buffer,every", [(16, 5, 1), (None, 4, 2), (7, 12, 1)])
def test_hook_inverses_equal_a_one_shot_build_from_the_same_gradients(block_size, buffer, every):
    model, data = _setup()
    hook = FisherHook(model, num_grads=12, damp=1e-2, block_size=block_size, buffer=buffer, every=every)
    grads = _train(model, data, hook, steps=12 * every + 5)   # more steps than the window: the rest is ignored
    assert hook.ready and hook.count == 12
    curv = hook.curvature()
    for name, inv in curv.inverses.items():
        assert grads[name].shape[0] == 12
        ref = _reference(hook, grads, name)
        err = (inv.double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (name, float(err))


def test_partial_window_is_flushed_and_normalised_by_num_grads():
    model, data = _setup(1)
    hook = FisherHook(model, num_grads=10, damp=1e-2, block_size=8, buffer=4)
    grads = _train(model, data, hook, steps=6)   # 6 of 10: one launch of 4 + 2 buffered
    assert not hook.ready and hook.count == 6
    curv = hook.curvature()
    for name, inv in curv.inverses.items():
        ref = _reference(hook, grads, name)       # N = 10 with 6 gradients
        assert torch.allclose(inv.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_pruned_weights_stay_out_and_prune_with_uses_the_window():
    model, data = _setup(2)
    with torch.no_grad():
        model[0].weight[:, :3] = 0.0                  # already pruned: zero gradients in the Fisher
    hook = FisherHook(model, num_grads=8, damp=1e-2, block_size=10, buffer=3)
    grads = _train(model, data, hook, steps=8)
    assert torch.all(grads["0.weight"].view(8, 16, 10)[:, :, :3] == 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune_with(model, hook.curvature(), 0.6)
    assert abs(res.sparsity - 0.6) < 0.01
    assert not res.masks["0.weight"][:, :3].any()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # OBS moved weights


def test_gradual_loop_with_masks_held_by_torch_prune():
    """Prune, hold the masks with torch.nn.utils.prune, reset, keep training, prune again."""
    model, data = _setup(3)
    hook = FisherHook(model, num_grads=6, damp=1e-2, block_size=16, buffer=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook.attach(opt)
    done = []
    for i in range(30):
        x, y = data[i % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if hook.ready:
            target = [0.3, 0.6][len(done)] if len(done) < 2 else None
            if target is not None:
                res = prune_with(model, hook.curvature(), target)
                attach_masks(model, res.masks)
                done.append(res.sparsity)
                hook.reset()   # new window on the reparametrised weights
    assert len(done) == 2 and done[1] > done[0]
    targets = resolve_targets(model, None)
    sparsity = 1 - sum(int(t.keep_mask().sum()) for t in targets) / sum(t.numel for t in targets)
    assert abs(sparsity - 0.6) < 0.01   # pruned weights stayed 0 through the later training steps


def test_hook_refuses_bad_arguments():
    model, _ = _setup()
    for kwargs, field in ((dict(num_grads=0, damp=1e-3), "num_grads"), (dict(num_grads=4, damp="auto"), "damp"),
                          (dict(num_grads=4, damp=1e-3, buffer=5), "buffer"),
                          (dict(num_grads=4, damp=1e-3, every=0), "every")):
        with pytest.raises(ValueError, match=field):
            FisherHook(model, **kwargs)
    with pytest.raises(ValueError, match="no gradient"):
        FisherHook(model, num_grads=4, damp=1e-3).curvature()


def test_fine_tuning_example_reaches_its_sparsity():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "gradual_with_fisher_hook.py"
    spec = importlib.util.spec_from_file_location("gradual_with_fisher_hook", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--pretrain-epochs", "8", "--epochs", "4", "--prune-every", "2", "--num-grads", "16",
                        "--final-sparsity", "0.8"])
    sparsities = [s for _, s, _ in out["history"]]
    assert len(sparsities) == 2 and sparsities[0] < sparsities[1]
    assert abs(sparsities[-1] - 0.8) < 1e-3
    assert out["final"] > 0.5   # far above chance (0.1) after fine-tuning at 80% sparsity


@pytest.mark.parametrize("damp,warns", [(1e-2, False), (1e-6, True)])
def test_hook_reports_kappa_bound_and_warns_beyond_the_float32_level(damp, warns):
    """The running inverses stay float32 (no kept gradients to recompute them from): ``curv.kappa`` is an upper
    bound of the float64 kappa of every block, and eps32 * kappa > 1e-3 is a warning naming the weights."""
    import warnings

    model, data = _setup()
    hook = FisherHook(model, num_grads=12, damp=damp, block_size=16, buffer=5)
    grads = _train(model, data, hook, steps=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curv = hook.curvature()
    messages = [str(w.message) for w in caught if "FisherHook" in str(w.message)]
    assert bool(messages) == warns
    for target in hook.targets:
        g = target.grad_blocks(grads[target.name].double())
        exact = torch.linalg.eigvalsh(g.transpose(1, 2) @ g / 12)[:, -1].max() / damp   # float64 kappa
        assert exact <= curv.kappa[target.name] <= exact * 12 * 1.01      # a bound, within rank(G) of it
        level = torch.finfo(torch.float32).eps * curv.kappa[target.name] > 1e-3
        assert (repr(target.name) in messages[0]) == level if warns else not level
