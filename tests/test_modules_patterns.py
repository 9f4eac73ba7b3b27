"""``modules=`` with shell-style patterns (fnmatch) over full names: the default targets whose name, or the name of
a module holding them (or of one of its parents), matches; checked against the same selection spelt out name by
name, through a wrapper's prefix, and refused (ValueError naming ``modules``) when nothing matches."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import woodfisher as wf


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        y = self.norm(x)
        return x + self.attn(y, y, y, need_weights=False)[0] + self.mlp(y)


class _ViT(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 4, d))
        self.blocks = nn.Sequential(_Block(d), _Block(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.blocks(x).mean(1))


def _names(model, modules):
    return [t.name for t in wf.resolve_targets(model, modules)]


@pytest.mark.parametrize("pattern, expected", [
    ("blocks.*.mlp.*", ["blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight", "blocks.1.mlp.0.weight",
                        "blocks.1.mlp.2.weight"]),
    ("*.attn", ["blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight", "blocks.1.attn.in_proj_weight",
                "blocks.1.attn.out_proj.weight"]),
    ("blocks.[1].mlp.?", ["blocks.1.mlp.0.weight", "blocks.1.mlp.2.weight"]),
    ("*weight", ["patch.weight"] + [f"blocks.{i}.{w}" for i in range(2) for w in (
        "attn.in_proj_weight", "attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight")] + ["head.weight"]),
])
def test_a_pattern_selects_the_default_targets_it_matches(pattern, expected):
    model = _ViT()
    assert _names(model, [pattern]) == expected
    assert _names(model, [pattern]) == _names(model, expected)  # the same as naming each one
    wrapped = nn.DataParallel(model)
    prefixed = ["module." + name for name in expected]
    assert _names(wrapped, [pattern]) == prefixed and _names(wrapped, ["module." + pattern]) == prefixed


def test_patterns_and_names_mix_without_repeats():
    model = _ViT()
    assert _names(model, ["head", "blocks.*.mlp.2", "blocks.0.mlp.2"]) == [
        "head.weight", "blocks.0.mlp.2.weight", "blocks.1.mlp.2.weight"]


@pytest.mark.parametrize("pattern", ["*.bias", r"blocks\.\d+\.mlp\..*"])
def test_a_pattern_matching_no_default_target_is_refused_naming_modules(pattern):
    with pytest.raises(ValueError, match=r"^modules: the pattern .* matches no weight pruned by default.*fnmatch"):
        _names(_ViT(), [pattern])


def test_a_pattern_matching_only_a_free_table_names_it_to_paste():
    with pytest.raises(ValueError, match=r"^modules: the pattern 'pos\*' matches only weights left out of the "
                                         r"defaults; these are pruned when named exactly: modules=\['pos'\]$"):
        _names(_ViT(), ["pos*"])
    assert _names(_ViT(), ["pos"]) == ["pos"]


def test_prune_one_shot_with_a_pattern_prunes_those_weights_only():
    torch.manual_seed(0)
    model = _ViT()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    res = wf.prune_one_shot(model, data, sparsity=0.5, modules=["blocks.*.mlp.*"], num_grads=32, progress=False)
    assert sorted(res.masks) == sorted(_names(model, ["blocks.*.mlp.*"]))
    for name, p in model.named_parameters():
        if name not in res.masks:
            assert torch.equal(p, before[name]), name


def test_global_magnitude_refuses_mode_layerwise_naming_magnitude():
    with pytest.raises(ValueError, match=r"^mode='layerwise' does not apply to method 'global_magnitude'.*"
                                         r"method='magnitude' is its layerwise form"):
        wf.PruneConfig(sparsity=0.5, method="global_magnitude", mode="layerwise")
    wf.PruneConfig(sparsity=0.5, method="magnitude")  # its own mode under the default mode="global": accepted


def test_collapse_warning_names_the_mode_the_method_ranked_by():
    torch.manual_seed(0)
    model = _ViT()  # the patch conv's weights are the smallest: global magnitude empties it
    with torch.no_grad():
        model.patch.weight.mul_(1e-3)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))]
    with pytest.warns(UserWarning, match=r"layer collapse: \['patch.weight'\].*\(mode='global'\)"):
        wf.prune_one_shot(model, data, sparsity=0.5, method="global_magnitude", progress=False)


@pytest.mark.parametrize("regex", [r"blocks\.0", "blocks.(0|1).mlp", "^head$"])
def test_a_regular_expression_is_refused_with_the_resolve_targets_recipe(regex):
    with pytest.raises(ValueError, match=r"^modules: .* looks like a regular expression.*woodfisher\.resolve_targets"):
        _names(_ViT(), [regex])


def test_a_module_whose_name_holds_pattern_characters_is_found_by_its_name():
    model = nn.ModuleDict({"conv[0]": nn.Conv2d(3, 4, 1), "head": nn.Linear(4, 2)})
    assert _names(model, ["conv[0]"]) == ["conv[0].weight"]


def test_the_sparsity_table_of_a_model_lists_the_weights_the_pruner_prunes_masked_or_compiled():
    from woodfisher.reports import sparsity_table
    torch.manual_seed(0)
    model = _ViT()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    res = wf.prune_one_shot(model, data, sparsity=0.5, num_grads=32, keep_masks=True, progress=False)
    rows = sparsity_table(model)  # masks attached: weight_orig / weight_mask, read as the masked weights
    assert [r["layer"] for r in rows] == list(res.masks)  # in_proj_weight included, as pruned
    for row in rows:
        assert row["nnz"] == int(res.masks[row["layer"]].sum()), row["layer"]
    compiled = sparsity_table(torch.compile(model), input_shape=(3, 8, 8))
    assert [r["layer"] for r in compiled] == ["_orig_mod." + name for name in res.masks]
    in_proj = next(r for r in compiled if r["layer"].endswith("blocks.0.attn.in_proj_weight"))
    assert in_proj["flops_dense"] == 24 * 8 * 4  # 3 x 8 rows x 8 inputs, each used by the 4 patch tokens


@pytest.mark.parametrize("depthwise", [False, True])
def test_kfac_names_every_weight_it_cannot_model_and_the_modules_that_prune_the_rest(depthwise):
    import re
    torch.manual_seed(0)
    model = _ViT()
    if depthwise:  # a ConvNeXt-style depthwise conv in front: refused too
        model.patch = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 8, 4, 4))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    with pytest.raises(ValueError, match=r"^method='kfac'") as info:
        wf.prune_one_shot(model, data, sparsity=0.5, method="kfac", num_grads=32, progress=False)
    refused = re.search(r"weights it cannot model: (\[.*?\])", str(info.value)).group(1)
    attention = [f"blocks.{i}.attn.{w}" for i in range(2) for w in ("in_proj_weight", "out_proj.weight")]
    assert eval(refused) == (["patch.0.weight"] if depthwise else []) + attention
    found = re.search(r"modules=(\[.*?\]) prunes the others", str(info.value))
    others = eval(found.group(1)) if found else [n for n in _names(model, None) if n not in eval(refused)]
    res = wf.prune_one_shot(model, data, sparsity=0.5, method="kfac", modules=others, num_grads=32, progress=False)
    assert sorted(res.masks) == sorted(others)


@pytest.mark.parametrize("target", ["plain", "compiled"])
def test_masks_and_names_from_a_model_wrapped_otherwise_resolve(target):
    torch.manual_seed(0)
    base = _ViT()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    wrapped = nn.DataParallel(copy.deepcopy(base))
    res = wf.prune_one_shot(wrapped, data, sparsity=0.5, num_grads=32, progress=False)
    assert all(name.startswith("module.") for name in res.masks)
    model = copy.deepcopy(base)
    other = model if target == "plain" else torch.compile(model)
    wf.attach_masks(other, res.masks)  # 'module.x' names the plain model's 'x'
    masked = dict(model.named_buffers())
    for name, keep in res.masks.items():
        assert torch.equal(masked[name.removeprefix("module.") + "_mask"].bool(), keep), name
    assert _names(base, ["module.blocks.0.mlp"]) == ["blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight"]
    with pytest.raises(ValueError, match="no module or parameter named 'module.nope'"):
        _names(base, ["module.nope"])


def test_the_papers_resnet20_selection_is_one_pattern():
    """The WoodFisher paper prunes ResNet-20's 18 3x3 convs of the residual blocks (not the stem, the 1x1 shortcut
    convs or the fc): 'layer*.conv*' names exactly the built-in list."""
    from woodfisher.models import RESNET20_PRUNABLE, resnet20
    assert _names(resnet20(), ["layer*.conv*"]) == list(RESNET20_PRUNABLE)
