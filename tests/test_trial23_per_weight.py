"""Per-weight ``sparsity={...}`` and ``exclude=`` as a user coming from SparseML / Torch-Pruning writes them: a key
whose fraction reaches no weight (every weight it selects excluded, or given another value by a key of higher
precedence) is refused instead of silently ignored; a dict is reported as the layerwise ranking it is; the
``min_density`` refusal names the keys it cannot be kept at; an ``exclude`` entry naming a real weight that is not
pruned says why; the hints for regular expressions and relative names fit a dict key (all ValueErrors before
anything is modified)."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from _pruner_shared import same_state, state_copy
from test_exclude import _data, _Net
from torch import nn

import woodfisher as wf
from woodfisher.checkpoint import save_state_dict
from woodfisher.cli import main
from woodfisher.models import digits_mlp
from woodfisher.reports import plot_layer_sparsity, sparsity_table

FAST = dict(num_grads=16, progress=False)


def _refused(match: str, model=None, **kwargs) -> str:
    model = model if model is not None else _Net()
    before = state_copy(model)
    with pytest.raises(ValueError, match=match) as info:
        wf.prune_one_shot(model, _data(), **FAST, **kwargs)
    assert same_state(model, before)
    return str(info.value)


@pytest.mark.parametrize("sparsity, key, winners", [
    ({"block": 0.5, "*.2": 0.9}, "*.2", ["'block' (module name, 0.5)"]),  # a module beats a narrower pattern
    ({"*": 0.8, "conv1": 0.1, "block": 0.2, "head": 0.3}, "*", ["'conv1' (name, 0.1)", "'block' (module name, 0.2)"]),
    ({"head": 0.5, "head.fc1": 0.6, "head.fc2": 0.7}, "head", ["'head.fc1' (name, 0.6)", "'head.fc2' (name, 0.7)"]),
])
def test_a_key_given_another_value_on_every_weight_it_selects_is_refused(sparsity, key, winners):
    text = _refused(rf"^sparsity\[{re.escape(repr(key))}\]={sparsity[key]:g} reaches no weight", sparsity=sparsity)
    assert all(w in text for w in winners), text
    with pytest.raises(ValueError, match=r"reaches no weight"):  # the same rule in every entry point
        wf.GradualPruner(_Net(), _data(), final_sparsity=sparsity, end_step=2, **FAST)


def test_keys_overridden_with_their_own_value_or_deciding_some_weight_are_kept():
    model = _Net()
    sparsity = {"*": 0.5, "block": 0.5, "head": 0.7, "head.fc2": 0.25}  # "*" decides conv1; "block" agrees
    result = wf.prune_one_shot(model, _data(), sparsity=sparsity, **FAST)
    assert result.config["sparsity"] == {"conv1.weight": 0.5, "block.0.weight": 0.5, "block.2.weight": 0.5,
                                         "head.fc1.weight": 0.7, "head.fc2.weight": 0.25}
    for name, s in result.config["sparsity"].items():
        assert int((~result.masks[name]).sum()) == round(s * result.masks[name].numel())


def test_a_key_whose_weights_are_all_excluded_is_refused():
    text = _refused(r"^sparsity\['head.fc2'\] selects only weights that exclude leaves dense",
                    sparsity={"block": 0.5, "head.fc2": 0.3}, exclude=["head.fc2"])
    assert "head.fc2.weight" in text
    # a key that still reaches a weight beside the excluded ones is fine
    result = wf.prune_one_shot(_Net(), _data(), sparsity={"block": 0.5, "head": 0.3}, exclude=["head.fc2"], **FAST)
    assert list(result.masks) == ["block.0.weight", "block.2.weight", "head.fc1.weight"]


def test_a_dict_is_reported_as_layerwise():
    model = _Net()
    result = wf.prune_one_shot(model, _data(), sparsity={"block": 0.5, "head": 0.8}, mode="global", **FAST)
    assert result.config["mode"] == "layerwise"
    curvature = wf.estimate_curvature(copy.deepcopy(_Net()), _data(), **FAST)
    again = wf.prune_with(copy.deepcopy(_Net()), curvature, {"block": 0.5}, mode="global")
    assert again.config["mode"] == "layerwise"


def test_a_scalar_prune_with_on_a_curvature_estimated_with_a_dict_keeps_the_callers_mode():
    dense = _Net()
    curvature = wf.estimate_curvature(dense, _data(), sparsity={"block": 0.2, "head": 0.2}, **FAST)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    ra = wf.prune_with(a, curvature, 0.6)  # the default mode, global, as for a curvature estimated without a dict
    rb = wf.prune_with(b, wf.estimate_curvature(copy.deepcopy(dense), _data(), modules=list(ra.masks), **FAST), 0.6)
    assert ra.config["mode"] == rb.config["mode"] == "global"
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)
    assert any(abs(row["sparsity"] - 0.6) > 0.01 for row in ra.layers)  # ranked globally, not each weight to 0.6


def test_min_density_with_a_dict_names_the_keys_it_cannot_be_kept_at():
    text = _refused(r"^min_density=0.2 cannot be kept at sparsity\['block'\]=0.9",
                    sparsity={"conv1": 0.5, "block": 0.9}, min_density=0.2)
    assert "conv1" not in text and "at most 0.1" in text and "at most 0.8" in text
    model = _Net()
    result = wf.prune_one_shot(model, _data(), sparsity={"conv1": 0.5, "block": 0.9}, min_density=0.05, **FAST)
    for name, s in result.config["sparsity"].items():  # the floor is below every target: the counts are exact
        assert int((~result.masks[name]).sum()) == round(s * result.masks[name].numel())


class _Tied(nn.Module):
    """An embedding whose weight the output layer shares (a tied LM head), and a hidden Linear."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, x):
        return self.lm_head(torch.relu(self.fc(self.emb(x)))).mean(1)


def test_exclude_of_a_weight_that_is_not_pruned_says_why():
    tied, data = _Tied(), [(torch.randint(0, 10, (4, 5)), torch.randint(0, 10, (4,))) for _ in range(4)]
    before = state_copy(tied)
    with pytest.raises(ValueError, match=r"^exclude: 'lm_head' matches none") as info:
        wf.prune_one_shot(tied, data, sparsity=0.5, exclude=["lm_head"], **FAST)
    assert same_state(tied, before)
    text = str(info.value)
    assert "'emb.weight' (the same Parameter: tied)" in text and "not pruned by default" in text, text
    assert "drop the entry" in text
    text = _refused(r"^exclude: 'conv1' matches none", sparsity={"block": 0.5}, exclude=["conv1"])
    assert "'conv1.weight'" in text and "keys of a sparsity dict" in text and "drop the entry" in text, text
    text = _refused(r"^exclude: 'head.\*' matches none", modules=["block"], sparsity=0.5, exclude=["head.*"])
    assert "'head.fc1.weight', 'head.fc2.weight'" in text and "not selected by the modules option" in text, text


@pytest.mark.parametrize("key", ["re:.*fc.*", ".*fc.*"])
def test_a_regular_expression_key_gets_the_dict_to_build(key):
    text = _refused(r"for a regular expression, sparsity=\{name: <fraction> for name in \[t.name for t in "
                    r"woodfisher.resolve_targets\(model\) if re.fullmatch", sparsity={key: 0.5})
    assert f"sparsity[{key!r}]=[" not in text


def test_a_relative_name_gets_the_pattern_that_selects_it():
    text = _refused(r"^sparsity\['fc1'\]: no module or parameter is named 'fc1'; 1 end with it \('head.fc1'\): "
                    r"names are full names; the shell-style pattern '\*.fc1' selects them all$", sparsity={"fc1": 0.5})
    assert "=[name" not in text
    _refused(r"'\*.fc1' selects them all, or modules=\[name for name, _ in model.named_modules\(\) "
             r"if name.endswith\('.fc1'\)\]$", modules=["fc1"], sparsity=0.5)
    result = wf.prune_one_shot(_Net(), _data(), sparsity={"*.fc1": 0.5}, **FAST)  # the pattern it suggests works
    assert list(result.masks) == ["head.fc1.weight"]


def test_a_dict_of_zeros_says_so_and_changes_nothing():
    model = _Net()
    before = state_copy(model)
    with pytest.warns(UserWarning, match=r"^sparsity=0 prunes nothing \(every fraction of the sparsity dict is 0\)"):
        result = wf.prune_one_shot(model, _data(), sparsity={"block": 0.0, "head": 0.0}, **FAST)
    assert same_state(model, before) and result.config["sparsity"] == {
        "block.0.weight": 0.0, "block.2.weight": 0.0, "head.fc1.weight": 0.0, "head.fc2.weight": 0.0}


def test_gradual_pruner_names_final_sparsity_in_key_errors():
    for final, match in [({"blok": 0.5}, r"^final_sparsity\['blok'\]: no module or parameter named 'blok' in the model "
                                         r"\(did you mean 'block'\?\)"),
                         ({"block": 0.5, "*.2": 0.9}, r"^final_sparsity\['\*.2'\]=0.9 reaches no weight"),
                         ({"head.*": 0.5, "*.fc1": 0.7}, r"^final_sparsity: the patterns 'head.\*' and '\*.fc1'")]:
        model = _Net()
        before = state_copy(model)
        with pytest.raises(ValueError, match=match):
            wf.GradualPruner(model, _data(), final_sparsity=final, end_step=2, **FAST)
        assert same_state(model, before)


class _Recurrent(nn.Module):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__()
        self.rnn, self.fc = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("key", ["rnn", "rnn.*"])
def test_a_key_over_weights_left_out_of_the_defaults_gets_the_dict_that_names_them(key):
    data = [(torch.randn(4, 5, 3), torch.randint(0, 3, (4,))) for _ in range(4)]
    wanted = "sparsity={'rnn.weight_ih_l0': <fraction>, 'rnn.weight_hh_l0': <fraction>}"
    text = _refused(re.escape(wanted) + "$", model=_Recurrent(), sparsity={key: 0.5, "fc": 0.3})
    assert "modules=" not in text and f"sparsity[{key!r}]=[" not in text, text
    result = wf.prune_one_shot(_Recurrent(), data, sparsity={"rnn.weight_ih_l0": 0.5, "rnn.weight_hh_l0": 0.5},
                               **FAST)  # the dict it suggests works
    assert list(result.masks) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]


def test_the_layer_plot_marks_each_per_weight_target(tmp_path):
    """The CLI's layer_sparsity.png showed what each weight reached but not the target it was given."""
    model = _Net()
    result = wf.prune_one_shot(model, _data(), sparsity={"block": 0.5, "head": 0.8}, **FAST)
    rows = sparsity_table(result, model=model)
    assert [r["target"] for r in rows] == pytest.approx([50.0, 50.0, 80.0, 80.0])
    svg = open(plot_layer_sparsity({"woodfisher": rows}, tmp_path / "t.svg")).read()
    assert 'id="targets-0"' in svg and "<!-- target -->" in svg
    group = svg.split('id="targets-0"')[1].split("</g>")[0]
    assert group.count("<path ") == len(rows)  # one mark per weight
    plain = open(plot_layer_sparsity({"woodfisher": [{k: v for k, v in r.items() if k != "target"} for r in rows]},
                                     tmp_path / "p.svg")).read()
    assert "targets-0" not in plain and "<!-- target -->" not in plain


def test_prune_with_names_the_curvatures_weights_for_a_key_outside_them():
    model = _Net()
    curvature = wf.estimate_curvature(model, _data(), modules=["block"], **FAST)
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"^sparsity\['head'\] selects none of the weights the curvature was estimated "
                                         r"on \(block.0.weight, block.2.weight\)") as info:
        wf.prune_with(model, curvature, {"block": 0.5, "head": 0.5})
    assert "modules=" not in str(info.value).split("estimate_curvature")[0] and same_state(model, before)


def test_module_and_weight_objects_as_keys_get_the_dict_of_their_names():
    """Torch-Pruning's pruning_ratio_dict and ignored_layers hold module objects; the message shows a short stand-in
    (a Parameter's repr printed every value) and the recipe for the names."""
    model = _Net()
    text = _refused(r"^sparsity: keys are .* got <Conv2d module>; for modules as keys \(Torch-Pruning's "
                    r"pruning_ratio_dict\), pass their names: sparsity=\{n: fraction for n, mod in "
                    r"model.named_modules\(\) for layer, fraction in ratios.items\(\) if mod is layer\}$",
                    model=model, sparsity={model.conv1: 0.5})
    text = _refused(r"got <Parameter of shape \(4, 2, 3, 3\)>; for weights as keys, pass their names", model=model,
                    sparsity={model.conv1.weight: 0.5})
    assert "tensor(" not in text
    text = _refused(r"^exclude must be None or a non-empty list of names, got \[<Parameter of shape \(4, 2, 3, 3\)>\] "
                    r"\(tensors: their names are", model=model, sparsity=0.5, exclude=[model.conv1.weight])
    assert "tensor(" not in text
    ratios = {model.conv1: 0.3, model.head: 0.7}  # the recipe, as the message writes it, works
    sparsity = {n: fraction for n, mod in model.named_modules() for layer, fraction in ratios.items() if mod is layer}
    result = wf.prune_one_shot(model, _data(), sparsity=sparsity, **FAST)
    assert result.config["sparsity"] == {"conv1.weight": 0.3, "head.fc1.weight": 0.7, "head.fc2.weight": 0.7}


def test_the_cli_refuses_a_dict_with_a_pattern_in_its_own_words(tmp_path, capsys):
    ckpt = str(save_state_dict(digits_mlp(), tmp_path / "digits.pt"))
    code = main(["prune", "--model", "digits_mlp", "--checkpoint", ckpt, "--sparsity", "layers.0=0.5",
                 "--pattern", "2:4", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "--pattern 2:4 fixes one sparsity" in err and "(leave pattern out)" in err, err
    assert "--pattern None" not in err and not (tmp_path / "bad").exists()


def test_magnitude_overlap_of_a_dict_compares_with_magnitude_at_the_same_per_weight_targets():
    from woodfisher.masks import select_masks
    sparsity = {"conv1": 0.2, "block": 0.5, "head": 0.9}
    plain = wf.prune_one_shot(_Net(), _data(), sparsity=sparsity, method="magnitude", **FAST)
    assert plain.magnitude_overlap == 1.0  # fair: magnitude compared with itself at the same targets
    model = _Net()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = wf.prune_one_shot(model, _data(), sparsity=sparsity, num_steps=1, **FAST)
    mag = select_masks({n: dense[n].abs() for n in result.masks}, result.config["sparsity"])
    pruned = [(~mag[n]).sum() for n in mag]
    both = [(~mag[n] & ~result.masks[n]).sum() for n in mag]
    assert result.magnitude_overlap == pytest.approx(float(sum(both)) / float(sum(pruned)), abs=1e-12)
