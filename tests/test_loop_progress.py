"""The per-sample loop (models ``vmap`` cannot run: packed sequences, CTC) advances the progress display sample
by sample; it advanced once per chunk of up to 256 samples, so a slow model showed 0 for minutes. The display
ends at the true count."""
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import woodfisher as wf
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

