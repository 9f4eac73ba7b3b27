"""Parameters, not modules, are what is pruned: tied weights, weights read without a module call,
HF Conv1D's transposed layout, wrappers and reparametrised weights (woodfisher.targets)."""
import os
import tempfile
import warnings

import pytest
import torch
from _pruner_shared import per_sample_grads, same_state, state_copy, tiny_data
from torch import nn
from torch.nn.utils import prune as torch_prune

from woodfisher import Batch, GradientCollector, prune_one_shot, resolve_targets
from woodfisher.flops import flops_per_param_of_batch
from woodfisher.targets import default_target_names


class Tied(nn.Module):
    """a and b share one weight Parameter (b.weight is a.weight)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TinyLM(nn.Module):
    """Embedding + Linear head tied to it (the GPT-2 shape of weight tying)."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mid(self.wte(ids))))


class Conv1D(nn.Module):
    """The storage convention of transformers.pytorch_utils.Conv1D: weight (in, out), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class Attn(nn.Module):
    """Linear -> nn.MultiheadAttention (self or cross) -> mean over positions -> Linear."""

    def __init__(self, cross=False):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.cross = cross

    def forward(self, x):
        h = self.inp(x)
        kv = h[:, :2] if self.cross else h
        return self.head(self.attn(h, kv, kv, need_weights=False)[0].mean(1))


def _seq_data(n=12, length=4, features=5, classes=3, batch=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _collect(model, loader, targets, m):
    return GradientCollector(model, loader, targets, num_grads=m, progress=False).collect()


# ---- tied weights ----------------------------------------------------------------------------

def test_tied_weight_is_one_target_with_the_summed_gradient():
    torch.manual_seed(0)
    model = Tied().double()
    loader = tiny_data(n=12, features=6, classes=4, batch=4)
    targets = resolve_targets(model)
    assert [t.name for t in targets] == ["a.weight", "head.weight"]
    assert targets[0].owners == ("a", "b")
    got = _collect(model, loader, targets, 12)
    ref = per_sample_grads(model, loader, ["a.weight", "head.weight"], 12)  # autograd: both uses summed
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["woodfisher", "diag_fisher", "global_magnitude"])
def test_tied_weight_sparsity_is_counted_over_unique_tensors(method):
    torch.manual_seed(0)
    model = Tied().double()
    result = prune_one_shot(model, tiny_data(features=6), sparsity=0.5, method=method, num_grads=16, progress=False)
    zeros = int((model.a.weight == 0).sum()) + int((model.head.weight == 0).sum())
    unique = model.a.weight.numel() + model.head.weight.numel()
    assert zeros == round(0.5 * unique) and result.sparsity == pytest.approx(zeros / unique)
    assert model.b.weight is model.a.weight and sum(r["numel"] for r in result.layers) == unique


def test_kfac_refuses_a_tied_weight_and_changes_nothing():
    torch.manual_seed(0)
    model = Tied().double()
    before = state_copy(model)
    with pytest.raises(ValueError, match="tied"):
        prune_one_shot(model, tiny_data(features=6), sparsity=0.5, method="kfac", num_grads=8, progress=False)
    assert same_state(model, before)


def test_tied_lm_head_is_left_out_unless_named():
    torch.manual_seed(0)
    model = TinyLM().double()
    assert default_target_names(model) == ["mid.weight"]
    ids = torch.randint(0, 11, (8, 5))
    loader = [(ids[i:i + 4], ids[i:i + 4]) for i in (0, 4)]
    prune_one_shot(model, loader, sparsity=0.5, num_grads=8, progress=False)
    assert int((model.wte.weight == 0).sum()) == 0
    result = prune_one_shot(model, loader, sparsity=0.5, num_grads=8, progress=False, modules=["lm_head"])
    assert list(result.masks) == ["wte.weight"]  # the embedding, named through its tied head
    assert int((model.lm_head.weight == 0).sum()) == round(0.5 * model.wte.weight.numel())


# ---- names -----------------------------------------------------------------------------------

def test_modules_accepts_parameter_names_aliases_and_modules_holding_weights():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                  enable_nested_tensor=False)
    names = lambda mods: [t.name for t in resolve_targets(model, mods)]  # noqa: E731
    assert names(["layers.0.self_attn.in_proj_weight"]) == ["layers.0.self_attn.in_proj_weight"]
    assert names(["layers.1.linear1"]) == ["layers.1.linear1.weight"]
    assert names(["layers.0.self_attn"]) == ["layers.0.self_attn.in_proj_weight", "layers.0.self_attn.out_proj.weight"]
    assert names(["layers.1"]) == [n for n in default_target_names(model) if n.startswith("layers.1.")]
    assert names(["layers.0.self_attn", "layers.0.self_attn.in_proj_weight"]) == names(["layers.0.self_attn"])
    tied = Tied()
    assert [t.name for t in resolve_targets(tied, ["b"])] == ["a.weight"]
    with pytest.raises(ValueError, match="no module or parameter named 'nope'"):
        resolve_targets(model, ["nope"])
    with pytest.raises(ValueError, match="is a ReLU, which holds no Linear.*no floating parameter of >= 2 dims"):
        resolve_targets(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), ["0"])
    with pytest.raises(ValueError, match="only weights with >= 2 dims"):
        resolve_targets(model, ["layers.0.norm1"])


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn, self.head = cell(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_recurrent_weights_are_pruned_when_named_and_the_message_names_them(cell):
    torch.manual_seed(0)
    model = Recurrent(cell).double()
    assert [t.name for t in resolve_targets(model)] == ["head.weight"]  # not a default target
    with pytest.raises(ValueError, match=rf"'rnn' is a {cell.__name__}.*name them to prune them: "
                                         r"modules=\['rnn.weight_ih_l0', 'rnn.weight_hh_l0'\]"):
        resolve_targets(model, ["rnn"])
    names = ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    loader = [(torch.randn(4, 3, 4, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(2)]
    targets = resolve_targets(model, names)
    got = GradientCollector(model, loader, targets, num_grads=8, progress=False).collect()
    ref = per_sample_grads(model, loader, names, 8)
    for name in names:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = prune_one_shot(model, loader, sparsity=0.5, modules=names, num_grads=8, progress=False)
    assert not [w for w in caught if "recurrent" in str(w.message)]
    assert sorted(res.masks) == sorted(names) and abs(res.sparsity - 0.5) <= 1 / 135
    assert model(loader[0][0]).isfinite().all()
    with warnings.catch_warnings(record=True) as caught:  # the defaults leave them out, and say so
        warnings.simplefilter("always")
        res = prune_one_shot(model, loader, sparsity=0.5, num_grads=8, progress=False)
    notes = [w for w in caught if "recurrent" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__ and list(res.masks) == ["head.weight"]
    assert f"['rnn ({cell.__name__})'] are not pruned by default" in str(notes[0].message)
    assert "modules=[..., 'rnn.weight_ih_l0']" in str(notes[0].message)


# ---- nn.MultiheadAttention: weights read without a module call ---------------------------------

@pytest.mark.parametrize("cross", [False, True])
def test_attention_gradients_are_the_real_ones(cross):
    torch.manual_seed(0)
    model = Attn(cross).double()
    loader = _seq_data()
    targets = resolve_targets(model)
    names = [t.name for t in targets]
    assert names == ["inp.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    got = _collect(model, loader, targets, 12)
    ref = per_sample_grads(model, loader, names, 12)
    for name in names:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12)
        assert got[name].abs().sum() > 0


def test_kfac_refuses_attention_projections_with_a_value_error():
    torch.manual_seed(0)
    model = Attn().double()
    before = state_copy(model)
    loader = _seq_data()
    with pytest.raises(ValueError, match="in_proj_weight"):
        prune_one_shot(model, loader, sparsity=0.5, method="kfac", num_grads=8, progress=False)
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):  # up front, before the data
        prune_one_shot(model, loader, sparsity=0.5, method="kfac", num_grads=8, progress=False,
                       modules=["attn.out_proj", "head"])
    assert same_state(model, before)
    prune_one_shot(model, loader, sparsity=0.5, method="kfac", num_grads=8, progress=False, modules=["inp", "head"])


@pytest.mark.parametrize("cross", [False, True])
def test_attention_flops_per_weight(cross):
    model = Attn(cross).double()
    x = torch.randn(1, 4, 5, dtype=torch.float64)
    flops = flops_per_param_of_batch(model, Batch((x,), {}, None), resolve_targets(model))
    lq, lk = 4, (2 if cross else 4)
    # in_proj: E*E entries used lq times (query rows), 2*E*E used lk times (key, value rows)
    assert flops == {"inp.weight": 4.0, "attn.in_proj_weight": (lq + 2 * lk) / 3, "attn.out_proj.weight": float(lq),
                     "head.weight": 1.0}


# ---- HF Conv1D: weight stored (in, out) ---------------------------------------------------------

def _conv1d_pair(seed=0):
    """The same function as an HF-Conv1D model and an nn.Linear model (weights transposed)."""
    torch.manual_seed(seed)
    conv = nn.Sequential(Conv1D(12, 8), nn.Tanh(), Conv1D(4, 12)).double()
    lin = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    with torch.no_grad():
        for i in (0, 2):
            lin[i].weight.copy_(conv[i].weight.T)
            lin[i].bias.copy_(conv[i].bias)
    return conv, lin


@pytest.mark.parametrize("options", [dict(method="woodfisher"), dict(method="woodfisher", block_size=16),
                                     dict(method="kfac"), dict(method="global_magnitude"),
                                     dict(method="woodfisher", pattern="2:4"),
                                     dict(method="woodfisher", pattern="rows"),
                                     dict(method="woodfisher", beta=1.0)],
                         ids=["woodfisher", "blocks", "kfac", "magnitude", "2:4", "rows", "beta"])
def test_hf_conv1d_is_pruned_like_the_transposed_linear(options):
    conv, lin = _conv1d_pair()
    loader = tiny_data(n=24, features=8, classes=4, batch=8)
    options = {"sparsity": 0.5, "num_grads": 24, "progress": False, **options}  # 2:4's own sparsity: 0.5
    assert [t.kind for t in resolve_targets(conv)] == ["conv1d_hf", "conv1d_hf"]
    got = prune_one_shot(conv, loader, **options)
    ref = prune_one_shot(lin, loader, **options)
    for i in ("0", "2"):
        assert torch.equal(got.masks[f"{i}.weight"], ref.masks[f"{i}.weight"].T)
        torch.testing.assert_close(conv[int(i)].weight, lin[int(i)].weight.T, rtol=1e-9, atol=1e-12)
    if options.get("pattern") == "rows":  # whole output features: columns of the stored (in, out) weight
        keeps = [got.masks[f"{i}.weight"] for i in (0, 2)]
        assert all(torch.equal(k, k[:1].expand_as(k)) for k in keeps) and not all(k.all() for k in keeps)


def test_hf_conv1d_flops_per_weight_count_positions():
    conv, _ = _conv1d_pair()
    x = torch.randn(1, 7, 8, dtype=torch.float64)  # a sequence of 7 positions
    assert flops_per_param_of_batch(conv, Batch((x,), {}, None), resolve_targets(conv)) == \
        {"0.weight": 7.0, "2.weight": 7.0}


# ---- wrappers and reparametrised weights ----------------------------------------------------------

def _mlp(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4))


def _loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 4, (64,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


METHODS = ["woodfisher", "kfac", "global_magnitude"]


@pytest.mark.parametrize("method", METHODS)
def test_wrapped_models_are_pruned_like_the_unwrapped_one(method):
    run = lambda m: prune_one_shot(m, _loader(), sparsity=0.5, method=method, num_grads=32, progress=False)  # noqa
    ref = run(_mlp()).masks
    wrappers = {"module.": nn.DataParallel, "_orig_mod.": torch.compile}
    for prefix, wrap in wrappers.items():
        model = wrap(_mlp())
        masks = run(model).masks
        assert list(masks) == [prefix + k for k in ref]
        assert all(torch.equal(ref[k], masks[prefix + k]) for k in ref)
        inner = model.module if prefix == "module." else model._orig_mod
        assert all(torch.equal(inner.get_parameter(k) != 0, ref[k]) for k in ref)


def test_distributed_data_parallel_is_seen_through():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "store"), rank=0, world_size=1)
        try:
            ref = prune_one_shot(_mlp(), _loader(), sparsity=0.5, num_grads=32, progress=False).masks
            got = prune_one_shot(nn.parallel.DistributedDataParallel(_mlp()), _loader(), sparsity=0.5, num_grads=32,
                                 progress=False, modules=["module.0", "2"]).masks
        finally:
            dist.destroy_process_group()
    assert all(torch.equal(ref[k], got["module." + k]) for k in ref)


def _effective_copy(model):
    """A plain MLP with the weights ``model`` computes with (masks folded in)."""
    plain = _mlp()
    with torch.no_grad():
        for i in (0, 2):
            plain[i].weight.copy_(model[i].weight)
            plain[i].bias.copy_(model[i].bias)
    return plain


@pytest.mark.parametrize("method", METHODS)
def test_torch_ao_pruning_parametrization_gets_the_real_weights_and_mask(method):
    from torch.ao.pruning import WeightNormSparsifier

    model = _mlp()
    sparsifier = WeightNormSparsifier(sparsity_level=0.25, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    plain = _effective_copy(model)
    run = lambda m: prune_one_shot(m, _loader(), sparsity=0.6, method=method, num_grads=32, progress=False)  # noqa
    got, ref = run(model), run(plain)
    assert list(got.masks) == ["0.weight", "2.weight"]
    for i in (0, 2):
        par = model[i].parametrizations.weight
        assert torch.equal(got.masks[f"{i}.weight"], ref.masks[f"{i}.weight"])
        assert torch.equal(par[0].mask.bool(), got.masks[f"{i}.weight"])          # the mask it applies
        assert torch.all(par.original[~got.masks[f"{i}.weight"]] == 0)            # the storage, zeroed
        torch.testing.assert_close(model[i].weight, plain[i].weight)
    sparsifier.squash_mask()
    assert all(torch.equal(model[i].weight != 0, got.masks[f"{i}.weight"]) for i in (0, 2))


@pytest.mark.parametrize("method", METHODS)
def test_torch_prune_masks_are_updated_in_place(method):
    model = _mlp()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.3)
    orig = model[0].weight_orig
    plain = _effective_copy(model)
    run = lambda m: prune_one_shot(m, _loader(), sparsity=0.6, method=method, num_grads=32, progress=False)  # noqa
    got, ref = run(model), run(plain)
    assert list(got.masks) == ["0.weight", "2.weight"]
    assert all(torch.equal(got.masks[k], ref.masks[k]) for k in ref.masks)
    assert model[0].weight_orig is orig and torch.equal(model[0].weight_mask.bool(), got.masks["0.weight"])
    torch.testing.assert_close(model[0].weight, plain[0].weight)
    assert model[0].weight.grad_fn is None  # the derived weight is refreshed, not left on a graph


def test_estimating_the_curvature_leaves_derived_weights_as_they_were():
    from woodfisher import estimate_curvature

    for method in ("woodfisher", "kfac"):
        model = _mlp()
        torch_prune.l1_unstructured(model[0], "weight", amount=0.3)
        derived = model[0].weight
        estimate_curvature(model, _loader(), method=method, num_grads=16, progress=False)
        assert model[0].weight is derived
