"""Models ``vmap`` cannot run (packed sequences, CTC) go through the per-sample loop.

It advances the progress display sample by sample (it advanced once per chunk of up to 256 samples, so a slow
model showed 0 for minutes; the display ends at the true count), and it is found once per pruning call: the
later steps go straight to it (they tried vmap again and repeated the warning at every step)."""
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import woodfisher as wf
import woodfisher.gradients as gradients
from woodfisher import chunking
from woodfisher.gradients import GradientCollector
from woodfisher.targets import resolve_targets


class _Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


class _Recorder:
    def __init__(self):
        self.updates = []

    def update(self, n=1):
        self.updates.append(n)

    def close(self):
        pass


def _loader():
    gen = torch.Generator().manual_seed(0)
    return [wf.Batch((torch.randn(5, 6, 4, generator=gen), torch.randint(1, 7, (5,), generator=gen)), {},
                     torch.randint(0, 3, (5,), generator=gen)) for _ in range(4)]


def test_loop_ticks_every_sample_and_the_display_ends_at_the_count(monkeypatch):
    torch.manual_seed(0)
    model = _Packed()
    bars = []
    monkeypatch.setattr("woodfisher.gradients.progress_bar",
                        lambda *a, **k: bars.append(_Recorder()) or bars[-1])
    collector = GradientCollector(model, _loader(), resolve_targets(model, ["rnn.weight_ih_l0", "head"]),
                                  num_grads=20, progress=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap cannot run packed sequences: the loop
        got = collector.collect()
    updates = bars[0].updates
    assert sum(updates) == 20 == got["head.weight"].shape[0]
    assert updates == [1] * 20 + [0]   # one per sample; the chunk's own update adds what the loop did not show


def test_a_model_vmap_cannot_run_is_said_once_per_call_not_once_per_step(monkeypatch):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    loader = [wf.Batch((torch.randn(4, 6, 4, generator=gen), torch.randint(1, 7, (4,), generator=gen)), {},
                       torch.randint(0, 3, (4,), generator=gen)) for _ in range(6)]
    calls = []
    real = chunking.vmap_refused
    monkeypatch.setattr(gradients, "vmap_refused", lambda: calls.append(real()) or calls[-1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(_Packed(), loader, sparsity=0.6, num_steps=3, num_grads=24,
                                modules=["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head"], progress=False)
    assert len([w for w in caught if "vmap cannot run" in str(w.message)]) == 1
    assert calls == [False, True, True]  # steps 2 and 3 went straight to the loop
    assert abs(res.sparsity - 0.6) < 0.01
    assert not chunking.vmap_refused()  # forgotten after the call
