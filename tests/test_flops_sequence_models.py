"""FLOPs of sequence models.

Recurrent layers: each matrix of an nn.RNN / LSTM / GRU is used once per time step. They were not counted at
all: a report with a pruned ``rnn.weight_ih_l0`` lost its FLOPs columns for every layer without a word, and
``beta > 0`` refused the weights as "not called in the forward pass". Token inputs: a model that starts with an
``nn.Embedding`` could not be counted (the example sample was float zeros; ``--input-shape`` refused it).
"""
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import woodfisher as wf
from woodfisher.flops import flops_per_param_of_batch, layer_flops
from woodfisher.reports import format_table
from woodfisher.targets import resolve_targets


class _Tagger(nn.Module):
    def __init__(self, cell=nn.LSTM, batch_first=True, packed=False, **kw):
        super().__init__()
        self.batch_first, self.packed = batch_first, packed
        self.rnn = cell(4, 6, num_layers=2, bidirectional=True, batch_first=batch_first, **kw)
        self.head = nn.Linear(2 * (kw.get("proj_size") or 6), 3)

    def forward(self, x, lengths=None):
        if self.packed:
            x = pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
            _, h = self.rnn(x)
            h = h[0] if isinstance(h, tuple) else h
            return self.head(torch.cat([h[-2], h[-1]], -1))
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


def _matrices(rnn: nn.RNNBase):
    return {n: p for n, p in rnn.named_parameters() if n.startswith("weight_")}


def test_layer_flops_counts_every_matrix_once_per_step():
    torch.manual_seed(0)
    for cell, kw in ((nn.LSTM, {"proj_size": 5}), (nn.GRU, {}), (nn.RNN, {})):
        model = _Tagger(cell, **kw)
        with torch.no_grad():
            model.rnn.weight_hh_l1[:2] = 0
        stats = layer_flops(model, (9, 4))  # one sample of 9 steps, 4 features
        mats = _matrices(model.rnn)
        assert len(mats) == (12 if kw else 8)
        for attr, w in mats.items():
            entry = stats[f"rnn.{attr}"]
            assert entry["weight"] == f"rnn.{attr}" and entry["uses"] == 9
            assert entry["flops_dense"] == w.numel() * 9
            assert entry["flops_sparse"] == int((w != 0).sum()) * 9
        assert stats["head"]["uses"] == 1


def test_time_major_rnn_reads_its_steps_from_dim_zero():
    stats = layer_flops(_Tagger(nn.GRU, batch_first=False), (1, 4))  # (1, T=1, ...) reads T from dim 0
    assert stats["rnn.weight_ih_l0"]["uses"] == 1


def test_beta_with_recurrent_weights_uses_the_real_steps_of_packed_sequences():
    torch.manual_seed(0)
    model = _Tagger(nn.GRU, packed=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 7, 4, generator=gen)
    lengths = torch.tensor([5, 7, 3, 7, 2, 6, 4, 7])
    y = torch.randint(0, 3, (8,), generator=gen)
    names = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1_reverse", "head.weight"]
    targets = resolve_targets(model, names)
    uses = flops_per_param_of_batch(model, wf.Batch((x, lengths), {}, y), targets)
    # the first sample's 5 real steps, each direction of a layer runs all of them
    assert uses == {"rnn.weight_ih_l0": 5.0, "rnn.weight_hh_l0": 5.0, "rnn.weight_ih_l1_reverse": 5.0,
                    "head.weight": 1.0}
    loader = [wf.Batch((x[i:i + 4], lengths[i:i + 4]), {}, y[i:i + 4]) for i in (0, 4)]
    res = wf.prune_one_shot(model, loader, sparsity=0.5, beta=1.0, num_grads=8, modules=names, progress=False)
    assert abs(res.sparsity - 0.5) < 0.01


def test_report_keeps_flops_columns_when_a_layer_has_no_count():
    rows = [{"layer": "emb.weight", "shape": (5, 4), "params": 20, "nnz": 10, "sparsity": 50.0},
            {"layer": "head.weight", "shape": (3, 4), "params": 12, "nnz": 6, "sparsity": 50.0,
             "flops_dense": 12, "flops_sparse": 6}]
    table = format_table(rows)
    assert "| emb.weight | 5x4 | 20 | 10 | 50.00 | - | - |" in table
    assert "| head.weight | 3x4 | 12 | 6 | 50.00 | 12 | 6 |" in table
    assert "| total |  | 32 | 16 | 50.00 | - | - |" in table


def test_token_models_are_counted_from_token_ids():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.conv = nn.Conv1d(8, 8, 3)
            self.rnn = nn.GRU(8, 4, batch_first=True)

        def forward(self, tokens):
            h = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)
            return self.rnn(h)[0][:, -1]

    stats = layer_flops(Tokens(), (12,))   # 12 token ids: conv output 10 steps, the GRU runs 10 steps
    assert stats["conv"]["uses"] == 10 and stats["conv"]["flops_dense"] == 8 * 8 * 3 * 10
    assert stats["rnn.weight_ih_l0"]["uses"] == 10 and stats["rnn.weight_hh_l0"]["flops_dense"] == 12 * 4 * 10
    assert set(stats) == {"conv", "rnn.weight_ih_l0", "rnn.weight_hh_l0"}   # counted once (the float try dropped)
