"""Per-weight sparsities, ``sparsity={name or pattern: fraction}``: the weights the keys select (within ``modules=``,
less ``exclude=``), each pruned to exactly its own count (as ``mode="layerwise"`` counts); a dict giving every weight
one value is ``mode="layerwise"`` bit for bit (masks and OBS-updated weights), in one step or several; each weight
scheduled from its own start on the scalar rule; a weight's own name wins over a module, which wins over a pattern;
the refusals (ValueErrors naming ``sparsity`` / ``sparsity[key]`` / ``pattern``, nothing modified); the report's
target column; prune_with on a curvature; the CLI (``--sparsity`` as ``name=fraction`` pairs, JSON, config file)."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from _pruner_shared import same_state, state_copy
from test_exclude import ALL, _data, _Net

import woodfisher as wf
from woodfisher.auto_rules import step_sparsities
from woodfisher.checkpoint import save_state_dict
from woodfisher.cli import main
from woodfisher.models import digits_mlp
from woodfisher.reports import format_table, sparsity_table

FAST = dict(num_grads=16, progress=False)


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def _check_counts(tensors, fractions):
    """Each weight (or keep-mask: False counts as zero) holds exactly round(fraction * numel) zeros."""
    for name, s in fractions.items():
        assert _zeros(tensors[name]) == round(s * tensors[name].numel()), name


@pytest.mark.parametrize("num_steps", [1, 2])
def test_each_weight_reaches_its_own_count(num_steps):
    model, data = _Net(), _data()
    sparsity = {"conv1": 0.3, "block.*": 0.7, "block.2.weight": 0.25, "*.fc1": 0.9}
    result = wf.prune_one_shot(model, data, sparsity=sparsity, num_steps=num_steps, **FAST)
    expected = {"conv1.weight": 0.3, "block.0.weight": 0.7, "block.2.weight": 0.25, "head.fc1.weight": 0.9}
    assert list(result.masks) == list(expected) and result.config["sparsity"] == expected
    _check_counts(model.state_dict(), expected)
    assert [row["target"] for row in result.layers] == list(expected.values())
    assert len(result.config["steps"]) == num_steps
    total = sum(result.masks[n].numel() for n in expected)
    assert result.sparsity == pytest.approx(sum(_zeros(model.state_dict()[n]) for n in expected) / total)


@pytest.mark.parametrize("num_steps", [1, 2, "auto"])
@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_one_value_for_every_weight_is_layerwise_bit_for_bit(num_steps, mode):
    data = _data(n=128)  # "auto": 2 steps of 64 gradients
    a, b = _Net(), _Net()
    dense = state_copy(a)
    options = dict(num_steps=num_steps, num_grads=128, progress=False)
    ra = wf.prune_one_shot(a, data, sparsity={name: 0.6 for name in ALL}, mode=mode, **options)
    rb = wf.prune_one_shot(b, data, sparsity=0.6, mode="layerwise", **options)
    assert len(ra.config["steps"]) == len(rb.config["steps"])
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ALL)
    assert same_state(a, b.state_dict())
    # the OBS update moved the kept weights (not a mask alone)
    assert any(not torch.equal(a.state_dict()[n][ra.masks[n]], dense[n][ra.masks[n]]) for n in ALL)


def test_every_weight_is_scheduled_from_its_own_start_on_the_scalar_rule():
    config = wf.PruneConfig(sparsity={"a": 0.8, "b": 0.5, "c": 0.2}, num_steps=3, num_grads=30)
    starts = {"a": 0.0, "b": 0.3, "c": 0.4}
    steps = config.steps(starts)
    assert [m for _, m in steps] == [10, 10, 10]
    for name, final in config.sparsity.items():
        got = [s[name] for s, _ in steps]
        if final > starts[name]:
            scalar = wf.PruneConfig(sparsity=final, num_steps=3, num_grads=30).steps(starts[name])
            assert got == [s for s, _ in scalar] == step_sparsities(starts[name], final, 3, "geometric")
        else:
            assert got == [final] * 3  # above its target: held where it is (never revived)
    auto = wf.PruneConfig(sparsity={"a": 0.9, "b": 0.3}, num_grads=512).steps({"a": 0.0, "b": 0.0})
    most = max(len(wf.PruneConfig(sparsity=s, num_grads=512).steps(0.0)) for s in (0.9, 0.3))
    assert len(auto) == most and auto[-1][0] == {"a": 0.9, "b": 0.3}


def test_a_weight_already_sparser_than_its_target_keeps_its_mask():
    model, data = _Net(), _data()
    with torch.no_grad():
        model.conv1.weight[:, :, :, :2] = 0  # 2/3 of conv1 already zero
    before = model.conv1.weight.detach().clone()
    with pytest.warns(UserWarning, match="already hold more zeros"):
        wf.prune_one_shot(model, data, sparsity={"conv1": 0.5, "block": 0.5}, **FAST)
    assert torch.equal((model.conv1.weight == 0), (before == 0))
    _check_counts(model.state_dict(), {"block.0.weight": 0.5, "block.2.weight": 0.5})


def test_precedence_of_keys_and_mode_global():
    config = dict(num_grads=16, progress=False)
    for sparsity, expected in [
        ({"head.*": 0.5, "head.fc2.weight": 0.2}, {"head.fc1.weight": 0.5, "head.fc2.weight": 0.2}),
        ({"head": 0.5, "head.fc2": 0.2}, {"head.fc1.weight": 0.5, "head.fc2.weight": 0.2}),  # own name > holder
        ({"*": 0.4, "block": 0.6}, {**{n: 0.4 for n in ALL}, "block.0.weight": 0.6, "block.2.weight": 0.6}),
        ({"*.fc*": 0.5, "head.*": 0.5}, {"head.fc1.weight": 0.5, "head.fc2.weight": 0.5}),  # same value: fine
    ]:
        model = _Net()
        result = wf.prune_one_shot(model, _data(), sparsity=sparsity, **config)
        assert result.config["sparsity"] == {n: expected[n] for n in ALL if n in expected}
        _check_counts(model.state_dict(), expected)


def test_modules_and_exclude_narrow_the_keys():
    model = _Net()
    result = wf.prune_one_shot(model, _data(), sparsity={"*": 0.5}, modules=["block", "head"], exclude=["*.fc2"],
                               **FAST)
    assert list(result.masks) == ["block.0.weight", "block.2.weight", "head.fc1.weight"]
    assert result.config["exclude"] is None and result.config["modules"] == list(result.masks)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity={"conv1": 1.0}), r"sparsity\['conv1'\] must lie in \[0, 1\)"),
    (dict(sparsity={"conv1": "half"}), r"sparsity\['conv1'\] must be a number"),
    (dict(sparsity={"conv1": -0.1}), r"sparsity\['conv1'\] must lie"),
    (dict(sparsity={}), "sparsity: an empty dict"),
    (dict(sparsity={3: 0.5}), "sparsity: keys are"),
    (dict(sparsity={"conv1": 0.5}, pattern="2:4"), "pattern='2:4' fixes one sparsity"),
    (dict(sparsity={"conv1": 0.9}, min_density=0.2), "min_density=0.2 cannot be kept"),
    (dict(sparsity={"*.fc*": 0.5, "head.*": 0.7}), r"sparsity: the patterns '\*.fc\*' and 'head.\*' both select "
                                                   "'head.fc1.weight'"),
    (dict(sparsity={"head": 0.5, "head.fc1": 0.5, "head.fc1.weight": 0.7}), "sparsity: the names 'head.fc1' and "
                                                                          "'head.fc1.weight'"),
    (dict(sparsity={"nope": 0.5}), r"sparsity\['nope'\]: no module or parameter named 'nope'"),
    (dict(sparsity={"head": 0.5}, modules=["block"]), r"sparsity\['head'\] selects none of the weights"),
    (dict(sparsity={"head.fc2": 0.5}, exclude=["head"]), "exclude"),
])
def test_bad_dicts_are_refused_before_anything_changes(kwargs, match):
    model = _Net()
    before = state_copy(model)
    with pytest.raises(ValueError, match=match):
        wf.prune_one_shot(model, _data(), **FAST, **kwargs)
    assert same_state(model, before)


def test_select_masks_takes_a_fraction_per_weight():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(30, generator=g)}
    per = wf.select_masks(scores, {"a": 0.4, "b": 0.4})
    same = wf.select_masks(scores, 0.4, mode="layerwise")
    assert all(torch.equal(per[n], same[n]) for n in scores)
    per = wf.select_masks(scores, {"a": 0.2, "b": 0.9}, mode="global")
    assert int((~per["a"]).sum()) == round(0.2 * 35) and int((~per["b"]).sum()) == 27
    with pytest.raises(ValueError, match=r"sparsity: a dict must give every scored weight a fraction; \['b'\]"):
        wf.select_masks(scores, {"a": 0.2})
    with pytest.raises(ValueError, match=r"sparsity\['b'\] must lie"):
        wf.select_masks(scores, {"a": 0.2, "b": 1.5})


def test_the_report_shows_each_target_beside_what_was_reached():
    model = _Net()
    result = wf.prune_one_shot(model, _data(), sparsity={"conv1": 0.3, "head": 0.8}, **FAST)
    rows = sparsity_table(result)
    assert [r["target"] for r in rows] == pytest.approx([30.0, 80.0, 80.0])
    table = format_table(rows)
    assert "target %" in table.splitlines()[0] and "| 30.00 |" in table
    assert "target" not in format_table(sparsity_table(wf.prune_one_shot(_Net(), _data(), sparsity=0.5, **FAST)))


def test_prune_with_a_dict_prunes_the_weights_its_keys_select():
    data = _data()
    model = _Net()
    curvature = wf.estimate_curvature(model, data, **FAST)
    dense = state_copy(model)
    pruned = copy.deepcopy(model)
    result = wf.prune_with(pruned, curvature, {"block": 0.5, "head.fc1": 0.75})
    assert list(result.masks) == ["block.0.weight", "block.2.weight", "head.fc1.weight"]
    _check_counts(pruned.state_dict(), {"block.0.weight": 0.5, "block.2.weight": 0.5, "head.fc1.weight": 0.75})
    for name in ("conv1.weight", "head.fc2.weight"):
        assert torch.equal(pruned.state_dict()[name], dense[name])
    with pytest.raises(ValueError, match=r"sparsity\['nope'\]"):
        wf.prune_with(copy.deepcopy(model), curvature, {"nope": 0.5})


def test_gradual_pruner_ramps_every_weight_to_its_own_fraction_and_resumes():
    data = _data()
    final = {"conv1": 0.3, "block": 0.6, "head.fc1": 0.9}
    schedule = dict(final_sparsity=final, start_step=0, end_step=4, frequency=2, initial_sparsity=0.4)
    model = _Net()
    pruner = wf.GradualPruner(model, data, num_grads=16, progress=False, **schedule)
    names = {"conv1.weight": 0.3, "block.0.weight": 0.6, "block.2.weight": 0.6, "head.fc1.weight": 0.9}
    assert pruner.final_sparsity == names
    for step in (0, 2):
        pruner.step(step)
        for name, f in names.items():  # each weight's own ramp, from min(initial_sparsity, its fraction)
            s = wf.polynomial_sparsity(step, final_sparsity=f, start_step=0, end_step=4, frequency=2,
                                       initial_sparsity=min(0.4, f))
            keep = pruner.masks()[name]
            assert int((~keep).sum()) == round(s * keep.numel()), (step, name)
    state = pruner.state_dict()
    other = _Net()
    resumed = wf.GradualPruner(other, data, num_grads=16, progress=False, **schedule)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.masks()[n], pruner.masks()[n]) for n in names)
    resumed.step(4)
    _check_counts(resumed.masks(), names)
    changed = wf.GradualPruner(_Net(), data, num_grads=16, progress=False, **dict(schedule, final_sparsity=0.5))
    with pytest.raises(ValueError, match="different schedule"):
        changed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"final_sparsity\['block'\] must lie in \[0, 1\)"):
        wf.GradualPruner(_Net(), data, final_sparsity={"block": 1.0}, end_step=2)


@pytest.fixture(scope="module")
def mlp_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_state_dict(digits_mlp(), tmp_path_factory.mktemp("ckpt") / "digits.pt"))


@pytest.mark.parametrize("spelling", ["layers.0=0.5,layers.[12]=0.8", '{"layers.0": 0.5, "layers.[12]": 0.8}',
                                      "config"])
def test_the_cli_takes_per_weight_sparsities(mlp_ckpt, tmp_path, capsys, spelling):
    out = tmp_path / "run"
    common = ["prune", "--model", "digits_mlp", "--checkpoint", mlp_ckpt, "--num-grads", "16", "--no-progress",
              "--out", str(out)]
    if spelling == "config":
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps({"sparsity": {"layers.0": 0.5, "layers.[12]": 0.8}}))
        assert main([*common, "--config", str(cfg)]) == 0
    else:
        assert main([*common, "--sparsity", spelling]) == 0
    assert "target %" in capsys.readouterr().out
    state = torch.load(out / "pruned.pt", weights_only=True)
    expected = {"layers.0.weight": 0.5, "layers.1.weight": 0.8, "layers.2.weight": 0.8}
    _check_counts(state, expected)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["sparsity"] == expected
    assert [row["target"] for row in report["layers"]] == pytest.approx([50.0, 80.0, 80.0])


@pytest.mark.parametrize("value, match", [("layers.0=1.5", r"sparsity\['layers.0'\] must lie in \[0, 1\)"),
                                          ("layers.0=x", r"sparsity\['layers.0'\] must be a number"),
                                          ("{bad json", "not a JSON object"), ("=0.5", "not name=fraction")])
def test_the_cli_refuses_bad_per_weight_sparsities(mlp_ckpt, tmp_path, capsys, value, match):
    with pytest.raises(SystemExit) as exited:  # argparse's exit, one line on stderr
        main(["prune", "--model", "digits_mlp", "--checkpoint", mlp_ckpt, "--sparsity", value,
              "--out", str(tmp_path / "bad")])
    assert exited.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()
