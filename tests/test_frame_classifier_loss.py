"""The default cross-entropy on frame-level outputs: (N, C, T) from a Conv1d (classes on dim 1, PyTorch's
convention) and (N, T, V) from a sequence model (classes last) are both read right; when both readings fit
((N, T, T) with (N, T) targets: a batch whose length equals the number of classes) the call is refused
instead of switching silently to the class-last reading for that batch."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import woodfisher as wf
from woodfisher.losses import default_loss


def test_both_conventions_against_cross_entropy_in_float64():
    gen = torch.Generator().manual_seed(0)
    channels_first = torch.randn(3, 6, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (3, 11), generator=gen)
    ref = -channels_first.log_softmax(1).gather(1, labels[:, None]).mean()
    torch.testing.assert_close(default_loss(channels_first, labels), ref, rtol=1e-12, atol=0)
    last = channels_first.transpose(1, 2)
    torch.testing.assert_close(default_loss(last, labels), ref, rtol=1e-12, atol=0)


def test_square_frame_outputs_are_refused_naming_both_losses():
    outputs = torch.randn(2, 6, 6)
    with pytest.raises(ValueError, match=r"loss_fn: the outputs \(2, 6, 6\) and class targets \(2, 6\) fit .* "
                                         r"loss_fn=torch.nn.functional.cross_entropy for the second"):
        default_loss(outputs, torch.randint(0, 6, (2, 6)))


class _Framer(nn.Module):
    """A Conv1d frame classifier: (N, 4, T) features -> (N, 6, T) logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.out = nn.Conv1d(8, 6, 1)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)))


def test_a_loader_with_a_batch_of_six_frames_is_refused_and_the_suggested_loss_prunes():
    gen = torch.Generator().manual_seed(1)
    loader = [(torch.randn(4, 4, steps, generator=gen), torch.randint(0, 6, (4, steps), generator=gen))
              for steps in (9, 6, 12)]
    torch.manual_seed(0)
    model = _Framer()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"fit the default cross-entropy with the classes on the last dim"):
        wf.prune_one_shot(model, loader, sparsity=0.5, num_grads=12, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    res = wf.prune_one_shot(model, loader, sparsity=0.5, num_grads=12, loss_fn=F.cross_entropy, progress=False)
    assert res.sparsity == pytest.approx(0.5, abs=0.01)
