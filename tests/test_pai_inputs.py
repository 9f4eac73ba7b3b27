"""Pruning at initialization with the inputs of the rest of the package: any batch format,
single-pass loaders, wrapped models, tied weights, per-module modes, existing masks.

Each run is compared with an independent one (a list loader, the unwrapped model, plain
autograd) or with the property itself (flags, buffers, zeros counted in the model).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

from woodfisher import Batch
from woodfisher.pai import compute_scores, prune_at_init, train

CRITS = ("hutchinson", "hutchinson_taylor", "fisher", "snip", "grasp", "synflow", "random")
OPTS = dict(sparsity=0.6, num_probes=2, synflow_iterations=4, progress=False)


def mlp(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4))


def bn_net(seed=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 12), nn.BatchNorm1d(12),
                         nn.ReLU(), nn.Linear(12, 4))


def batches(n=48, size=16, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g) + shift
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("crit", CRITS)
def test_generator_loader_gives_the_list_result(crit):
    data = batches()
    ref = prune_at_init(mlp(), data, criterion=crit, **OPTS)
    handed = []

    def gen():
        for i, b in enumerate(data):
            handed.append(i)
            yield b

    out = prune_at_init(mlp(), gen(), criterion=crit, **OPTS)
    assert same(ref.masks, out.masks)
    # synflow reads the first batch's structure only; random reads nothing (the loader is not touched)
    assert handed == {"synflow": [0], "random": []}.get(crit, [0, 1, 2])


def test_generator_with_batchnorm_warmup_replays_the_warmup_batches():
    data = batches(shift=2.0)
    ref_model, gen_model = bn_net(), bn_net()
    ref = prune_at_init(ref_model, data, criterion="snip", warmup_batches=2, **OPTS)
    out = prune_at_init(gen_model, iter(data), criterion="snip", warmup_batches=2, **OPTS)
    assert same(ref.masks, out.masks)
    assert same(ref_model.state_dict(), gen_model.state_dict())
    assert ref.config["warmup_samples"] == out.config["warmup_samples"] == 32


class DictModel(nn.Module):
    """HuggingFace-style: keyword inputs, a dict output with the loss when labels are given."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, features, labels=None):
        logits = self.net(features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


@pytest.mark.parametrize("crit", ["hutchinson", "fisher", "snip", "grasp"])
def test_batch_formats_through_the_adapter(crit):
    data = batches()
    ref = prune_at_init(mlp(), data, criterion=crit, **OPTS)
    dicts = [{"features": x, "labels": y} for x, y in data]
    out = prune_at_init(DictModel(), dicts, criterion=crit, **OPTS)
    assert same(ref.masks, {k.removeprefix("net."): v for k, v in out.masks.items()})
    triples = [(x, torch.ones(len(x)), y) for x, y in data]  # (inputs, sample weights, labels)
    with pytest.raises(ValueError, match="batch_adapter"):
        prune_at_init(mlp(), triples, criterion=crit, **OPTS)
    out = prune_at_init(mlp(), triples, criterion=crit, batch_adapter=lambda b: Batch((b[0],), {}, b[2]), **OPTS)
    assert same(ref.masks, out.masks)


@pytest.mark.parametrize("crit", CRITS)
def test_data_parallel_masks_under_module_names(crit):
    data = batches()
    ref = prune_at_init(mlp(), data, criterion=crit, **OPTS)
    wrapped = nn.DataParallel(mlp())
    out = prune_at_init(wrapped, data, criterion=crit, **OPTS)
    assert same({"module." + k: v for k, v in ref.masks.items()}, out.masks)
    for name, keep in out.masks.items():
        assert torch.all(wrapped.state_dict()[name][~keep] == 0)


def frozen_bn_net():
    model = bn_net()
    model.train()
    model[1].eval()  # the fine-tuning idiom: a frozen BatchNorm inside a training model
    return model


@pytest.mark.parametrize("crit, kwargs", [
    ("hutchinson", dict(warmup_batches=0)), ("hutchinson", dict(warmup_batches=2)),
    ("fisher", dict(warmup_batches=0, train_mode=True)), ("snip", dict(warmup_batches=0, train_mode=True)),
    ("grasp", dict(warmup_batches=1, train_mode=True)), ("synflow", dict(warmup_batches=1)),
])
def test_flags_and_batchnorm_statistics_restored(crit, kwargs):
    model, data = frozen_bn_net(), batches(shift=1.0)
    flags = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="train_mode") if crit == "fisher" else contextlib.nullcontext():
        prune_at_init(model, data, criterion=crit, **{**OPTS, **kwargs})
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    warmed = kwargs.get("warmup_batches", 0) > 0
    for key in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):  # the warm-up's only
        assert torch.equal(before[key], after[key]) != warmed, key


def test_train_keeps_a_frozen_batchnorm_frozen_and_restores_flags():
    model, data = frozen_bn_net(), batches(shift=1.0)
    flags = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    stats = train(model, data, epochs=1.0, lr=0.01, progress=False)
    assert stats["steps"] == len(data) and [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert torch.equal(before["1.running_mean"], after["1.running_mean"])  # frozen
    assert not torch.equal(before["4.running_mean"], after["4.running_mean"])  # trained
    assert train(model, iter(data), max_steps=10, progress=False)["steps"] == len(data)  # a spent generator ends it
    with pytest.raises(ValueError, match="max_steps"):
        train(model, iter(data), progress=False)


def pruned_model():
    """Layer 0 under torch.nn.utils.prune (half of it masked); layer 2 with 10 exact zeros."""
    model = mlp(3)
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    with torch.no_grad():
        model[2].weight.view(-1)[:10] = 0.0
    return model


def effective_zeros(model):
    return int((model[0].weight == 0).sum()) + int((model[2].weight == 0).sum())


@pytest.mark.parametrize("crit", ["magnitude", "random", "snip", "fisher", "hutchinson", "synflow"])
def test_existing_masks_and_zeros_are_scored_kept_and_counted(crit):
    model = pruned_model()
    old0, old2 = model[0].weight_mask.bool().clone(), model[2].weight.detach() != 0
    res = prune_at_init(model, batches(), criterion=crit, **OPTS)
    assert set(res.masks) == {"0.weight", "2.weight"}  # the layer under torch.nn.utils.prune is scored
    assert torch.all(res.masks["0.weight"] <= old0) and torch.all(res.masks["2.weight"] <= old2)
    assert torch.equal(model[0].weight_mask.bool(), res.masks["0.weight"])  # its mask buffer is updated
    total = sum(m.numel() for m in res.masks.values())
    assert res.sparsity == pytest.approx(effective_zeros(model) / total, abs=1e-12)
    assert abs(res.sparsity - 0.6) <= 1 / total
    # beyond the target: already 60 + 10 zeros of 168 at sparsity 0.1 -> the true sparsity is reported
    model = pruned_model()
    res = prune_at_init(model, batches(), criterion=crit, **{**OPTS, "sparsity": 0.1})
    assert res.sparsity == pytest.approx(70 / 168) and effective_zeros(model) == 70


def test_magnitude_with_existing_zeros_matches_reference():
    model = pruned_model()
    w = torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()])
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[torch.argsort(w.abs(), descending=True)[:67]] = True  # 168 - round(0.6 * 168) = 67 kept
    res = prune_at_init(model, None, criterion="magnitude", **OPTS)
    assert torch.equal(torch.cat([res.masks["0.weight"].flatten(), res.masks["2.weight"].flatten()]), keep)


def tied_model():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Tanh(), nn.Linear(10, 10, bias=False), nn.Linear(10, 4))
    model[2].weight = model[0].weight
    return model


def test_tied_weight_is_one_target_with_the_summed_gradient():
    model, data = tied_model(), batches(size=48)
    scores = compute_scores(model, data, "snip")
    assert set(scores) == {"0.weight", "3.weight"}
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()  # .grad sums both uses of the tied Parameter
    torch.testing.assert_close(scores["0.weight"], (model[0].weight.grad * model[0].weight).abs().detach())
    res = prune_at_init(model, data, criterion="snip", **OPTS)
    assert model[2].weight is model[0].weight and torch.all(model[2].weight[~res.masks["0.weight"]] == 0)
    assert abs(res.sparsity - 0.6) < 0.01


def test_failure_mid_way_restores_weights_and_batchnorm():
    model = bn_net()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def bad_loss(out, y):
        calls.append(1)
        raise ValueError("loss refused")

    with pytest.raises(ValueError, match="loss refused"):
        prune_at_init(model, batches(shift=3.0), criterion="snip", loss_fn=bad_loss, warmup_batches=2, **OPTS)
    assert calls and same(before, model.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_mode="yes"), "train_mode"), (dict(num_batches=0), "num_batches"),
    (dict(synflow_iterations=0), "synflow_iterations"), (dict(loss_fn="ce"), "loss_fn"),
    (dict(params=["0.bias"]), "params"), (dict(collapse_density=1.0), "collapse_density"),
])
def test_bad_arguments_refused_before_anything_changes(kwargs, match):
    model = bn_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        prune_at_init(model, batches(), **{**OPTS, **kwargs})
    assert same(before, model.state_dict())


def test_malformed_batches_refused_before_anything_changes():
    model = bn_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="batch"):
        prune_at_init(model, [("not a tensor", 1)], **OPTS)
    with pytest.raises(ValueError, match="empty"):
        prune_at_init(model, iter([]), **OPTS)
    assert same(before, model.state_dict())


USER_MODULE = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return [{"inputs": x[i:i + 8], "y": y[i:i + 8]} for i in range(0, 32, 8)]


def loader():
    return iter(_batches(1))  # single pass


def val_loader():
    return _batches(2)


def adapter(item):
    from woodfisher import Batch
    return Batch((item["inputs"],), {}, item["y"])
'''


def test_cli_pai_on_a_user_factory_model_and_loader(tmp_path, monkeypatch):
    """--model / --data / --batch-adapter / --eval-data as import paths: the same masks as the API on the
    same model and batches, trained with the masks held, the held-out loss reported."""
    import importlib.util
    import json

    from woodfisher.cli import main
    path = tmp_path / "usermod.py"
    path.write_text(USER_MODULE)
    spec = importlib.util.spec_from_file_location("usermod", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = prune_at_init(mod.build(), mod.loader(), sparsity=0.5, criterion="snip", batch_adapter=mod.adapter,
                        warmup_batches=2, progress=False)
    out = tmp_path / "out"
    code = main(["pai", "--model", f"{path}:build", "--data", f"{path}:loader", "--batch-adapter", f"{path}:adapter",
                 "--eval-data", f"{path}:val_loader", "--sparsity", "0.5", "--criterion", "snip",
                 "--warmup-batches", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    masks = torch.load(out / "masks.pt", weights_only=True)
    assert same(ref.masks, masks)
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "loss" and report["loss_at_init"] > 0 and report["loss_after_training"] is None
    code = main(["pai", "--model", f"{path}:build", "--data", f"{path}:loader", "--batch-adapter", f"{path}:adapter",
                 "--sparsity", "0.5", "--criterion", "snip", "--train-epochs", "0.5", "--batch-size", "8",
                 "--no-progress", "--out", str(out)])
    assert code == 2  # training needs a loader with a length: the single-pass factory is refused clearly
    assert main(["pai", "--model", f"{path}:build", "--data", f"{path}:loader", "--batch-adapter", f"{path}:adapter",
                 "--sparsity", "0.5", "--criterion", "snip", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())  # no evaluation data: no "None_at_init" keys
    assert report["metric"] is None and not any(key.startswith("None") for key in report)


def test_pai_result_prints_as_a_short_summary():
    """``print(prune_at_init(...))`` is the one-line summary of a PruneResult (no mask printed), naming the
    criterion; its length does not grow with the model."""
    lines = []
    for width in (8, 256):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 4))
        loader = [(torch.randn(8, 6), torch.randint(0, 4, (8,))) for _ in range(2)]
        result = prune_at_init(model, loader, sparsity=0.5, criterion="snip")
        kept = sum(int(m.sum()) for m in result.masks.values())
        text = repr(result)
        assert text.startswith("PaIResult(sparsity=0.5") and "criterion='snip'" in text
        assert f"({kept}/{6 * width + width * 4} entries kept)" in text
        assert "tensor(" not in text and "\n" not in text
        lines.append(text)
    assert abs(len(lines[0]) - len(lines[1])) <= 8
