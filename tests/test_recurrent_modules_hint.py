"""``modules=["rnn"]`` on a recurrent layer: the refusal's pasteable ``modules=`` names every matrix of the layer
(it named only the first six, i.e. the first layer of a 2-layer bidirectional LSTM with projections)."""
import ast
import re

import pytest
import torch
from torch import nn

from woodfisher.targets import resolve_targets


class _Net(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.rnn = nn.LSTM(8, 12, num_layers=layers, bidirectional=True, batch_first=True, proj_size=4)
        self.head = nn.Linear(8, 4)


@pytest.mark.parametrize("layers", [2, 3])
def test_the_hint_names_every_matrix(layers):
    model = _Net(layers)
    matrices = [name for name, p in model.named_parameters() if name.startswith("rnn.weight_")]
    assert len(matrices) == 6 * layers
    with pytest.raises(ValueError, match="is a LSTM") as info:
        resolve_targets(model, ["rnn"])
    pasted = re.search(r"modules=(\[.*\])$", str(info.value)).group(1)
    if pasted.startswith("['"):
        chosen = ast.literal_eval(pasted)
    else:
        chosen = eval(pasted, {"model": model})  # the comprehension, as a user pastes it
    assert sorted(t.name for t in resolve_targets(model, chosen)) == sorted(matrices)
    assert torch.is_tensor(model.rnn.weight_hr_l0)
