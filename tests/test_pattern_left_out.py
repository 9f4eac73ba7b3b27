"""modules= patterns that match only weights left out of the default targets: the message says which of them
are pruned when named (a list that works when pasted) and which cannot be pruned, and why."""
import ast
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import woodfisher as wf


class StdConv(nn.Conv2d):
    """Weight standardization: the forward convolves with a transform of the weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = StdConv(3, 4, 3, padding=1)
        self.emb = nn.Embedding(10, 4)
        self.normed = weight_norm(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.normed(self.stem(x).mean((2, 3))))


def _pasted(message: str):
    """The modules=[...] list a message offers, read as Python."""
    return ast.literal_eval(re.search(r"modules=(\[[^\]]*\])", message).group(1))


def test_pattern_over_an_embedding_offers_the_exact_names_and_they_work():
    model = Net()
    with pytest.raises(ValueError, match="matches only weights left out of the defaults") as info:
        wf.resolve_targets(model, ["emb*"])
    names = _pasted(str(info.value))
    assert names == ["emb.weight"]
    assert [t.name for t in wf.resolve_targets(model, names)] == ["emb.weight"]


@pytest.mark.parametrize("pattern, reason", [("stem*", "forward transforms the weight"),
                                             ("normed*", "recomputed on every forward")])
def test_pattern_over_weights_that_cannot_be_pruned_says_why(pattern, reason):
    with pytest.raises(ValueError) as info:
        wf.resolve_targets(Net(), [pattern])
    message = str(info.value)
    assert "cannot be pruned" in message and reason in message
    assert "pruned when named exactly" not in message     # nothing to paste: naming them is refused too


def test_pattern_matching_nothing_keeps_the_generic_message():
    with pytest.raises(ValueError, match="matches no weight pruned by default"):
        wf.resolve_targets(Net(), ["nothing*"])


def test_refused_pattern_changes_nothing():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="left out of the defaults"):
        wf.prune_one_shot(model, [(x, y)], sparsity=0.5, modules=["emb*"], num_grads=8, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
