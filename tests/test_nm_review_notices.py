"""N:M checks and the notices around them, as a new user meets them: ``pattern_violations`` on any weight,
``estimate_memory`` of a call the pattern refuses, ``prune_with`` on a curvature estimated without the pattern,
the frozen-weight hint, custom layers named, and refusals that print no notice first."""
import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf
import woodfisher_kernels as wk
from woodfisher.export import pattern_violations


def _violations_reference(weight: torch.Tensor, n: int, m: int) -> int:
    """Loop over every (out, kernel position, group of m input channels) run; independent of the reshape."""
    w = weight if weight.dim() > 2 else weight.unsqueeze(-1)
    count = 0
    for o in range(w.shape[0]):
        for pos in itertools.product(*(range(k) for k in w.shape[2:])):
            for start in range(0, w.shape[1], m):
                run = [w[(o, start + i) + pos] for i in range(m)]
                count += sum(bool(v != 0) for v in run) > n
    return count


@pytest.mark.parametrize("shape", [(3, 8), (4, 8, 3, 3), (2, 12, 3), (2, 4, 2, 1, 2)])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (1, 2)])
def test_pattern_violations_counts_the_input_channel_runs(shape, n, m):
    torch.manual_seed(0)
    weight = torch.randn(shape) * (torch.rand(shape) < 0.6)
    assert pattern_violations(weight, n, m) == _violations_reference(weight, n, m)
    assert pattern_violations(weight, f"{n}:{m}") == _violations_reference(weight, n, m)


def test_pattern_violations_refuses_runs_that_do_not_exist_and_bad_patterns():
    # 6 input channels, 2x2 kernel: 24 entries per filter, whose reshape into runs of 4 used to succeed silently
    with pytest.raises(ValueError, match=r"weight of shape \(4, 6, 2, 2\) has 6 input channels per group"):
        pattern_violations(torch.randn(4, 6, 2, 2))
    with pytest.raises(ValueError, match=r"3 input channels per group"):
        pattern_violations(torch.randn(8, 3, 3, 3))          # a stem conv (was a RuntimeError of reshape)
    with pytest.raises(ValueError, match=r"6 entries per row"):
        pattern_violations(torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"^weight must be"):
        pattern_violations(torch.randn(8))
    for args in [(3, 2), (2, 0), (0, 4), (True, 4), (2.0, 4)]:
        with pytest.raises(ValueError, match=r"^n and m must be integers with 0 < n < m"):
            pattern_violations(torch.randn(4, 8), *args)
    for text in ("rows", "2-4", "4:2"):
        with pytest.raises(ValueError, match=r"^(n must be|pattern)"):
            pattern_violations(torch.randn(4, 8), text)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def _data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    return [(x[i:i + 8], y[i:i + 8]) for i in (0, 8)]


def test_estimate_memory_reports_the_refusal_of_named_weights_the_pattern_does_not_fit():
    torch.manual_seed(0)
    model = _Net()
    with pytest.raises(ValueError) as refused:
        wf.prune_one_shot(model, _data(), pattern="2:4", modules=["stem"], num_grads=16, progress=False)
    est = wf.estimate_memory(model, pattern="2:4", modules=["stem"], num_grads=16)
    assert est["plan"] is None and est["refused"] == str(refused.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stem left dense: said by the call
        est = wf.estimate_memory(model, pattern="2:4", num_grads=16)
    assert est["refused"] is None and est["plan"] == "keep"
    assert est["pruned_weights"] == model.conv.weight.numel() + model.fc.weight.numel()


def test_prune_with_on_a_curvature_without_the_pattern_says_to_estimate_with_it():
    torch.manual_seed(0)
    model = _Net()
    curv = wf.estimate_curvature(model, _data(), num_grads=16, progress=False)  # the stem included, (out, in, k)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"estimate the curvature with pattern='2:4'"):
        wf.prune_with(model, curv, 0.5, pattern="2:4", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x):
        return nn.functional.linear(x, self.w)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(8, 8) for _ in range(5))
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.custom = _Custom()
        self.up = nn.ConvTranspose1d(1, 1, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for layer in (self.a, self.b, self.c, self.d, self.e, self.frozen, self.custom):
            x = torch.tanh(layer(x))
        return self.head(x + self.up(x.unsqueeze(1)).squeeze(1))


def test_the_frozen_weight_hint_selects_the_trainable_default_targets_only():
    torch.manual_seed(0)
    model = _Mixed()
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wf.prune_one_shot(model, data, sparsity=0.5, num_grads=16, num_steps=1, progress=False)
    frozen = [str(w.message) for w in caught if "are frozen" in str(w.message)]
    assert len(frozen) == 1
    hint = frozen[0].split("pass modules=", 1)[1]
    chosen = eval(hint, {"woodfisher": wf, "model": model})  # the hint is code the user pastes
    assert sorted(chosen) == sorted(f"{n}.weight" for n in ("a", "b", "c", "d", "e", "head"))
    # the custom layer's `w` (a leaf module's matrix under another name than `weight`) is named as left out
    left = [str(w.message) for w in caught if "not pruned by default" in str(w.message)]
    assert len(left) == 1 and "'custom (_Custom)'" in left[0] and "'up (ConvTranspose1d)'" in left[0]


def test_refused_calls_print_no_pattern_notice_first():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any notice before the refusal fails the test
        with pytest.raises(ValueError, match="^loader must be an iterable"):
            wf.prune_one_shot(_Net(), 5, pattern="2:4", progress=False)
        with pytest.raises(ValueError, match="^loader must be an iterable"):
            wf.estimate_curvature(_Net(), 5, pattern="2:4", progress=False)
        with pytest.raises(ValueError, match="fixes the sparsity of every pruning step"):
            wf.GradualPruner(_Net(), _data(), final_sparsity=0.5, pattern="2:4", end_step=2)


@pytest.mark.parametrize("text", ["0GB", "0.4B"])
def test_a_size_string_of_zero_bytes_is_refused_naming_the_string(text):
    with pytest.raises(ValueError, match=rf"memory_budget must be at least 1 byte, got '{text}'"):
        wk.choose_form(8, 16, memory_budget=text)
    with pytest.raises(ValueError, match=rf"memory_budget must be at least 1 byte, got '{text}'"):
        wf.PruneConfig(sparsity=0.5, memory_budget=text)   # the pruner's field, the same message
    assert wf.PruneConfig(sparsity=0.5, memory_budget="1.5 KiB").memory_budget == 1536


def test_fisher_hook_refuses_named_weights_the_pattern_does_not_fit():
    model = _Net()
    with pytest.raises(ValueError, match=r"pattern '2:4': layer 'stem\.weight' has 3 input channels per group"):
        wf.FisherHook(model, num_grads=4, damp=1e-3, pattern="2:4", modules=["stem"])
    hook = wf.FisherHook(model, num_grads=4, damp=1e-3, pattern="2:4", modules=["conv"])
    assert [t.name for t in hook.targets] == ["conv.weight"]


def test_prune_with_names_the_pattern_a_curvature_carries_and_pattern_none_leaves_it():
    torch.manual_seed(0)
    model = _Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stem left dense
        curv = wf.estimate_curvature(model, _data(), pattern="2:4", num_grads=16, damp=1e-3, block_size=None,
                                     progress=False)  # whole-weight blocks: the same Fisher in another order
    with pytest.raises(ValueError, match=r"^sparsity=0\.7: the curvature was estimated with pattern='2:4'.*"
                                         r"pass pattern=None"):
        wf.prune_with(model, curv, 0.7, progress=False)
    nm = wf.prune_with(copy.deepcopy(model), curv, 0.5, progress=False)          # the curvature's 2:4
    assert pattern_violations(nm.masks["conv.weight"].float(), 2, 4) == 0
    plain = copy.deepcopy(model)
    res = wf.prune_with(plain, curv, 0.7, pattern=None, progress=False)         # unstructured, same blocks
    reference = copy.deepcopy(model)
    ref_curv = wf.estimate_curvature(reference, _data(), modules=["conv", "fc"], num_grads=16, damp=1e-3,
                                     block_size=None, progress=False)
    ref = wf.prune_with(reference, ref_curv, 0.7, progress=False)
    assert res.masks.keys() == ref.masks.keys()
    assert all(torch.equal(res.masks[n], ref.masks[n]) for n in ref.masks)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain.parameters(), reference.parameters()))


def test_search_damp_takes_the_sparsity_an_nm_pattern_fixes_as_prune_one_shot_does():
    torch.manual_seed(0)
    model = _Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stem left dense
        best, losses = wf.search_damp(model, _data(), _data(), pattern="2:4", modules=["conv", "fc"], num_grads=16,
                                      grid=[1e-4, 1e-2], progress=False)
    assert best in losses and sorted(losses) == [1e-4, 1e-2]
    with pytest.raises(ValueError, match=r"^sparsity is required"):
        wf.search_damp(model, _data(), _data(), num_grads=16, progress=False)


def test_a_budget_that_fits_neither_form_is_said_in_whole_bytes():
    with pytest.raises(ValueError, match=r"^memory_budget=2048 bytes fits neither form: sequential needs 4096"):
        wk.choose_form(64, 32, memory_budget="2 KiB")


class _TakesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, inp, mask=None):
        return self.fc(inp) if mask is None else self.fc(inp) * mask[:, None]


class _TakesOnlyInput(_TakesInput):
    def forward(self, inp):
        return self.fc(inp)


@pytest.mark.parametrize("model_type, placed", [
    (_TakesInput, "args=(b['pixel_values'],), kwargs={'mask': b['mask']}, target=b['labels'])"),
    (_TakesOnlyInput, "args=(b['pixel_values'],), target=b['labels']) (mask left out: forward takes no more")])
def test_the_batch_adapter_hint_of_a_dict_batch_follows_the_forward_signature(model_type, placed):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    loader = [dict(pixel_values=x[i:i + 8], mask=torch.rand(8, generator=gen), labels=y[i:i + 8]) for i in (0, 8)]
    with pytest.raises(ValueError, match="does not take pixel_values=") as info:
        wf.prune_one_shot(model_type(), loader, sparsity=0.5, num_grads=16, progress=False)
    hint = str(info.value).split("batch_adapter=", 1)[1]
    assert hint.startswith("lambda b: woodfisher.Batch(" + placed)
    adapter = eval(hint.split(" (")[0] if "left out" in hint else hint, {"woodfisher": wf})  # pasted as it is
    model = model_type()
    res = wf.prune_one_shot(model, loader, sparsity=0.5, num_grads=16, progress=False, batch_adapter=adapter)
    assert res.sparsity == pytest.approx(0.5, abs=0.01)


def test_pattern_with_steps_or_woodtaylor_names_the_option():
    with pytest.raises(ValueError, match=r"^num_steps=3 with pattern='2:4'"):
        wf.PruneConfig(pattern="2:4", num_steps=3)
    with pytest.raises(ValueError, match=r"^woodtaylor=True with pattern='rows'"):
        wf.PruneConfig(sparsity=0.5, pattern="rows", woodtaylor=True)


def test_prune_config_takes_the_sparsity_a_pattern_fixes_and_names_a_missing_one():
    assert wf.PruneConfig(pattern="1:4").sparsity == 0.75
    with pytest.raises(ValueError, match=r"^sparsity is required"):   # was a TypeError of the dataclass
        wf.PruneConfig(method="magnitude")


@pytest.mark.parametrize("form", ["sequential", "lowrank"])
def test_a_forced_inverse_form_is_held_to_the_memory_budget(form):
    grads = torch.randn(2, 16, 64, dtype=torch.float64)
    need = {"sequential": 2 * 64 * 64 * 8, "lowrank": 2 * (16 * 64 + 16 * 16) * 8}   # B c^2 and B (m c + m^2)
    with pytest.raises(ValueError, match=rf"^memory_budget={need[form] - 1} bytes: form='{form}' needs {need[form]}"):
        wk.blockwise_inverse(grads, 1e-3, form=form, memory_budget=need[form] - 1)   # was: silently over it
    inv = wk.blockwise_inverse(grads, 1e-3, form=form, memory_budget=f"{need[form]}B")
    dense = inv if form == "sequential" else inv.dense()
    eye = torch.eye(64, dtype=torch.float64)
    fisher = 1e-3 * eye + grads.transpose(1, 2) @ grads / 16
    torch.testing.assert_close(dense @ fisher, eye.expand(2, -1, -1), atol=1e-8, rtol=0)


def test_beta_with_an_nm_pattern_is_refused_as_it_changes_nothing():
    with pytest.raises(ValueError, match=r"^beta=1 has no effect with pattern='2:4'"):
        wf.PruneConfig(pattern="2:4", beta=1.0)
    assert wf.PruneConfig(pattern="2:4", beta=0.0).beta == 0.0
    assert wf.PruneConfig(sparsity=0.5, pattern="rows", beta=1.0).beta == 1.0   # rows are weighed by FLOPs
