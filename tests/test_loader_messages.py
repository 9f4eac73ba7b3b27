"""A model or loss failing on the loader's data: the message shows what the caller's loader yielded
(its item index, its own shapes, the error the model gives on that item), never the chunk the gradient
collector concatenated or the per-sample call inside ``vmap``; nothing is modified."""
from __future__ import annotations

import pytest
import torch
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf

OPTS = dict(sparsity=0.5, num_grads=32, progress=False)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n=8, features=6, batch=10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


def _refused(model, loader, **options):
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        wf.prune_one_shot(model, loader, **{**OPTS, **options})
    assert_unchanged(before, snapshot(model))
    return str(info.value)


@pytest.mark.parametrize("options", [dict(), dict(fisher_batch_size=2), dict(method="kfac")],
                         ids=["per-sample", "groups", "kfac"])
def test_wrong_feature_count_names_the_loaders_own_batch(options):
    msg = _refused(_model(), _data(features=5), **options)
    assert "args (10, 5) float32; target (10,) int64" in msg, msg  # the loader's batch of 10, not a chunk
    assert "(10x5 and 6x8)" in msg, msg  # the model's own error on that batch, not on one sample


def test_bad_item_midway_is_named_by_its_index():
    data = _data()
    data[3] = (data[3][0], data[3][1] + 10)  # item 3: class targets out of range
    msg = _refused(_model(), data)
    assert "item 3 of the loader" in msg and "args (10, 6) float32; target (10,) int64" in msg, msg
    assert "IndexError" in msg or "out of bounds" in msg, msg


def test_dict_batch_names_labels_once():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x, labels=None):
            out = self.fc(x)
            return {"logits": out, "loss": nn.functional.cross_entropy(out, labels)}

    data = [{"x": x, "labels": y} for x, y in _data(features=5)]
    msg = _refused(Head(), data)
    assert "item 0 of the loader, kwargs x=(10, 5) float32, labels=(10,) int64:" in msg, msg


def test_model_that_only_fails_on_groups_says_so():
    class FixedBatch(nn.Module):  # reshapes with the loader's batch size hard-coded: runs on each item alone
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x.reshape(10, 6))

    msg = _refused(FixedBatch(), _data())
    assert "each item alone runs" in msg and "fisher_batch_size" in msg, msg


@pytest.mark.parametrize("key", ["target", "label", "y"])
@pytest.mark.parametrize("method", ["woodfisher", "kfac"])
def test_dict_batch_with_a_target_under_another_name_gets_the_exact_adapter(key, method):
    data = [{"x": x, key: y} for x, y in _data()]
    model = _model()

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

    msg = _refused(Keywords(), data, method=method)
    assert f"keys ['x', {key!r}] have no target" in msg, msg
    adapter_src = msg.split("batch_adapter=")[1].split(" to make")[0]
    adapter = eval(adapter_src, {"woodfisher": wf})  # noqa: S307 - the message's own code, as a user pastes it
    res = wf.prune_one_shot(Keywords(), data, batch_adapter=adapter, method=method, **OPTS)
    assert 0.49 <= res.sparsity <= 0.51
