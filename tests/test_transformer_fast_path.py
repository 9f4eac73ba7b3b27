"""``nn.TransformerEncoder`` in eval mode with a padding mask: per-sample gradients stay batched under ``vmap``.

PyTorch's fused inference path turns the padded input into a nested tensor when no parameter it sees requires
grad (the case under ``torch.func.grad``), and ``vmap`` has no batching rule for that conversion, so every
sample used to go through the one-at-a-time loop (with a warning). The fast path is off while ``vmap`` runs.
"""
import copy
import warnings

import torch
from torch import nn

import woodfisher as wf


class _Encoder(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note that norm_first disables its nested tensors
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask):
        h = self.enc(x, src_key_padding_mask=mask)
        keep = (~mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def _loader():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, 8, generator=gen, dtype=torch.float64)
    lengths = torch.randint(2, 7, (16,), generator=gen)
    mask = torch.arange(6)[None] >= lengths[:, None]
    y = torch.randint(0, 3, (16,), generator=gen)
    return [((x[i:i + 4], mask[i:i + 4]), y[i:i + 4]) for i in range(0, 16, 4)]


def test_eval_encoder_with_padding_mask_is_batched_and_equals_train_mode():
    for norm_first in (False, True):
        torch.manual_seed(0)
        evaluated = _Encoder(norm_first).double().eval()
        trained = copy.deepcopy(evaluated).train()  # no dropout: the same function, never the fused path
        options = dict(sparsity=0.5, num_grads=16, num_steps=1, damp=1e-3, progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = wf.prune_one_shot(evaluated, _loader(), **options)
        assert not [w for w in caught if "vmap" in str(w.message)], [str(w.message) for w in caught]
        ref = wf.prune_one_shot(trained, _loader(), **options)
        assert not evaluated.training and trained.training
        assert torch.backends.mha.get_fastpath_enabled()  # restored for the caller
        for name, mask in ref.masks.items():
            assert torch.equal(got.masks[name], mask), name
        for name, value in trained.state_dict().items():
            torch.testing.assert_close(evaluated.state_dict()[name], value, rtol=1e-9, atol=1e-12)
