"""``(x, lengths, y)`` loader items (a speech collate: padded sequences, their lengths, the labels) are refused as
ambiguous with the adapter to pass; they were read as ``(x, target=lengths)`` with the labels ignored, which
trains silently on the lengths as class indices when they are below the number of classes."""
import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.batches import default_adapter


def _collate(gen, batch=4, steps=9, classes=12):
    lengths = torch.randint(2, steps + 1, (batch,), generator=gen)
    lengths[0] = steps                                   # padded to the longest
    x = torch.randn(batch, steps, 5, generator=gen) * (torch.arange(steps)[None, :, None] < lengths[:, None, None])
    return x, lengths, torch.randint(0, classes, (batch,), generator=gen)


def test_x_lengths_y_is_refused_with_the_adapter():
    x, lengths, y = _collate(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"ambiguous batch of 3 tensors .*batch_adapter=lambda b: "
                                         r"woodfisher.Batch\(args=\(b\[0\], b\[1\],\), kwargs=\{\}, target=b\[2\]\)"):
        default_adapter((x, lengths, y))
    channels_first = x.transpose(1, 2)                   # (B, C, T): the lengths match T on dim 2
    with pytest.raises(ValueError, match="ambiguous"):
        default_adapter((channels_first, lengths, y))


def test_x_y_index_still_reads_y_as_the_target():
    x, _, y = _collate(torch.Generator().manual_seed(1))
    index = torch.arange(100, 104)                       # dataset indices: not lengths of x
    batch = default_adapter((x, y, index))
    assert batch.target is y and len(batch.args) == 1
    zero_class = y.clone()
    zero_class[0] = 0                                    # a class 0 label: never a length
    assert default_adapter((x, zero_class, torch.arange(4))).target is zero_class


def test_the_adapter_from_the_message_prunes_with_the_labels():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 8)
            self.head = nn.Linear(8, 12)

        def forward(self, x, lengths):
            keep = (torch.arange(x.shape[1])[None] < lengths[:, None]).unsqueeze(-1)
            return self.head((torch.tanh(self.lin(x)) * keep).sum(1) / lengths[:, None])

    gen = torch.Generator().manual_seed(2)
    loader = [_collate(gen) for _ in range(4)]
    res = wf.prune_one_shot(Tagger(), loader, sparsity=0.5, num_grads=16, progress=False,
                            batch_adapter=lambda b: wf.Batch(args=(b[0], b[1]), kwargs={}, target=b[2]))
    assert abs(res.sparsity - 0.5) < 0.01
