"""Activation checkpointing inside the model's forward (torch.utils.checkpoint, both variants; HuggingFace's
gradient_checkpointing_enable): the per-sample gradients take the batched vmap path (checkpointing is switched
off while a chunk is computed, woodfisher.recompute), equal float64 autograd, leave checkpointing working
afterwards, and a chunk that runs out of memory (activations no longer recomputed) is still halved."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tuc
from torch import nn
from torch.utils.checkpoint import checkpoint

import woodfisher as wf
from woodfisher import pai, per_sample
from woodfisher.recompute import checkpointing_off


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=self.reentrant)
        return self.c(h)


def _data(n=16, bs=8, width=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, width, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _reference(model, loader, targets):
    """{name: (n, numel)} per-sample gradients by plain autograd (checkpointing on, one sample per backward)."""
    rows = {t.name: [] for t in targets}
    for x, y in loader:
        for i in range(len(y)):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()   # reentrant checkpointing refuses .grad()
            for t in targets:
                rows[t.name].append(t.param.grad.reshape(-1).clone())
    return {name: torch.stack(r) for name, r in rows.items()}


def _collect(model, loader, monkeypatch, **kw):
    paths = []
    for name in ("vmap_grads", "loop_grads"):
        real = getattr(per_sample, name)
        monkeypatch.setattr(per_sample, name, lambda *a, _real=real, _name=name: paths.append(_name) or _real(*a))
    targets = wf.resolve_targets(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = wf.GradientCollector(model, loader, targets, num_grads=16, progress=False, **kw).collect()
    return targets, grads, paths, [str(w.message) for w in caught]


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_model_takes_the_batched_path_with_exact_gradients(monkeypatch, reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant).double().train()
    loader = _data()
    targets, grads, paths, messages = _collect(model, loader, monkeypatch)
    assert set(paths) == {"vmap_grads"} and not any("vmap cannot run" in m for m in messages)
    want = _reference(model, loader, targets)
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-13)
    # checkpointing itself works as before afterwards: the backward recomputes the checkpointed part
    assert tuc.CheckpointFunction.__name__ == "CheckpointFunction" and model.training
    x, y = loader[0]
    F.cross_entropy(model(x), y).backward()
    assert model.b.weight.grad is not None


def test_out_of_memory_still_halves_a_checkpointed_chunk(monkeypatch):
    """The activations are no longer recomputed: a chunk too large for them is halved like any other."""
    torch.manual_seed(0)
    model = Checkpointed(False).double()
    loader = _data()
    sizes, real = [], per_sample.vmap_grads

    def limited(group_loss, sub, flat):
        sizes.append(flat.size)
        if flat.size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(group_loss, sub, flat)

    monkeypatch.setattr(per_sample, "vmap_grads", limited)
    targets = wf.resolve_targets(model)
    with pytest.warns(UserWarning, match="ran out of memory"):
        grads = wf.GradientCollector(model, loader, targets, num_grads=16, progress=False).collect()
    assert sizes == [16, 8, 4, 4, 4, 4]
    for name, g in _reference(model, loader, targets).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-13)


def test_the_switch_restores_checkpointing_on_errors():
    before = (tuc.CheckpointFunction, tuc._checkpoint_without_reentrant_generator)
    with pytest.raises(KeyError), checkpointing_off(), checkpointing_off():
        assert tuc.CheckpointFunction is not before[0]
        raise KeyError("x")
    assert (tuc.CheckpointFunction, tuc._checkpoint_without_reentrant_generator) == before


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}])
def test_huggingface_gradient_checkpointing_stays_batched(monkeypatch, kwargs):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    model = transformers.BertForSequenceClassification(cfg).double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(1, 20, (16, 6), generator=g), torch.randint(0, 3, (16,), generator=g)
    loader = [{"input_ids": ids[i:i + 8], "labels": labels[i:i + 8]} for i in range(0, 16, 8)]
    targets, grads, paths, messages = _collect(model, loader, monkeypatch)
    assert not any("vmap cannot run" in m for m in messages), messages
    assert set(paths) == {"vmap_grads"}
    assert model.training and model.is_gradient_checkpointing and model._require_grads_hooks  # put back
    model.eval()
    for i in range(16):
        want = torch.autograd.grad(model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss,
                                   [t.param for t in targets])
        for t, w in zip(targets, want):
            torch.testing.assert_close(grads[t.name][i], w.reshape(-1), rtol=1e-9, atol=1e-12)


class Plain(Checkpointed):
    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("method", ["kfac", "woodfisher"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_pruning_a_checkpointed_model_equals_pruning_it_without_checkpointing(method, reentrant):
    """K-FAC's factor pass too (reentrant checkpointing made it fail with a ValueError blaming the loader)."""
    weights = []
    for cls in (Checkpointed, Plain):
        torch.manual_seed(0)
        model = cls(reentrant).double()
        wf.prune_one_shot(model, _data(32), sparsity=0.5, method=method, num_grads=32, progress=False)
        weights.append([p.detach() for p in model.parameters()])
    for got, want in zip(*weights):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("criterion", ["hutchinson", "snip", "grasp"])
def test_pruning_at_init_of_a_reentrant_checkpointed_model(criterion):
    """autograd.grad through reentrant checkpointing raised torch's RuntimeError in woodfisher.pai."""
    weights = []
    for cls in (Checkpointed, Plain):
        torch.manual_seed(0)
        model = cls(True).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pai.prune_at_init(model, _data(16), sparsity=0.5, criterion=criterion, warmup_batches=0,
                              progress=False)
        weights.append([p.detach() for p in model.parameters()])
    for got, want in zip(*weights):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
