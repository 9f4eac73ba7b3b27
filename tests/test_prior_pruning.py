"""Models as users bring them from other pruning tools: already pruned by ``torch.nn.utils.prune`` (global then
layerwise masks on top, ``prune.remove`` on some layers), sparse by plain zeros, or with a mask parametrization;
re-pruned to a higher sparsity. The existing zeros count toward the target and stay zero, and the reported sparsity
is the fraction of zeros counted independently (float64) over the pruned weights."""
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from torch import nn

import woodfisher as wf


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 12), nn.ReLU(),
                         nn.Linear(12, 5))


def _loader(n=32):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _zero_fraction(model):
    """Zeros of the weights the forward uses (``weight`` after the masks' hooks / parametrizations), in float64."""
    weights = [m.weight.detach().double() for m in _layers(model)]
    return sum(float((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_torch_prune_masks_global_then_layerwise_count_and_stay_pruned():
    model = _model()
    conv, fc1, fc2 = _layers(model)
    prune.global_unstructured([(conv, "weight"), (fc1, "weight"), (fc2, "weight")],
                              pruning_method=prune.L1Unstructured, amount=0.3)
    prune.l1_unstructured(fc1, "weight", amount=0.5)  # a PruningContainer on fc1
    prune.remove(conv, "weight")  # conv: plain zeros now, fc1 / fc2: hooks
    before = [(m.weight == 0).clone() for m in _layers(model)]
    start = _zero_fraction(model)
    res = wf.prune_one_shot(model, _loader(), sparsity=0.7, num_grads=32, num_steps=1, progress=False)
    assert start > 0.3  # the existing masks count toward the target: no more than 0.7 - start is pruned anew
    assert abs(res.sparsity - _zero_fraction(model)) < 1e-12
    assert abs(res.sparsity - 0.7) < 1.0 / sum(m.weight.numel() for m in _layers(model))
    for layer, old in zip(_layers(model), before):
        assert not (old & (layer.weight != 0)).any()  # never revived
    assert prune.is_pruned(model) and not hasattr(conv, "weight_mask")
    for layer in (fc1, fc2):  # the masks the hooks apply are the result's
        assert torch.equal(layer.weight_mask.bool(), layer.weight != 0)


def test_plain_zeros_and_a_mask_parametrization_count_and_stay_pruned():
    class Mask(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w):
            return w * self.mask

    model = _model()
    conv, fc1, fc2 = _layers(model)
    with torch.no_grad():
        conv.weight[:, :, 0] = 0
    parametrize.register_parametrization(fc1, "weight", Mask((torch.rand(fc1.weight.shape) > 0.5).float()))
    before = [(m.weight == 0).clone() for m in _layers(model)]
    res = wf.prune_one_shot(model, _loader(), sparsity=0.75, num_grads=32, num_steps=1, progress=False)
    assert abs(res.sparsity - _zero_fraction(model)) < 1e-12
    for layer, old in zip(_layers(model), before):
        assert not (old & (layer.weight != 0)).any()
    assert torch.equal(fc1.parametrizations.weight[0].mask.bool(), fc1.weight != 0)


def test_a_state_dict_of_a_pruned_model_loaded_into_a_fresh_instance_prunes_further():
    model = _model()
    wf.prune_one_shot(model, _loader(), sparsity=0.5, num_grads=32, num_steps=1, progress=False)
    fresh = _model(seed=3)
    fresh.load_state_dict(model.state_dict())
    before = [(m.weight == 0).clone() for m in _layers(fresh)]
    res = wf.prune_one_shot(fresh, _loader(), sparsity=0.8, num_grads=32, num_steps=1, progress=False)
    assert abs(res.sparsity - _zero_fraction(fresh)) < 1e-12
    for layer, old in zip(_layers(fresh), before):
        assert not (old & (layer.weight != 0)).any()


def test_per_weight_sparsities_are_one_call_per_group():
    """What the dict refusal says to do gives each named weight its sparsity and leaves the others alone."""
    model = _model()
    conv, fc1, fc2 = _layers(model)
    wf.prune_one_shot(model, _loader(), sparsity=0.9, modules=["3"], num_grads=32, num_steps=1, progress=False)
    kept_fc1 = fc1.weight.detach().clone()
    wf.prune_one_shot(model, _loader(), sparsity=0.5, modules=["0"], num_grads=32, num_steps=1, progress=False)
    assert torch.equal(fc1.weight, kept_fc1)
    for layer, want in ((fc1, 0.9), (conv, 0.5)):
        assert abs(float((layer.weight == 0).double().mean()) - want) <= 1.0 / layer.weight.numel()
    assert not (fc2.weight == 0).any()


def test_min_density_counts_live_entries_of_a_weight_pruned_below_the_floor_before():
    """fc2 came at 90%; min_density=0.3 cannot refill it: the call still reaches the sparsity exactly (the floor
    does not spend the budget on entries already pruned), the others keep their floor, and a warning says so."""
    import pytest

    for method in ("global_magnitude", "woodfisher"):
        model = _model()
        conv, fc1, fc2 = _layers(model)
        with torch.no_grad():
            fc2.weight[:, :11] = 0  # 55 of 60 entries
        total = sum(m.weight.numel() for m in _layers(model))
        with pytest.warns(UserWarning, match=r"min_density=0.3 cannot be kept in \['5.weight'\]"):
            res = wf.prune_one_shot(model, _loader(), sparsity=0.6, min_density=0.3, method=method, num_grads=32,
                                    num_steps=1, progress=False)
        assert abs(res.sparsity - _zero_fraction(model)) < 1e-12
        assert int(round(res.sparsity * total)) == int(round(0.6 * total))  # the target, not more
        assert int((fc2.weight != 0).sum()) == 5
        for layer in (conv, fc1):
            assert int((layer.weight != 0).sum()) >= 0.3 * layer.weight.numel()


def test_the_floor_is_exact_against_an_independent_selection():
    """select_masks with a floor and prior masks equals a float64 reference built by hand."""
    torch.manual_seed(0)
    scores = {"a": torch.rand(40, dtype=torch.float64), "b": torch.rand(20, dtype=torch.float64)}
    pruned = {"a": torch.ones(40, dtype=torch.bool), "b": torch.arange(20) < 2}  # b keeps 2 of 20
    masks = wf.select_masks(scores, 0.5, "global", min_density=0.25, pruned=pruned)
    # reference: b keeps its 2 live entries (floor 5 capped at 2), a keeps its 10 best, then 18 more by score
    a_floor = set(scores["a"].argsort(descending=True)[:10].tolist())
    rest = sorted([(float(scores["a"][i]), "a", i) for i in range(40) if i not in a_floor], reverse=True)[:18]
    want_a = a_floor | {i for _, _, i in rest}
    assert set(masks["a"].nonzero().flatten().tolist()) == want_a
    assert masks["b"].nonzero().flatten().tolist() == [0, 1]
    assert int(masks["a"].sum()) + int((masks["b"] & pruned["b"]).sum()) == 30


def test_a_weight_empty_before_the_call_is_not_told_to_use_min_density():
    import warnings

    model = _model()
    conv = _layers(model)[0]
    prune.l1_unstructured(conv, "weight", amount=1.0)  # collapsed by an earlier run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, None, method="global_magnitude", sparsity=0.6, progress=False)
    said = [str(w.message) for w in caught if str(w.message).startswith("layer collapse")]
    assert res.collapsed == ["0.weight"] and len(said) == 1
    assert "['0.weight'] were so before this call (zeros are never revived)" in said[0]
    assert "min_density" not in said[0]


def test_the_sharded_selection_counts_the_floor_over_live_entries_too():
    """select_sharded (one process, no group) equals select_masks on weights pruned below the floor before."""
    from woodfisher.distributed.select import select_sharded

    torch.manual_seed(1)
    scores = {"a": torch.rand(40, dtype=torch.float64), "b": torch.rand(20, dtype=torch.float64)}
    pruned = {"a": torch.rand(40) > 0.2, "b": torch.arange(20) < 3}
    want = wf.select_masks(scores, 0.6, "global", min_density=0.3, pruned=pruned)
    masked = [scores[n].masked_fill(~pruned[n], float("-inf")) for n in scores]
    got = select_sharded(masked, [torch.arange(s.numel()) for s in masked], [40, 20], 0.6, "global", 0.3)
    for name, flags in zip(scores, got):
        assert torch.equal(flags & pruned[name], want[name] & pruned[name]), name


def test_layerwise_prunes_each_weight_to_the_target_when_the_overall_start_is_above_it():
    """fc1 came at 90% (the overall sparsity is then above 0.6): layerwise 0.6 prunes every other weight to 0.6
    (the overall start sparsity is no per-weight floor: it used to prune each to ~0.8), fc1 keeps its zeros."""
    import pytest

    for method, options in (("magnitude", {}), ("woodfisher", {"mode": "layerwise", "num_steps": 3})):
        model = _model()
        conv, fc1, fc2 = _layers(model)
        with torch.no_grad():
            fc1.weight[:, :130] = 0  # 130 of 144 columns
        zeros_fc1 = int((fc1.weight == 0).sum())
        with pytest.warns(UserWarning, match=r"sparsity=0.6 \(mode='layerwise'\) is below the zeros \['3.weight'\]"):
            res = wf.prune_one_shot(model, _loader(), sparsity=0.6, method=method, num_grads=32, progress=False,
                                    **options)
        assert abs(res.sparsity - _zero_fraction(model)) < 1e-12
        assert int((fc1.weight == 0).sum()) == zeros_fc1
        for layer in (conv, fc2):
            assert int((layer.weight == 0).sum()) == round(0.6 * layer.weight.numel())
