"""A caller's own pruning method, outside the package: registration, use everywhere a built-in name works,
and the checks of what it returns (a ValueError naming the method, the model unchanged)."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import woodfisher as wf
from woodfisher.methods import METHODS, PruningMethod, ScoreMethod


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))


def _loader(n=64):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 10, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


@pytest.fixture
def registry():
    """Registered test methods are removed afterwards (the registry is process-wide)."""
    before = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(before)


class RandomScore(ScoreMethod):
    name = "test_random"
    summary = "uniform random scores (seeded by config.seed)"

    def scores(self, ctx):
        gen = torch.Generator().manual_seed(ctx.config.seed)
        return {t.name: torch.rand(t.shape, generator=gen) for t in ctx.targets}


class MyDiagOBS(ScoreMethod):
    """OBS saliency w^2 / (2 [F^-1]_qq) from the diagonal curvature, without overriding block_size."""
    name = "test_diag_obs"
    curvature = "diagonal"
    summary = "diagonal OBS, written outside the package"

    def scores(self, ctx):
        w = ctx.blocked_weights()
        return {t.name: t.unblock(w[t.name] ** 2 / (2 * ctx.curvature.inverses[t.name].reshape(w[t.name].shape)))
                for t in ctx.targets}


def test_registered_method_runs_everywhere_a_builtin_name_does(registry):
    wf.register_method(RandomScore)
    loader = _loader()
    first = wf.prune_one_shot(_mlp(), loader, sparsity=0.5, method="test_random", seed=3, progress=False)
    again = wf.prune_one_shot(_mlp(), loader, sparsity=0.5, method="test_random", seed=3, progress=False)
    assert first.sparsity == pytest.approx(0.5, abs=1 / 224)
    assert all(torch.equal(first.masks[n], again.masks[n]) for n in first.masks)  # the same seed, the same mask
    model = _mlp()
    curv = wf.estimate_curvature(model, loader, method="test_random", seed=3, progress=False)
    assert wf.prune_with(model, curv, 0.7).sparsity == pytest.approx(0.7, abs=1 / 224)
    gradual = _mlp()
    pruner = wf.GradualPruner(gradual, loader, final_sparsity=0.6, start_step=0, end_step=2, frequency=1,
                              method="test_random", progress=False)
    for step in range(3):
        pruner.step(step)
    assert wf.sparsity_of(pruner.masks()) == pytest.approx(0.6, abs=1 / 224)
    from woodfisher.cli import build_parser
    prune = [a for a in build_parser()._subparsers._group_actions[0].choices["prune"]._actions
             if a.dest == "method"][0]
    assert "test_random" in prune.choices


def _per_sample_grads64(model, loader):
    m64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m64.named_parameters()}
    x = torch.cat([b[0] for b in loader]).double()
    y = torch.cat([b[1] for b in loader])

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(m64, p, (xi[None],)), yi[None])
    return params, vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_diagonal_method_needs_no_block_size_override_and_matches_float64(registry):
    """A "diagonal" curvature is one (1, 1) block per entry: a method of that kind sees its weights in the same
    layout whatever block_size the call passes; its masks are those of the float64 diagonal OBS saliency."""
    wf.register_method(MyDiagOBS())
    loader, damp = _loader(), 1e-3
    model = _mlp()
    params, grads = _per_sample_grads64(model, loader)
    res = wf.prune_one_shot(model, loader, sparsity=0.5, method="test_diag_obs", num_grads=64, num_steps=1,
                            damp=damp, block_size=10, mode="layerwise", progress=False)
    for name in ("0.weight", "2.weight"):
        saliency = params[name] ** 2 * (damp + grads[name].pow(2).mean(0)) / 2  # [F^-1]_qq = 1 / (damp + E g^2)
        kept = saliency.flatten() > saliency.flatten().kthvalue(saliency.numel() // 2).values
        assert torch.equal(res.masks[name].flatten(), kept)


def _score(fn):
    return type("Bad", (ScoreMethod,), {"name": "test_bad", "scores": lambda self, ctx: fn(ctx)})()


def _step(fn):
    return type("BadStep", (PruningMethod,), {"name": "test_bad", "step": lambda self, ctx: fn(ctx)})()


def _w(target):
    return target.effective_weight()


def _half(target):
    w = _w(target).abs()
    return w > w.flatten().median()


BAD_OUTPUTS = {
    "nan scores": (_score(lambda c: {t.name: _w(t) * float("nan") for t in c.targets}), "NaN"),
    "flat scores": (_score(lambda c: {t.name: _w(t).abs().flatten() for t in c.targets}), "shape"),
    "missing weight": (_score(lambda c: {c.targets[0].name: _w(c.targets[0])}), "missing"),
    "extra weight": (_score(lambda c: {**{t.name: _w(t) for t in c.targets}, "x": _w(c.targets[0])}), "unexpected"),
    "a list": (_score(lambda c: [_w(t) for t in c.targets]), "dict"),
    "meta scores": (_score(lambda c: {t.name: _w(t).to("meta") for t in c.targets}), "meta"),
    "one dict": (_step(lambda c: {t.name: _w(t) for t in c.targets}), "pair"),
    "nan weights": (_step(lambda c: ({t.name: _w(t) * float("nan") for t in c.targets},
                                     {t.name: _half(t) for t in c.targets})), "NaN"),
    "float mask": (_step(lambda c: ({t.name: _w(t) for t in c.targets},
                                    {t.name: _half(t).float() for t in c.targets})), "bool"),
    "dense mask": (_step(lambda c: ({t.name: _w(t) for t in c.targets},
                                    {t.name: torch.ones_like(_half(t)) for t in c.targets})), "sparsity 0.0000"),
    "all pruned": (_step(lambda c: ({t.name: _w(t) for t in c.targets},
                                    {t.name: torch.zeros_like(_half(t)) for t in c.targets})), "sparsity 1.0000"),
    "short weights": (_step(lambda c: ({t.name: _w(t)[:1] for t in c.targets},
                                       {t.name: _half(t) for t in c.targets})), "entries"),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_bad_method_output_is_a_value_error_naming_the_method(case, registry):
    method, match = BAD_OUTPUTS[case]
    wf.register_method(method)
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="method 'test_bad'") as err:
        wf.prune_one_shot(model, _loader(), sparsity=0.5, method="test_bad", progress=False)
    assert match in str(err.value)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_mask_reviving_pruned_entries_is_refused(registry):
    model = _mlp()
    wf.prune_one_shot(model, _loader(), sparsity=0.5, method="magnitude", progress=False)
    wf.register_method(_step(lambda c: ({t.name: _w(t) for t in c.targets},
                                        {t.name: torch.ones_like(_half(t)) for t in c.targets})))
    with pytest.raises(ValueError, match="keeps .* entries pruned before the step"):
        wf.prune_one_shot(model, _loader(), sparsity=0.6, method="test_bad", progress=False)


@pytest.mark.parametrize("bad, match", [
    (object(), "PruningMethod"),
    (type("M", (ScoreMethod,), {"name": "", "scores": lambda s, c: {}})(), "identifier"),
    (type("M", (ScoreMethod,), {"name": "woodfisher", "scores": lambda s, c: {}})(), "taken"),
    (type("M", (ScoreMethod,), {"name": "test_m"})(), "scores"),
    (type("M", (PruningMethod,), {"name": "test_m"})(), "step"),
    (type("M", (ScoreMethod,), {"name": "test_m", "curvature": "hessian", "scores": lambda s, c: {}})(), "curvature"),
    (type("M", (ScoreMethod,), {"name": "test_m", "patterns": ("2:4",), "scores": lambda s, c: {}})(), "patterns"),
    (type("M", (ScoreMethod,), {"name": "test_m", "curvature": "diagonal", "patterns": ("nm",),
                                "scores": lambda s, c: {}})(), "blocks hold one entry"),
], ids=["not-a-method", "no-name", "taken", "no-scores", "no-step", "unknown-curvature", "bad-patterns",
        "diagonal-patterns"])
def test_register_method_refuses_a_broken_method(bad, match, registry):
    before = dict(METHODS)
    with pytest.raises(ValueError, match=match):
        wf.register_method(bad)
    assert METHODS == before


def test_unregistered_method_object_gets_the_register_call(registry):
    with pytest.raises(ValueError, match=r"register_method\(RandomScore\(\)\), then pass method='test_random'"):
        wf.PruneConfig(sparsity=0.5, method=RandomScore())


class MyOBS(ScoreMethod):
    """The WoodFisher statistic (StepContext.obs_saliency), for prune_with on a curvature estimated for
    "woodfisher"."""
    name = "test_obs"
    curvature = "blockwise"
    summary = "OBS saliency, no update"

    def scores(self, ctx):
        return {t.name: ctx.obs_saliency(t) for t in ctx.targets}


def test_prune_with_takes_another_method_of_the_same_curvature(registry):
    """One set of inverses, two methods: the masks agree (same statistic), the weights differ (no OBS update)."""
    wf.register_method(MyOBS)
    model = _mlp()
    curv = wf.estimate_curvature(model, _loader(), num_grads=64, block_size=10, damp=1e-3, progress=False)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    mine = wf.prune_with(ours, curv, 0.5, method="test_obs")
    ref = wf.prune_with(theirs, curv, 0.5)
    assert mine.config["method"] == "test_obs"
    assert all(torch.equal(mine.masks[n], ref.masks[n]) for n in ref.masks)
    assert torch.equal(ours[0].weight, model[0].weight * mine.masks["0.weight"])
    with pytest.raises(ValueError, match="same curvature kind"):
        wf.prune_with(copy.deepcopy(model), curv, 0.5, method="diag_fisher")


def test_cli_method_takes_the_import_path_of_a_method(registry, tmp_path):
    (tmp_path / "my_methods.py").write_text(
        "import torch\nfrom woodfisher.methods import ScoreMethod\n\n\n"
        "class Ones(ScoreMethod):\n    name = 'test_cli_ones'\n\n"
        "    def scores(self, ctx):\n        return {t.name: torch.ones(t.shape) for t in ctx.targets}\n\n\n"
        "class NoScores(ScoreMethod):\n    name = 'test_cli_none'\n")
    from woodfisher.cli import build_parser
    path = str(tmp_path / "my_methods.py")
    args = build_parser().parse_args(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", f"{path}:Ones"])
    assert args.method == "test_cli_ones" and "test_cli_ones" in METHODS
    with pytest.raises(SystemExit):  # argparse's usage error (exit 2), naming --method and what is missing
        build_parser().parse_args(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", f"{path}:NoScores"])
    assert "test_cli_none" not in METHODS


def test_search_damp_with_a_method_of_ones_own(registry):
    """A blockwise method of one's own is searched on one gradient collection (re-inverted per damp): each loss is
    that of prune_one_shot at that damp; a method without curvature is refused (the damp changes nothing)."""
    from woodfisher.tuning import heldout_loss
    wf.register_method(MyOBS)
    model, loader, heldout = _mlp(), _loader(), _loader(32)
    opts = dict(method="test_obs", num_grads=64, num_steps=1, block_size=10, progress=False)
    best, losses = wf.search_damp(model, loader, heldout, sparsity=0.7, grid=[1e-4, 1e-1], **opts)
    for damp, loss in losses.items():
        pruned = copy.deepcopy(model)
        wf.prune_one_shot(pruned, loader, sparsity=0.7, damp=damp, **opts)
        assert loss == pytest.approx(heldout_loss(pruned, heldout), rel=1e-5)
    assert best == min(losses, key=losses.get)
    with pytest.raises(ValueError, match="uses no curvature"):
        wf.search_damp(model, loader, heldout, sparsity=0.5, method="magnitude")


class AbsScore(ScoreMethod):
    name = "test_abs"
    patterns = ("nm", "rows")

    def scores(self, ctx):
        return {t.name: t.effective_weight().abs() for t in ctx.targets}


def _wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def _wide_loader():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 16, generator=gen), torch.randint(0, 4, (16,), generator=gen))]


def test_score_method_with_a_pattern_prunes_that_pattern(registry):
    """A ScoreMethod listing "nm" / "rows" used to get an unstructured mask (the pattern silently ignored)."""
    wf.register_method(AbsScore)
    model, loader = _wide_mlp(), _wide_loader()
    mine = wf.prune_one_shot(copy.deepcopy(model), loader, method="test_abs", pattern="2:4", progress=False)
    ref = wf.prune_one_shot(copy.deepcopy(model), loader, method="magnitude", pattern="2:4", progress=False)
    for name, mask in mine.masks.items():
        assert (mask.reshape(-1, 4).sum(1) == 2).all()
        assert torch.equal(mask, ref.masks[name])  # |w| scores: the magnitude N:M mask
    rows = wf.prune_one_shot(copy.deepcopy(model), loader, method="test_abs", pattern="rows", sparsity=0.5,
                             mode="layerwise", progress=False)
    for name, weight in model.named_parameters():
        if name.endswith("weight"):
            norms = weight.detach().abs().sum(1)  # a row's cost: its L1 norm
            pruned = torch.zeros_like(norms, dtype=torch.bool)
            pruned[norms.argsort()[: norms.numel() // 2]] = True
            assert torch.equal(rows.masks[name], ~pruned[:, None].expand_as(weight))


def test_a_method_put_into_methods_directly_is_checked_when_named(registry):
    """The in-package way (one line in METHODS) is checked too, when a call names it: not at a later step."""
    METHODS["test_bad"] = type("M", (ScoreMethod,), {"name": "test_bad", "curvature": "hessian",
                                                     "scores": lambda s, c: {}})()
    with pytest.raises(ValueError, match="curvature must be one of"):
        wf.PruneConfig(sparsity=0.5, method="test_bad")
    METHODS["test_other"] = RandomScore()
    with pytest.raises(ValueError, match="named 'test_random'"):
        wf.PruneConfig(sparsity=0.5, method="test_other")


def test_custom_method_example_runs_and_its_obs_method_equals_woodfisher(registry):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "custom_method.py"
    spec = importlib.util.spec_from_file_location("custom_method", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    table = example.main(["--sparsities", "0.5", "0.8", "--epochs", "8", "--num-grads", "64"])
    for sparsity in (0.5, 0.8):  # |w| / sqrt([F^-1]_qq) ranks as the OBS saliency; the same update
        assert table[("obs_abs", sparsity)] == table[("woodfisher", sparsity)]
    assert table["dense"] > 0.8 and "snip" in METHODS
