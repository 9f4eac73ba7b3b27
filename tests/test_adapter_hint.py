"""The batch_adapter a dict-batch error suggests for a positional forward: keys named after the forward's
parameters go to those parameters (whatever the keys' order), and where no key is named after a parameter the
hint says plainly which key it put there and that the order is a guess."""
import pytest
import torch
from torch import nn

import woodfisher as wf


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.main, self.side = nn.Linear(8, 4), nn.Linear(3, 4)

    def forward(self, x, extra):
        return self.main(x) + self.side(extra)


def _batches(keys):
    g = torch.Generator().manual_seed(1)
    values = {"image": lambda: torch.randn(8, 8, generator=g), "feats": lambda: torch.randn(8, 8, generator=g),
              "extra": lambda: torch.randn(8, 3, generator=g), "aux": lambda: torch.randn(8, 3, generator=g),
              "labels": lambda: torch.randint(0, 4, (8,), generator=g)}
    return [{key: values[key]() for key in keys} for _ in range(2)]


def _hint(loader):
    with pytest.raises(ValueError, match="dict batches are passed as keyword arguments") as info:
        wf.prune_one_shot(_Two(), loader, sparsity=0.5, num_grads=16, progress=False)
    text = str(info.value)
    return text.split("batch_adapter=", 1)[1], text


def test_a_key_named_after_a_parameter_goes_there_whatever_the_keys_order():
    loader = _batches(["extra", "image", "labels"])   # extra first: the batch's order would put it in x
    hint, text = _hint(loader)
    assert hint.startswith("lambda b: woodfisher.Batch(args=(b['image'],), kwargs={'extra': b['extra']}, "
                           "target=b['labels'])"), hint
    assert "parameter x, so it is filled in the batch's order (x <- b['image']), a guess to check" in text, text
    adapter = eval(hint, {"woodfisher": wf})   # pasted as it is: the message ends with it
    got = wf.prune_one_shot(_Two(), loader, sparsity=0.5, num_grads=16, progress=False, batch_adapter=adapter)
    ref = wf.prune_one_shot(_Two(), loader, sparsity=0.5, num_grads=16, progress=False,
                            batch_adapter=lambda b: wf.Batch(args=(b["image"], b["extra"]), target=b["labels"]))
    assert all(torch.equal(got.masks[n], ref.masks[n]) for n in ref.masks)


def test_no_key_named_after_the_parameters_is_said_to_be_a_guess():
    hint, text = _hint(_batches(["aux", "feats", "labels"]))   # forward(x, extra): x takes 8 features, aux has 3
    assert hint == "lambda b: woodfisher.Batch(args=(b['aux'], b['feats'],), target=b['labels'])", hint
    assert ("no key of the batch is named after _Two.forward's parameters x, extra, so they are filled in the "
            "batch's order (x <- b['aux'], extra <- b['feats']), a guess to check") in text, text


def test_a_dict_batch_without_labels_gets_the_adapter_that_fits_the_forward_in_one_go():
    """The target under another name ('label') and two inputs for forward(x, extra): the first message already
    gives the positional adapter (was: a keywords adapter that the forward then refused, a second round)."""
    g = torch.Generator().manual_seed(2)
    loader = [{"image": torch.randn(8, 8, generator=g), "extra": torch.randn(8, 3, generator=g),
               "label": torch.randint(0, 4, (8,), generator=g)} for _ in range(2)]
    with pytest.raises(ValueError, match="have no target") as info:
        wf.prune_one_shot(_Two(), loader, sparsity=0.5, num_grads=16, progress=False)
    text = str(info.value)
    adapter_text = text.split("batch_adapter=", 1)[1].split(" to make", 1)[0]
    assert adapter_text == ("lambda b: woodfisher.Batch(args=(b['image'],), kwargs={'extra': b['extra']}, "
                            "target=b['label'])"), text
    assert text.endswith("(x <- b['image']), a guess to check (or name the keys after the parameters)"), text
    got = wf.prune_one_shot(_Two(), loader, sparsity=0.5, num_grads=16, progress=False,
                            batch_adapter=eval(adapter_text, {"woodfisher": wf}))
    ref = wf.prune_one_shot(_Two(), loader, sparsity=0.5, num_grads=16, progress=False,
                            batch_adapter=lambda b: wf.Batch(args=(b["image"], b["extra"]), target=b["label"]))
    assert all(torch.equal(got.masks[n], ref.masks[n]) for n in ref.masks)
