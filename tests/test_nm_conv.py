"""N:M on convolutions groups M consecutive INPUT CHANNELS at every (out, *kernel position): the layout of the
2:4 sparse tensor cores (a conv is an implicit GEMM with K = (*kernel, in), channels last). Every entry point
that takes an N:M pattern is checked against that property, and the group OBS choice and update of a conv
against a float64 dense reference built here from per-sample gradients."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from _pruner_shared import per_sample_grads
from torch import nn

import woodfisher as wf
from woodfisher.export import pattern_violations

DAMP = 1e-2


def _channel_runs(keep: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in, *kernel) keep-mask -> kept entries of every run of m consecutive input channels at each
    (out, *kernel), written independently of the package: loop over the kernel positions."""
    out, cin = keep.shape[:2]
    counts = []
    for pos in itertools.product(*(range(k) for k in keep.shape[2:])):
        column = keep[(slice(None), slice(None)) + pos]            # (out, in) at this kernel position
        counts.append(column.reshape(out, cin // m, m).sum(-1))
    return torch.stack(counts)


def _assert_channel_nm(masks, model, n=2, m=4):
    """The conv ``model[0]`` (its effective weight, masks applied) keeps exactly n of every m input channels."""
    keep = masks["0.weight"]
    counts = _channel_runs(keep, m)
    assert torch.all(counts == n), counts.unique()              # exactly N kept: the pattern fixes it
    assert torch.equal(model[0].weight != 0, keep)              # the zeros are written in the weight


def _conv_net(conv: nn.Module, flat: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(flat, 4)).double()


def _data(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g))
            for _ in range(3)]


CASES = {
    "conv2d": (lambda: nn.Conv2d(8, 16, 3), (8, 5, 5), 16 * 3 * 3),
    "conv1d": (lambda: nn.Conv1d(8, 8, 3), (8, 6), 8 * 4),
    "grouped": (lambda: nn.Conv2d(8, 8, 3, groups=2), (8, 4, 4), 8 * 2 * 2),
    "conv3d": (lambda: nn.Conv3d(4, 4, 2), (4, 3, 3, 3), 4 * 2 * 2 * 2),
}


def _case(kind):
    make, shape, flat = CASES[kind]
    return _conv_net(make(), flat), _data(shape)


ENTRIES = {
    "woodfisher": dict(method="woodfisher"),
    "woodfisher_eq18": dict(method="woodfisher", group_exact=False),
    "woodfisher_blocks": dict(method="woodfisher", block_size=8),
    "woodfisher_no_update": dict(method="woodfisher", obs_update=False),
    "magnitude": dict(method="magnitude"),
}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_one_shot_nm_groups_input_channels(kind, entry):
    model, loader = _case(kind)
    res = wf.prune_one_shot(model, loader, pattern="2:4", num_grads=16, damp=DAMP, progress=False,
                            modules=["0.weight"], **ENTRIES[entry])
    _assert_channel_nm(res.masks, model)
    assert pattern_violations(model[0].weight) == 0


def test_two_phase_nm_groups_input_channels():
    model, loader = _case("conv2d")
    curv = wf.estimate_curvature(model, loader, pattern="2:4", num_grads=16, damp=DAMP, progress=False,
                                 modules=["0.weight"])
    res = wf.prune_with(model, curv, 0.5)
    _assert_channel_nm(res.masks, model)


def test_gradual_nm_groups_input_channels():
    model, loader = _case("conv2d")
    pruner = wf.GradualPruner(model, loader, final_sparsity=0.5, initial_sparsity=0.5, start_step=0, end_step=2,
                              frequency=1, pattern="2:4", num_grads=16, damp=DAMP, progress=False,
                              modules=["0.weight"])
    for step in range(3):
        pruner.step(step)
        _assert_channel_nm({"0.weight": model[0].weight != 0}, model)


# ---- float64 reference: group OBS choice and joint update of a conv -------------------------------------------

def _reference_blocks(shape, c):
    """Storage indices of each Fisher block: the entries whose rank in (out, *kernel, in) order falls in the same
    c-run (index arithmetic over the storage order, not the package's layout code)."""
    out, cin, kh, kw = shape
    rank = {}
    for o, i, a, b in itertools.product(range(out), range(cin), range(kh), range(kw)):
        storage = ((o * cin + i) * kh + a) * kw + b
        rank[storage] = ((o * kh + a) * kw + b) * cin + i
    blocks = {}
    for storage, r in rank.items():
        blocks.setdefault(r // c, []).append(storage)
    return [sorted(v, key=rank.get) for _, v in sorted(blocks.items())]


def _channel_groups(shape, m):
    """Storage indices of every run of m consecutive input channels at a fixed (out, kh, kw)."""
    out, cin, kh, kw = shape
    return [[((o * cin + i) * kh + a) * kw + b for i in range(start, start + m)]
            for o, a, b in itertools.product(range(out), range(kh), range(kw)) for start in range(0, cin, m)]


@pytest.mark.parametrize("block_size", [8, None])
def test_conv_group_obs_matches_float64_reference(block_size):
    """Each block's Fisher damp I + G^T G / m is built here from per-sample gradients; in every run of 4 input
    channels the pair with the least ``w_Q^T ([F^-1]_QQ)^-1 w_Q / 2`` is removed, and each block's removed set Q
    at once: ``dw = -F^-1 E_Q ([F^-1]_QQ)^-1 w_Q`` (WoodFisher paper, Sec. 4.2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 4)).double()
    loader, m = _data((4, 3, 3)), 24
    ref = copy.deepcopy(model)
    res = wf.prune_one_shot(model, loader, pattern="2:4", num_grads=m, damp=DAMP, block_size=block_size,
                            modules=["0.weight"], progress=False)
    grads = per_sample_grads(ref, loader, ["0.weight"], m)["0.weight"]          # (m, numel), storage order
    w = ref[0].weight.detach().flatten()
    shape = tuple(ref[0].weight.shape)
    blocks = _reference_blocks(shape, block_size or w.numel())
    block_of = {idx: k for k, block in enumerate(blocks) for idx in block}
    invs = []
    for block in blocks:
        g = grads[:, block]
        invs.append(torch.linalg.inv(DAMP * torch.eye(len(block), dtype=torch.float64) + g.T @ g / m))
    removed = {k: [] for k in range(len(blocks))}
    for group in _channel_groups(shape, 4):
        k = block_of[group[0]]
        assert all(block_of[idx] == k for idx in group)                            # a run never crosses a block
        pos = [blocks[k].index(idx) for idx in group]
        pairs = list(itertools.combinations(range(4), 2))
        stats = []
        for pair in pairs:
            q = [pos[j] for j in pair]
            wq = w[[blocks[k][p] for p in q]]
            stats.append(0.5 * wq @ torch.linalg.solve(invs[k][q][:, q], wq))
        removed[k] += [pos[j] for j in pairs[int(torch.stack(stats).argmin())]]
    expect = w.clone()
    for k, q in removed.items():
        wb = w[blocks[k]]
        dw = -invs[k][:, q] @ torch.linalg.solve(invs[k][q][:, q], wb[q])
        new = wb + dw
        new[q] = 0.0
        expect[blocks[k]] = new
    assert torch.equal(res.masks["0.weight"].flatten(), expect != 0)
    torch.testing.assert_close(model[0].weight.detach().flatten(), expect, rtol=0, atol=1e-9)


# ---- layout, refusals, other entry points ----------------------------------------------------------------------

def test_channels_last_layout_round_trips_and_aligns_gradients_with_weights():
    conv = nn.Conv2d(8, 4, (2, 3)).double()
    target = wf.resolve_targets(conv, block_size=8, channels_last=True)[0]
    w = conv.weight.detach()
    flat = target.canonical(w)
    assert torch.equal(flat, w.permute(0, 2, 3, 1).flatten())                 # (out, kh, kw, in)
    assert torch.equal(target.unblock(target.blocks(w)), w)
    grads = torch.stack([w, 2 * w])                                            # two "samples"
    assert torch.equal(target.grad_blocks(grads)[:, 1], 2 * target.blocks(w))  # gradient blocks = weight blocks
    plain = wf.resolve_targets(conv, block_size=8)[0]                          # unstructured: (out, in, kh, kw)
    assert not plain.channels_last and torch.equal(plain.canonical(w), w.flatten())


def test_linear_and_hf_conv1d_runs_stay_along_in():
    class Conv1D(nn.Module):  # HuggingFace's GPT-2 Conv1D: weight (in, out), y = x @ W + b
        def __init__(self, nf, nx):
            super().__init__()
            self.nf, self.weight, self.bias = nf, nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            return x @ self.weight + self.bias

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Conv1D(4, 8)).double()
    data = [(torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))) for _ in range(3)]
    res = wf.prune_one_shot(model, data, pattern="2:4", num_grads=16, damp=DAMP, progress=False)
    assert torch.all(res.masks["0.weight"].reshape(8, 2, 4).sum(-1) == 2)
    assert torch.all(res.masks["2.weight"].T.reshape(4, 2, 4).sum(-1) == 2)


@pytest.mark.parametrize("method", ["woodfisher", "magnitude"])
def test_depthwise_conv_is_refused_naming_layer_and_pattern(method):
    """One input channel per group cannot hold a run of 4 input channels: a ValueError like other weights that
    do not fit (naming the layer, the pattern and the way out), raised before anything is modified."""
    model = _conv_net(nn.Conv2d(8, 8, 3, groups=8), 8 * 2 * 2)
    loader = _data((8, 4, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"pattern '2:4': layer '0\.weight' has 1 input channels per group .* not "
                                         r"a multiple of 4 .*modules= naming the other 1 weight"):
        wf.prune_one_shot(model, loader, pattern="2:4", method=method, num_grads=16, progress=False)
    with pytest.raises(ValueError, match=r"layer '0\.weight' has 1 input channels per group"):
        wf.estimate_curvature(model, loader, pattern="2:4", num_grads=16, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_prune_with_refuses_conv_nm_on_a_curvature_blocked_without_it():
    model, loader = _case("conv2d")
    before = copy.deepcopy(model.state_dict())
    curv = wf.estimate_curvature(model, loader, num_grads=16, damp=DAMP, progress=False, modules=["0.weight"])
    with pytest.raises(ValueError, match=r"pattern '2:4': the Fisher blocks of conv weight '0\.weight' were built in "
                                         r"\(out, in, \*kernel\) order.*estimate_curvature\(\.\.\., pattern='2:4'\)"):
        wf.prune_with(model, curv, 0.5, pattern="2:4")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    none = wf.estimate_curvature(model, None, method="magnitude", modules=["0.weight"], progress=False)
    res = wf.prune_with(model, none, 0.5, pattern="2:4")       # no Fisher blocks: the pattern sets the order
    _assert_channel_nm(res.masks, model)


def test_fisher_hook_with_pattern_prunes_conv_along_input_channels():
    model, loader = _case("conv2d")
    hooks = {p: wf.FisherHook(model, num_grads=8, damp=DAMP, block_size=8, modules=["0.weight"], pattern=p)
             for p in (None, "2:4")}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)                          # lr 0: the weights stay
    for hook in hooks.values():
        hook.attach(opt)
    for x, y in loader:
        for i in range(x.shape[0]):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            opt.step()
    with pytest.raises(ValueError, match="estimate the curvature with pattern='2:4'"):
        wf.prune_with(model, hooks[None].curvature(), 0.5, pattern="2:4")
    res = wf.prune_with(model, hooks["2:4"].curvature(), 0.5)
    _assert_channel_nm(res.masks, model)


@pytest.mark.parametrize("block_size", ["auto", 128, 8, None])
def test_every_resnet20_conv_past_the_stem_gets_a_valid_nm_block(block_size):
    """ResNet-20 under 2:4: every 3x3 and 1x1 shortcut conv (16 / 32 / 64 input channels) and the fc take it with
    auto and explicit block sizes; the stem (3 input channels) is refused by name."""
    from woodfisher.models import resnet20

    model = resnet20()
    for num_grads in ((8, 100, 1000) if block_size == "auto" else (16,)):
        config = wf.PruneConfig(sparsity=0.5, pattern="2:4", block_size=block_size, num_grads=num_grads)
        names = [t.name for t in wf.resolve_targets(model) if t.name != "conv1.weight"]
        targets = wf.resolve_targets(model, names, config.fisher_block_size, channels_last=config.channels_last)
        config.method_impl.check_targets(targets, config)
        assert all(t.block_size % 4 == 0 and t.channels_last == (t.kind == "conv") for t in targets)
        with pytest.raises(ValueError, match=r"layer 'conv1\.weight' has 3 input channels per group"):
            config.method_impl.check_targets(wf.resolve_targets(model, None, config.fisher_block_size,
                                                                channels_last=True), config)


def test_pattern_violations_checks_input_channel_runs_of_a_conv():
    """A conv weight 2:4 along kw (the old grouping) but not along input channels is reported, and one 2:4 along
    input channels passes; a Linear weight's runs stay along its rows."""
    keep_kw = torch.zeros(2, 4, 1, 4, dtype=torch.bool)
    keep_kw[..., :2] = True                                  # every run of 4 along kw keeps 2 ...
    w = keep_kw.double()
    assert pattern_violations(w.flatten(1).view(2, 16)) == 0  # ... as row-major runs of the flattening
    assert pattern_violations(w) == 2 * 2                    # channel runs at kw 0, 1 of both filters keep 4
    assert pattern_violations(w.movedim(3, 1)) == 0          # (out, 4 channels, 1, 4): 2 of 4 channels each
    linear = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert pattern_violations(linear) == 1


def test_a_channels_last_curvature_still_prunes_unstructured():
    """Blocks in (out, *kernel, in) order are other Fisher blocks, not another model: prune_with(pattern=None) on
    a curvature estimated for 2:4 prunes unstructured to the sparsity asked, the mask back in storage order
    (the zeros written are exactly the pruned entries)."""
    model, loader = _case("conv2d")
    curv = wf.estimate_curvature(model, loader, pattern="2:4", num_grads=16, damp=DAMP, block_size=8,
                                 progress=False, modules=["0.weight"])
    res = wf.prune_with(model, curv, 0.3, pattern=None, mode="layerwise")
    keep = res.masks["0.weight"]
    assert torch.equal(model[0].weight != 0, keep)
    assert abs(1 - keep.double().mean().item() - 0.3) < 1.0 / keep.numel()
