"""Any loader works through the batch adapter, and the loss is the right one (woodfisher.batches)."""
import pytest
import torch
import torch.nn.functional as F
from _pruner_shared import same_state, state_copy, tiny_data, tiny_mlp
from torch import nn

import woodfisher
import woodfisher.gradients as gradients_module
from woodfisher import Batch, GradientCollector, prune_one_shot, resolve_targets
from woodfisher.batches import compute_loss, default_adapter, to_batch


def _x(n=4, d=6):
    return torch.randn(n, d, dtype=torch.float64)


def test_default_readings():
    x, x2, y = _x(), _x(), torch.arange(4)
    b = default_adapter((x, y))
    assert b.args[0] is x and b.target is y and b.kwargs == {}
    b = default_adapter((x, y, torch.arange(4), "meta"))          # (x, y, extra...): extras ignored
    assert b.args == (x,) and b.target is y
    b = default_adapter(((x, x2), y))                               # several inputs
    assert b.args == (x, x2) and b.target is y
    b = default_adapter(({"a": x, "b": x2}, y))                     # keyword inputs
    assert b.kwargs == {"a": x, "b": x2} and b.target is y
    ids, mask = torch.randint(0, 9, (4, 5)), torch.ones(4, 5, dtype=torch.long)
    b = default_adapter({"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert b.args == () and set(b.kwargs) == {"input_ids", "attention_mask", "labels"}
    assert default_adapter(x).target is None and default_adapter((x,)).target is None
    assert default_adapter([x]).args == (x,)
    assert to_batch((x, y), lambda item: ((item[0],), {}, item[1])).target is y


@pytest.mark.parametrize("item", [
    (torch.randn(4, 6), torch.rand(4, 6), torch.arange(4)),                       # (x, float mask, labels)
    (torch.randn(4, 5, 6), torch.rand(4, 5) > 0.5, torch.arange(4)),              # (x, padding mask, labels)
    (torch.randint(0, 9, (4, 5)), torch.ones(4, 5, dtype=torch.long), torch.randint(0, 9, (4, 5))),  # ids, mask, labels
    (torch.randint(0, 9, (4, 5)), torch.randint(0, 9, (4, 5)), torch.ones(4, 5, dtype=torch.long)),  # ids, labels, mask
], ids=["x-mask-y", "x-boolmask-y", "ids-mask-labels", "ids-labels-mask"])
def test_ambiguous_batches_are_refused_with_an_adapter_that_works(item):
    with pytest.raises(ValueError, match="ambiguous") as err:
        default_adapter(item)
    text = str(err.value)
    example = text[text.index("lambda b:"):text.index(") (inputs") + 1]
    adapter = eval(example, {"woodfisher": woodfisher})  # the example the message shows
    batch = to_batch(item, adapter)
    assert isinstance(batch, Batch) and batch.target is item[2] and batch.args == (item[0], item[1])


def test_not_a_target_is_refused():
    with pytest.raises(ValueError, match="second element is a list"):
        default_adapter((torch.randn(4, 3), ["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="batch_adapter must return"):
        to_batch((torch.randn(4, 3), torch.arange(4)), lambda b: b)


class DictModel(nn.Module):
    """HF-style: keyword inputs, returns {"logits", "loss"}; its own loss is label-smoothed (not the default)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, features, scale=None, labels=None):
        logits = self.fc2(torch.tanh(self.fc1(features * scale)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels, label_smoothing=0.2)
        return out


def _dict_loader(labels=True):
    out = []
    for x, y in tiny_data(n=16, batch=4):
        item = {"features": x, "scale": torch.full((x.shape[0], 1), 2.0, dtype=x.dtype)}
        if labels:
            item["labels"] = y
        out.append(item)
    return out


def _autograd(model, loader, names, loss_of):
    """Per-sample gradients by a plain loop; loss_of(model, one-sample dict)."""
    params = dict(model.named_parameters())
    rows = {n: [] for n in names}
    for item in loader:
        for i in range(item["features"].shape[0]):
            one = {k: v[i:i + 1] for k, v in item.items()}
            grads = torch.autograd.grad(loss_of(model, one), [params[n] for n in names])
            for n, g in zip(names, grads):
                rows[n].append(g.flatten())
    return {n: torch.stack(v) for n, v in rows.items()}


def test_dict_batches_use_the_models_own_loss():
    torch.manual_seed(0)
    model = DictModel().double()
    targets = resolve_targets(model)
    names = [t.name for t in targets]
    got = GradientCollector(model, _dict_loader(), targets, num_grads=16, progress=False).collect()
    ref = _autograd(model, _dict_loader(), names, lambda m, one: m(**one)["loss"])
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
    # an explicit loss_fn wins over outputs.loss
    got = GradientCollector(model, _dict_loader(), targets, num_grads=16, progress=False,
                            loss_fn=F.nll_loss).collect()
    ref = _autograd(model, _dict_loader(), names, lambda m, one: F.nll_loss(m(**one)["logits"], one["labels"]))
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)


def test_unlabelled_batches_need_sampled_fisher_or_labels():
    model = DictModel().double()
    with pytest.raises(ValueError, match="sampled_fisher=True"):
        prune_one_shot(model, _dict_loader(labels=False), sparsity=0.5, num_grads=8, progress=False)
    out = {"logits": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="no targets"):
        compute_loss(out, None, None)


class TinyLM(nn.Module):
    """Token ids (N, T) -> logits (N, T, V); with labels it returns its own shifted LM loss."""

    def __init__(self, vocab=7, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, labels=None):
        logits = self.out(torch.tanh(self.mix(self.emb(input_ids))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return out


def _record_sampling(monkeypatch):
    drawn = []

    def recording(logits, generator):
        labels = woodfisher.batches.sample_targets(logits, generator)
        drawn.append(labels)
        return labels
    monkeypatch.setattr(gradients_module, "sample_targets", recording)
    return drawn


@pytest.mark.parametrize("form", ["dict", "tensor"])
def test_sampled_fisher_on_unlabelled_sequences(monkeypatch, form):
    """Unlabelled LM batches (logits (N, T, V)): targets drawn per position, no dummy targets needed."""
    torch.manual_seed(0)
    model = TinyLM().double()
    ids = torch.randint(0, 7, (8, 6))
    loader = [{"input_ids": ids[i:i + 4]} for i in (0, 4)] if form == "dict" else [ids[i:i + 4] for i in (0, 4)]
    targets = resolve_targets(model)
    drawn = _record_sampling(monkeypatch)
    got = GradientCollector(model, loader, targets, num_grads=8, sampled_fisher=True, progress=False).collect()
    labels = torch.cat([d.reshape(-1, 6) for d in drawn])
    assert labels.shape == (8, 6)
    params = dict(model.named_parameters())
    for i in range(8):  # reference: mean cross-entropy over the positions with the drawn labels
        logits = model(ids[i:i + 1])["logits"]
        loss = F.cross_entropy(logits.reshape(-1, 7), labels[i])
        grads = torch.autograd.grad(loss, [params[t.key] for t in targets])
        for t, g in zip(targets, grads):
            torch.testing.assert_close(got[t.name][i], g.flatten(), rtol=1e-10, atol=1e-12)
    # labels in the batch are ignored by the sampled Fisher: the same gradients
    drawn.clear()
    labelled = [{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in (0, 4)]
    again = GradientCollector(model, labelled, targets, num_grads=8, sampled_fisher=True, progress=False).collect()
    assert all(torch.equal(got[n], again[n]) for n in got)


# ---- loaders that can be iterated once ------------------------------------------------------------

def _gen(batches, handed):
    for i, b in enumerate(batches):
        handed.append(i)
        yield b


@pytest.mark.parametrize("options", [dict(), dict(beta=1.0), dict(method="kfac")], ids=["plain", "beta", "kfac"])
def test_single_pass_loaders_lose_no_batch(options):
    data = tiny_data(n=32, batch=8)
    ref = prune_one_shot(tiny_mlp(), data, sparsity=0.5, num_grads=32, progress=False, **options)
    handed = []
    got = prune_one_shot(tiny_mlp(), _gen(data, handed), sparsity=0.5, num_grads=32, progress=False, **options)
    assert handed == [0, 1, 2, 3] and all(torch.equal(ref.masks[k], got.masks[k]) for k in ref.masks)


def test_single_pass_loader_with_several_steps_is_refused_up_front():
    model = tiny_mlp()
    before = state_copy(model)
    handed = []
    with pytest.raises(ValueError, match="num_steps=2 needs a loader that can be iterated once per step"):
        prune_one_shot(model, _gen(tiny_data(), handed), sparsity=0.5, num_steps=2, progress=False)
    assert handed == [] and same_state(model, before)


class KeywordMLP(nn.Module):
    """A plain model called with a keyword input: ``model(x=...)``, no ``labels`` argument."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x):
        return self.net(x)


def test_dict_batch_for_a_model_without_labels_names_the_keys_and_the_adapter():
    """A dict batch is passed as keyword arguments; a model that takes no ``labels`` is refused with the
    batch's keys and shapes and an adapter that works (it gives the masks of the same data as tuples)."""
    tuples = tiny_data()
    dicts = [{"x": x, "labels": y} for x, y in tuples]
    model = KeywordMLP()
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"kwargs x=\(\d+, 6\) float64, labels=\(\d+,\) int64.*"
                                         r"unexpected keyword argument 'labels'.*batch_adapter=lambda b"):
        prune_one_shot(model, dicts, sparsity=0.5, num_grads=16, progress=False)
    assert same_state(model, before)
    adapter = lambda b: Batch(kwargs={k: v for k, v in b.items() if k != "labels"}, target=b["labels"])  # noqa: E731
    got = prune_one_shot(model, dicts, sparsity=0.5, num_grads=16, progress=False, batch_adapter=adapter).masks
    ref = prune_one_shot(KeywordMLP(), tuples, sparsity=0.5, num_grads=16, progress=False).masks
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in got)
