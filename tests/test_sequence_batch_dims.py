"""Sequence models whose tensors do not hold the batch on dim 0: refused, not misread.

Per-sample gradients split every input and the target along dim 0. A time-major ``(T, B, C)`` input with a
``(B,)`` target used to be read as T samples (each time step of the whole batch, every one with the whole
target); a per-sample tensor with its batch elsewhere (an RNN's ``(layers, B, H)`` initial state) or CTC
targets concatenated over the batch were taken from the first loader item for every chunk.
"""
import re

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.batches import Batch, check_batch_dims


class _GRU(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = nn.GRU(5, 6, batch_first=batch_first)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.batch_first else out[-1])


class _BatchFirst(nn.Module):
    """The fix the message proposes: batch-first tensors in, transposed for the time-major model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(0, 1))


def _data(time_major: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 7, 5, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return [((x[i:i + 4].transpose(0, 1) if time_major else x[i:i + 4]), y[i:i + 4]) for i in range(0, 16, 4)]


MODULES = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head"]


def test_time_major_input_with_batch_target_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = _GRU(batch_first=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"loader: the target holds int64\(4,\), whose dim 0 is not the batch "
                                         r"size 7 .*batch-first"):
        wf.prune_one_shot(model, _data(time_major=True), sparsity=0.5, num_grads=16, modules=MODULES,
                          progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batch_first_wrapper_gives_the_batch_first_models_masks_and_weights():
    torch.manual_seed(0)
    first = _GRU(batch_first=True).double()
    major = _GRU(batch_first=False).double()
    major.load_state_dict(first.state_dict())
    wrapped = _BatchFirst(major)
    data = [(x.double(), y) for x, y in _data(time_major=False)]
    options = dict(sparsity=0.5, num_grads=16, num_steps=1, damp=1e-3, progress=False)
    ref = wf.prune_one_shot(first, data, modules=MODULES, **options)
    got = wf.prune_one_shot(wrapped, data, modules=["inner." + m for m in MODULES], **options)
    for name, mask in ref.masks.items():
        assert torch.equal(got.masks["inner." + name], mask)
    for name, value in first.state_dict().items():
        torch.testing.assert_close(major.state_dict()[name], value, rtol=1e-9, atol=1e-12)


def test_concatenated_ctc_targets_are_refused():
    x = torch.randn(4, 9, 5)
    target = (torch.randint(1, 3, (11,)), torch.full((4,), 9), torch.tensor([2, 3, 3, 3]))
    with pytest.raises(ValueError, match=r"int64\(11,\).*pad them to \(B, S\)"):
        check_batch_dims(Batch((x,), {}, target))
    check_batch_dims(Batch((x,), {}, (torch.zeros(4, 3, dtype=torch.long), target[1], target[2])))  # padded: fine
    check_batch_dims(Batch((x,), {}, torch.tensor(1.0)))  # a 0-dim target is shared by every sample


def test_unbatched_leaf_that_differs_between_items_is_refused_and_a_shared_one_kept():
    shared = torch.randn(1, 3, 6)
    items = [Batch((torch.randn(3, 7, 5), shared.clone()), {}, torch.zeros(3, dtype=torch.long)) for _ in range(2)]
    out = Batch.cat(items)  # equal values in every item: a shared input, kept once
    assert out.size == 6 and torch.equal(out.args[1], shared)
    items[1] = Batch((items[1].args[0], torch.randn(1, 3, 6)), {}, items[1].target)
    with pytest.raises(ValueError, match=r"args\[1\] float32\(1, 3, 6\) has no dim 0 of the batch size .* differs "
                                         r"between loader items"):
        Batch.cat(items)


class _WithState(nn.Module):
    """A GRU given its initial state (layers, B, H): its batch on dim 1."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x, h0):
        return self.head(self.rnn(x, h0)[0][:, -1])


def test_hidden_state_with_batch_on_dim_one_is_refused_across_items():
    gen = torch.Generator().manual_seed(1)
    loader = [Batch((torch.randn(4, 7, 5, generator=gen), torch.randn(1, 4, 6, generator=gen)), {},
                    torch.randint(0, 3, (4,), generator=gen)) for _ in range(3)]
    with pytest.raises(ValueError, match=r"args\[1\].*differs between loader items"):
        wf.prune_one_shot(_WithState(), loader, sparsity=0.5, num_grads=12, modules=["rnn.weight_ih_l0", "head"],
                          progress=False)


def test_a_shared_hidden_state_that_the_model_refuses_per_sample_is_named():
    gen = torch.Generator().manual_seed(1)
    zeros = torch.zeros(1, 4, 6)   # the same in every item: passed whole, then refused by the GRU per sample
    loader = [Batch((torch.randn(4, 7, 5, generator=gen), zeros), {}, torch.randint(0, 3, (4,), generator=gen))
              for _ in range(3)]
    with pytest.raises(ValueError, match=r"args\[1\] float32\(1, 4, 6\) has no dim 0 of the batch size 12, so "
                                         r"every sample got it whole; every per-sample tensor must hold its samples"):
        wf.prune_one_shot(_WithState(), loader, sparsity=0.5, num_grads=12, modules=["rnn.weight_ih_l0", "head"],
                          progress=False)


class _TimeMajor(nn.Module):
    """Time-major throughout: x (T, B, C), per-step targets (T, B); a GRU or an encoder with batch_first=False."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention
        if attention:
            self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0), 1,
                                              enable_nested_tensor=False)
        else:
            self.body = nn.GRU(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x) if self.attention else self.body(x)[0])


@pytest.mark.parametrize("attention", [False, True])
def test_time_major_inputs_and_targets_are_refused_naming_the_layer(attention):
    torch.manual_seed(0)
    model = _TimeMajor(attention)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 8, 6, generator=gen), torch.randint(0, 3, (5, 8), generator=gen)
    loader = [(x[:, i:i + 4], y[:, i:i + 4]) for i in (0, 4)]   # dim 0 is time: 5 "samples" per item
    before = [p.clone() for p in model.parameters()]
    layer = "'body.layers.0.self_attn' (MultiheadAttention" if attention else "'body' (GRU"
    with pytest.raises(ValueError, match=rf"^loader: {re.escape(layer)}, batch_first=False\) got 4 sequences of 1 "
                                         r"step\(s\) in a call of 1 sample\(s\)"):
        wf.prune_one_shot(model, loader, sparsity=0.5, num_grads=10, progress=False, modules=["head"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    batch_first = [(xi.transpose(0, 1), yi.transpose(0, 1)) for xi, yi in loader]  # the fix: batch-first tensors

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.transpose(0, 1)).transpose(0, 1)

    for fbs in (1, 2):
        res = wf.prune_one_shot(Wrapped(model), batch_first, sparsity=0.5, num_grads=8 // fbs, fisher_batch_size=fbs,
                                progress=False, modules=["inner.head"])
        assert res.sparsity == pytest.approx(0.5, abs=0.05)


def test_a_sample_cut_into_chunks_for_a_time_major_layer_is_not_refused():
    class Chunked(nn.Module):
        """Batch-first in; each sample's 12 steps cut into 3 chunks of 4 for a time-major attention."""

        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            n = x.shape[0]
            chunks = x.reshape(n * 3, 4, 6).transpose(0, 1)          # (4 steps, 3n chunks, 6)
            out = self.attn(chunks, chunks, chunks, need_weights=False)[0]
            return self.head(out.mean(0).reshape(n, 3, 6).mean(1))

    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 12, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(2)]
    torch.manual_seed(0)
    res = wf.prune_one_shot(Chunked(), loader, sparsity=0.5, num_grads=8, progress=False)
    assert res.sparsity == pytest.approx(0.5, abs=0.01)
