"""The chunked gradient collection against a plain autograd loop, in float64.

Whatever the loader's batch size (1, 7, 64) and the chunk size, the per-sample (vmap) and
per-group (batched backward) paths must give the gradients of a sample-by-sample autograd
reference to float64 rounding, in the same order; the Fisher statistics, the keep-masks
and the blocked layout come out of the same pass.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from _pruner_shared import per_sample_grads
from torch import nn

import woodfisher as wf
from woodfisher.gradients import CHUNK_BYTES, MAX_CHUNK_SAMPLES, GradientCollector, chunk_samples
from woodfisher.targets import resolve_targets

NAMES = ["conv.weight", "fc.weight"]


class ConvNet(nn.Module):
    """conv 3x3 -> BatchNorm (running statistics) -> ReLU -> fc; float64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def setup(n: int = 70, seed: int = 0):
    torch.manual_seed(seed)
    model = ConvNet().double()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return model, x, y


def loader_of(x, y, batch):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, x.shape[0], batch)]


def reference(model, x, y, m, fbs):
    """{name: (m, numel)}: means over groups of fbs consecutive per-sample autograd gradients (eval mode:
    BatchNorm on its running statistics, as the collector uses it)."""
    per = per_sample_grads(copy.deepcopy(model).eval(), [(x, y)], NAMES, m * fbs)
    return {n: g.view(m, fbs, -1).mean(1) for n, g in per.items()}


@pytest.mark.parametrize("loader_batch", [1, 7, 64])
@pytest.mark.parametrize("fbs", [1, 3])
@pytest.mark.parametrize("chunk", [None, 5])
def test_chunked_gradients_equal_autograd_reference(loader_batch, fbs, chunk):
    model, x, y = setup()
    m = 21
    targets = resolve_targets(model, NAMES)
    numel = sum(t.numel for t in targets)
    kw = {} if chunk is None else {"chunk_bytes": chunk * fbs * numel * 8}  # chunk groups per chunk
    col = GradientCollector(model, loader_of(x, y, loader_batch), targets, num_grads=m, fisher_batch_size=fbs,
                            progress=False, **kw)
    got = col.collect()
    ref = reference(model, x, y, m, fbs)
    for n in NAMES:
        assert got[n].dtype == torch.float64 and got[n].shape == ref[n].shape
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14)
    assert col.count == m and col.samples == m * fbs
    expect_sq = sum(float(ref[n].square().sum()) for n in NAMES)
    assert col.sum_sq == pytest.approx(expect_sq, rel=1e-12)
    assert model.training and model.bn.training  # collected in eval mode, the flags restored


def test_vmap_fallback_and_chunk_sizes_agree():
    model, x, y = setup(seed=3)
    targets = resolve_targets(model, NAMES)
    fast = GradientCollector(model, loader_of(x, y, 1), targets, num_grads=30, progress=False).collect()
    slow = GradientCollector(model, loader_of(x, y, 64), targets, num_grads=30, progress=False)
    slow._use_vmap = False
    for n, g in slow.collect().items():
        torch.testing.assert_close(g, fast[n], rtol=1e-12, atol=1e-14)


def test_blocked_layout_keep_masks_and_statistics():
    """collect(blocked=True) is grad_blocks of the flat gradients; pruned entries are zero in both."""
    model, x, y = setup(seed=5)
    with torch.no_grad():
        model.conv.weight[0] = 0.0
        model.fc.weight[:, :7] = 0.0
    targets = resolve_targets(model, NAMES, block_size=10)  # 54 and 192 entries: padded last blocks
    keep = {t.name: t.keep_mask() for t in targets}
    flat = GradientCollector(model, loader_of(x, y, 7), targets, num_grads=25, keep_masks=keep,
                             progress=False, chunk_bytes=4 * 246 * 8)
    got_flat = flat.collect()
    blocked = GradientCollector(model, loader_of(x, y, 7), targets, num_grads=25, keep_masks=keep,
                                progress=False, chunk_bytes=4 * 246 * 8).collect(blocked=True)
    ref = reference(model, x, y, 25, 1)
    for t in targets:
        masked = ref[t.name] * keep[t.name].reshape(1, -1)
        torch.testing.assert_close(got_flat[t.name], masked, rtol=1e-12, atol=1e-14)
        assert torch.equal(blocked[t.name], t.grad_blocks(got_flat[t.name]))
        assert blocked[t.name].shape == (t.num_blocks, 25, 10)
    assert flat.sum_sq == pytest.approx(sum(float((ref[t.name] * keep[t.name].reshape(1, -1)).square().sum())
                                            for t in targets), rel=1e-12)


def test_nan_gradient_names_the_layer_and_huge_finite_gradients_pass():
    model, x, y = setup(seed=7)
    targets = resolve_targets(model, NAMES)
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'conv'"):
        GradientCollector(model, loader_of(bad, y, 8), targets, num_grads=10, progress=False).collect()
    # float32 model with gradients whose float32 squares overflow: finite, so accepted, summed in float64
    big = ConvNet()
    with torch.no_grad():
        big.fc.weight.mul_(1e21)
    tg = resolve_targets(big, NAMES)
    col = GradientCollector(big, loader_of(x.float(), y, 8), tg, num_grads=4, progress=False)
    got = col.collect()
    assert all(bool(torch.isfinite(g).all()) for g in got.values())
    expect = sum(float(g.double().square().sum()) for g in got.values())
    assert math.isfinite(col.sum_sq) and col.sum_sq == pytest.approx(expect, rel=1e-6)


def test_samples_of_another_shape_start_a_new_chunk():
    """Per-sample gradients of batches whose samples differ in shape (e.g. other padded lengths)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(3, 4)).double()
    g = torch.Generator().manual_seed(9)
    batches = [(torch.randn(b, 2, length, generator=g, dtype=torch.float64), torch.randint(0, 4, (b,), generator=g))
               for b, length in ((3, 8), (2, 8), (4, 11), (3, 5))]
    names = ["0.weight", "3.weight"]
    targets = resolve_targets(model, names)
    got = GradientCollector(model, batches, targets, num_grads=12, progress=False).collect()
    ref = per_sample_grads(model, batches, names, 12)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="different shapes"):  # a group of 2 would span two shapes
        GradientCollector(model, batches, targets, num_grads=6, fisher_batch_size=2, progress=False).collect()


def test_short_loader_raises_naming_num_grads():
    model, x, y = setup(n=10, seed=11)
    targets = resolve_targets(model, NAMES)
    col = GradientCollector(model, loader_of(x, y, 4), targets, num_grads=8, fisher_batch_size=3, progress=False)
    with pytest.raises(ValueError, match=r"num_grads=8 .* ran out after 3 gradients"):
        col.collect(blocked=True)


def test_num_grads_none_takes_every_sample():
    model, x, y = setup(n=10, seed=11)
    targets = resolve_targets(model, NAMES)
    col = GradientCollector(model, loader_of(x, y, 4), targets, num_grads=None, fisher_batch_size=3, progress=False)
    got = col.collect(blocked=True)
    assert col.count == 3 and all(v.shape[1] == 3 for v in got.values())


def test_chunk_samples_rule():
    assert chunk_samples(1000, 4, 1) == MAX_CHUNK_SAMPLES  # small weights: the cap
    assert chunk_samples(10 ** 6, 4, 1) == CHUNK_BYTES // (4 * 10 ** 6)
    assert chunk_samples(10 ** 9, 4, 1) == 1  # never fewer than one group
    assert chunk_samples(1000, 4, 50) == 50 * (MAX_CHUNK_SAMPLES // 50)
    assert chunk_samples(1000, 4, 1000) == 1000  # one group even above the cap


def test_prune_one_shot_same_result_for_any_loader_batch():
    """The pruning step does not depend on how the loader batches the same samples."""
    results = []
    for batch in (1, 7, 64):
        model, x, y = setup(seed=13)
        res = wf.prune_one_shot(model, loader_of(x, y, batch), sparsity=0.5, num_grads=20, progress=False)
        results.append((res, [p.detach().clone() for p in model.parameters()]))
    for res, params in results[1:]:
        for n in NAMES:
            assert torch.equal(res.masks[n], results[0][0].masks[n])
        for p, q in zip(params, results[0][1]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.emb, self.enc, self.head = nn.Linear(8, 64), nn.TransformerEncoder(layer, 1), nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def test_attention_models_get_batched_per_sample_gradients_without_the_vmap_fallback():
    """Scaled dot-product attention under vmap runs the math kernel (which has batching rules):
    no 'performance drop' fallback loop, and the same gradients as one backward per sample."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    x, y = torch.randn(12, 5, 8), torch.randint(0, 3, (12,))
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    targets = resolve_targets(model, None)
    with warnings.catch_warnings(record=True) as caught:   # (as errors they would only trigger the
        warnings.simplefilter("always")                    # collector's autograd-loop fallback)
        got = GradientCollector(model, loader, targets, num_grads=12, progress=False).collect()
    assert not [w for w in caught if "performance drop" in str(w.message)]
    names = [t.name for t in targets]
    ref = per_sample_grads(model, loader, names, 12)
    for t in targets:
        torch.testing.assert_close(got[t.name].double(), ref[t.name].double(), rtol=1e-4, atol=1e-6)


class _ItemNet(ConvNet):
    """ConvNet whose forward reads a tensor value in Python (vmap cannot trace it)."""

    def forward(self, x):
        h = self.conv(x)
        if float(h.abs().max()) > 1e6:  # data-dependent Python control flow
            h = h / 2
        return self.fc(torch.relu(self.bn(h)).flatten(1))


def test_the_vmap_fallback_is_warned_once_at_the_callers_line_with_the_same_gradients():
    model, x, y = setup(seed=5)
    item = _ItemNet().double()
    item.load_state_dict(model.state_dict())
    targets = resolve_targets(item, NAMES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = GradientCollector(item, loader_of(x, y, 8), targets, num_grads=30, progress=False).collect()
    notes = [w for w in caught if "vmap cannot run the model" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__ and ".item()" in str(notes[0].message)
    ref = reference(model, x, y, 30, 1)
    for n in NAMES:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14)
    with warnings.catch_warnings(record=True) as caught:  # a traceable model: no note
        warnings.simplefilter("always")
        GradientCollector(model, loader_of(x, y, 8), resolve_targets(model, NAMES), num_grads=30,
                          progress=False).collect()
    assert not [w for w in caught if "vmap" in str(w.message)]


def test_a_one_entry_loss_is_the_scalar_loss_on_the_vmap_path():
    """reduction='none' on one sample (a (1,) loss) gives the scalar loss's gradients, batched (no fallback)."""
    model, x, y = setup(seed=6)
    targets = resolve_targets(model, NAMES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = GradientCollector(model, loader_of(x, y, 8), targets, num_grads=20, progress=False,
                                loss_fn=nn.CrossEntropyLoss(reduction="none")).collect()
    assert not [w for w in caught if "vmap" in str(w.message)]
    ref = reference(model, x, y, 20, 1)
    for n in NAMES:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"^loss_fn must return .*scalar tensor, got \(3,\).*reduction='none'"):
        GradientCollector(model, loader_of(x, y, 8), targets, num_grads=20, fisher_batch_size=3, progress=False,
                          loss_fn=nn.CrossEntropyLoss(reduction="none")).collect()


@pytest.mark.parametrize("total, expect", [(256, 256), (251, 251), (282, 282), (283, 251), (502, 251), (520, 260),
                                           (2000, 251)])
def test_a_small_last_chunk_is_spread_over_the_others(total, expect):
    """ResNet-20-sized gradients (1.07 MB each): 251 fit the default budget. A remainder of at most 1/8 of a chunk
    goes to the other chunks (one vmap call fewer), never past MAX_CHUNK_SAMPLES; larger remainders keep the budget."""
    numel = 267_264
    assert chunk_samples(numel, 4, 1) == 251
    got = chunk_samples(numel, 4, 1, total=total, max_samples=1024)
    assert got == expect
    calls = -(-total // got)
    assert got <= 251 * 9 // 8 and (calls == -(-total // 251) - 1 or got == 251)
    assert chunk_samples(numel, 4, 1, total=256) == 256  # the default cap (256) allows it
    assert chunk_samples(numel, 4, 1, total=260) == 251  # 260 > MAX_CHUNK_SAMPLES: two calls
    assert chunk_samples(numel, 4, 2, total=300) == 256  # groups of 2: 128 groups (MAX_CHUNK_SAMPLES) a call


def test_the_last_chunk_is_spread_off_the_cpu_only():
    from woodfisher.chunking import spread_total
    assert spread_total(256, 1, torch.device("cpu")) is None      # one larger call can be slower there
    assert spread_total(256, 2, torch.device("cuda")) == 512     # launches dominate: one call fewer
    assert spread_total(None, 1, torch.device("cuda")) is None   # the pass's length is unknown


def test_a_spread_chunk_is_one_vmap_call_with_the_same_gradients(monkeypatch):
    """The path a GPU takes (spread_total gives the pass's length off the CPU), forced here: a pass whose last chunk
    would be small is one vmap call, with the gradients of the unspread calls."""
    import woodfisher.gradients as gradients_module
    from woodfisher import per_sample

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    targets = resolve_targets(model)
    numel = sum(t.numel for t in targets)
    x, y = torch.randn(36, 10, dtype=torch.float64), torch.randint(0, 3, (36,))
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 36, 4)]
    budget = 32 * numel * 8  # 32 gradients per call: 36 = 32 + 4 unspread
    calls, real = [], per_sample.vmap_grads

    def counted(*args):
        calls.append(args[2].size)
        return real(*args)
    monkeypatch.setattr(per_sample, "vmap_grads", counted)
    monkeypatch.setattr(gradients_module, "CHUNK_BYTES", budget)
    plain = GradientCollector(model, loader, targets, num_grads=36, progress=False).collect()
    assert calls == [32, 4]
    calls.clear()
    monkeypatch.setattr(gradients_module, "spread_total", lambda m, fbs, device: m * fbs)
    spread = GradientCollector(model, loader, targets, num_grads=36, progress=False).collect()
    assert calls == [36]
    for name in plain:
        torch.testing.assert_close(spread[name], plain[name], rtol=1e-12, atol=1e-14)
    model.zero_grad()
    nn.functional.cross_entropy(model(x[35:36]), y[35:36]).backward()  # the last sample, in the spread part
    for t in targets:
        torch.testing.assert_close(spread[t.name][35], t.param.grad.flatten(), rtol=1e-10, atol=1e-12)
