"""The pruner's conditioning report: kappa per layer, one warning naming the layers, failures naming them."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher import conditioning
from woodfisher.conditioning import EPS32, WARN_LEVEL, ill_conditioned

SCALE = 100.0  # inputs x100: the gradients' scale squared (1e4) over damp 1e-5 makes kappa huge


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(scale=SCALE, n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 20, generator=g) * scale
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


OPTS = dict(num_grads=64, block_size=16, num_steps=1, progress=False)  # m = 64 >= c = 16: dense blocks


def _exact_kappa(curv, name, damp):
    """lambda_max(G^T G / N) / damp per layer, from a float64 eigendecomposition of every block."""
    g = curv.grads[name].double()
    gram = g.transpose(1, 2) @ g / curv.stats.count
    return float(torch.linalg.eigvalsh(gram)[:, -1].max()) / damp


def _data64(scale=SCALE):
    return [(x.double(), y) for x, y in _data(scale)]


@pytest.fixture
def float64_refused(monkeypatch):
    """The float64 recompute refuses every block (as it does beyond kappa ~ 5e14): float32 blocks are kept."""
    def refuse(*args, **kwargs):
        raise ValueError("refused in float64")
    monkeypatch.setattr(conditioning.wk, "fisher_inverse", refuse)


def test_kappa_per_layer_matches_float64_eigenvalues(float64_refused):
    with pytest.warns(UserWarning, match="ill-conditioned"):  # kappa ~ 1e4-1e5 at damp 0.1 with inputs x100
        curv = wf.estimate_curvature(_model(), _data(), damp=1e-1, **OPTS)
    assert set(curv.kappa) == {"1.weight", "3.weight"} and curv.refined == {}
    for name, kappa in curv.kappa.items():
        exact = _exact_kappa(curv, name, 1e-1)
        assert kappa <= exact * (1 + 1e-6) and kappa >= 0.9 * exact, (name, kappa, exact)


def _flips(res, ref):
    return sum(int((res.masks[n] != ref.masks[n]).sum()) for n in ref.masks)


def test_float32_blocks_that_lose_the_mask_are_recomputed_in_float64(monkeypatch):
    """At damp 1e-5 with inputs x100 the dense float32 inverses change the mask against a float64 model;
    the pruner recomputes exactly those blocks in float64: the float64 mask, no warning."""
    ref = wf.prune_one_shot(_model().double(), _data64(), sparsity=0.5, damp=1e-5, **OPTS)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(_model(), _data(), sparsity=0.5, damp=1e-5, **OPTS)
    assert not [w for w in rec if "ill-conditioned" in str(w.message)]
    assert _flips(res, ref) == 0
    monkeypatch.setattr(conditioning, "WARN_LEVEL", float("inf"))  # the float32 result as it was before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = wf.prune_one_shot(_model(), _data(), sparsity=0.5, damp=1e-5, **OPTS)
    assert _flips(plain, ref) > 0  # the case is a real loss, not a false alarm


def test_recomputed_blocks_match_float64_and_only_flagged_ones_are_touched():
    curv = wf.estimate_curvature(_model(), _data(), damp=1e-5, **OPTS)
    exact = wf.estimate_curvature(_model().double(), _data64(), damp=1e-5, **OPTS)
    assert curv.refined and curv.kappa == {}  # every flagged block redone, none left in float32 beyond the level
    for name, inv in curv.inverses.items():
        ref = exact.inverses[name]
        d32, d64 = inv.diagonal(dim1=1, dim2=2).double(), ref.diagonal(dim1=1, dim2=2)
        assert float(((d32 - d64).abs() / d64).max()) < 1e-5, name
    well = wf.estimate_curvature(_model(), _data(scale=1e-2), damp=1e-1, **OPTS)
    assert well.refined == {}


def test_ill_conditioned_layers_are_named_in_one_warning(float64_refused):
    with pytest.warns(UserWarning, match=r"ill-conditioned for float32 at damp=1e-05: .*'1.weight' \(kappa") as rec:
        wf.prune_one_shot(_model(), _data(), sparsity=0.5, damp=1e-5, **OPTS)
    msgs = [str(w.message) for w in rec if "ill-conditioned" in str(w.message)]
    assert len(msgs) == 1 and "damp='auto'" in msgs[0] and "float64" in msgs[0]


def test_no_warning_with_auto_damp_or_well_scaled_data():
    for data, damp in ((_data(), "auto"), (_data(scale=1e-2), 1e-1)):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            res = wf.prune_one_shot(_model(), data, sparsity=0.5, damp=damp, **OPTS)
        assert not [w for w in rec if "ill-conditioned" in str(w.message)], (damp, res.damp)


def test_multi_step_call_warns_once(float64_refused):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        wf.prune_one_shot(_model(), _data(), sparsity=0.7, damp=1e-5, num_grads=64, block_size=8, num_steps=2,
                          progress=False)
    assert len([w for w in rec if "ill-conditioned" in str(w.message)]) == 1


def test_rule_skips_lowrank_and_well_conditioned_layers():
    limit = WARN_LEVEL / EPS32
    kappa = {"a": 2 * limit, "b": 2 * limit, "c": 0.5 * limit, "d": 2 * limit}
    forms = {"a": "sequential", "b": "lowrank", "c": "sequential", "d": "stream"}
    assert ill_conditioned(kappa, forms) == {"a": 2 * limit, "d": 2 * limit}


def test_float64_model_records_no_kappa():
    model = _model().double()
    data = [(x.double(), y) for x, y in _data(scale=1.0)]
    curv = wf.estimate_curvature(model, data, damp=1e-5, **OPTS)
    assert curv.kappa == {}


def test_failed_blocks_raise_naming_the_layer_and_change_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # streamed dense inverses from float32 start beyond what float32 holds: refused, not NaN weights
    with pytest.raises(ValueError, match=r"layer '1.weight', damp=1e-12: .*kappa = .*damp='auto'"):
        wf.prune_one_shot(model, _data(scale=1e3), sparsity=0.5, damp=1e-12, inverse_form="stream", **OPTS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_damp_warning_explains_itself_and_its_advice_works(float64_refused):
    """damp='auto' is one value per model: a layer whose Fisher is far above the model's mean gets
    too little of it; the warning says so (not "pass damp='auto'") and the damp it suggests silences it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 200, generator=g) * 1e-3  # first layer's gradients ~0: the mean diagonal is tiny
    y = torch.randint(0, 4, (64,), generator=g)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    with pytest.warns(UserWarning, match="ill-conditioned") as rec:
        curv = wf.estimate_curvature(model, data, damp="auto", **OPTS)
    msg = next(str(w.message) for w in rec if "ill-conditioned" in str(w.message))
    assert "'2.weight'" in msg and "one value for the whole model" in msg and "pass damp='auto'" not in msg
    suggested = float(msg.split("pass damp >= ")[1].split(" ")[0])
    assert suggested > curv.damp
    with warnings.catch_warnings(record=True) as rec2:
        warnings.simplefilter("always")
        wf.estimate_curvature(model, data, damp=suggested * 1.01, **OPTS)
    assert not [w for w in rec2 if "ill-conditioned" in str(w.message)]


def test_hf_classifier_head_is_recomputed_not_warned():
    """A BERT classifier's Fisher is far above the model's mean, so damp='auto' is small for it (eps32 kappa
    ~ 0.1): its flagged blocks come back in float64 accuracy, without a warning."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    loader = [{"input_ids": torch.randint(0, 100, (8, 16), generator=g),
               "attention_mask": torch.ones(8, 16, dtype=torch.long),
               "labels": torch.randint(0, 2, (8,), generator=g)} for _ in range(32)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        curv = wf.estimate_curvature(model, loader, num_grads=256, block_size=128, damp="auto", progress=False)
    assert not [w for w in rec if "ill-conditioned" in str(w.message)]
    assert "classifier.weight" in curv.refined
    grads = curv.grads["classifier.weight"].double()
    gram = grads.transpose(1, 2) @ grads / curv.stats.count
    ref = torch.linalg.inv(gram + curv.damp * torch.eye(gram.shape[-1], dtype=torch.float64))
    got = curv.inverses["classifier.weight"].double()
    assert float(torch.linalg.matrix_norm(got - ref, ord=2).max() / torch.linalg.matrix_norm(ref, ord=2).max()) < 1e-5


def test_the_frobenius_bound_certifies_blocks_and_every_ill_conditioned_one_is_estimated():
    """Blocks whose cheap bound ||G||_F^2 / (N damp) is under the level skip the power iteration (0); every
    block beyond the level, and the block of the largest bound, get a Rayleigh estimate of float64 kappa."""
    gen = torch.Generator().manual_seed(3)
    scales = torch.logspace(-2, 2, 24).reshape(24, 1, 1)
    grads = torch.randn(24, 40, 16, generator=gen) * scales          # kappa over 8 orders of magnitude
    damp, count = 1e-2, 40
    exact = torch.linalg.eigvalsh(grads.double().transpose(1, 2) @ grads.double() / count)[:, -1] / damp
    got = conditioning.block_kappa(grads, damp, count)
    estimated = got > 0
    assert bool((got <= exact * (1 + 1e-5)).all())
    assert bool((got[estimated] >= 0.9 * exact[estimated]).all())
    assert bool(estimated[EPS32 * exact > WARN_LEVEL].all())          # nothing ill-conditioned is missed
    assert bool(estimated[int(exact.argmax())]) and int(estimated.sum()) < 24   # some blocks were certified
