"""FLOPs counting and reports, checked against hand-computed values on tiny models."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.flops import count_flops, flops_per_param, layer_flops
from woodfisher.reports import (
    format_table,
    plot_accuracy_vs_sparsity,
    plot_layer_sparsity,
    sparsity_table,
    table_totals,
    to_jsonable,
    write_json,
)


class Tiny(nn.Module):
    """conv 1->2 3x3 pad 1 (4x4 out), conv 2->3 3x3 stride 2 pad 1 (2x2 out), fc 12->5 (used twice)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.down = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5, bias=False)

    def forward(self, x):
        x = self.down(torch.relu(self.conv(x))).flatten(1)
        return self.head(self.fc(self.fc(x)))


def _tiny_with_zeros():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.conv.weight.view(-1)[:5] = 0.0    # 18 entries, 13 nonzero
        model.down.weight.view(-1)[::2] = 0.0   # 54 entries, 27 nonzero
        model.head.weight[:, :6] = 0.0          # 60 entries, 30 nonzero
    return model


def test_flops_hand_computed():
    model = _tiny_with_zeros()
    stats = layer_flops(model, (1, 4, 4))
    # uses per weight entry = output positions: 4*4, 2*2, and the fc is called twice
    assert {n: s["uses"] for n, s in stats.items()} == {"conv": 16, "down": 4, "fc": 2, "head": 1}
    assert count_flops(model, (1, 4, 4)) == {"conv": 18 * 16, "down": 54 * 4, "fc": 144 * 2, "head": 60}
    nnz_fc = int(torch.count_nonzero(model.fc.weight))
    assert count_flops(model, (1, 4, 4), sparse=True) == {"conv": 13 * 16, "down": 27 * 4,
                                                          "fc": nnz_fc * 2, "head": 30}
    assert flops_per_param(model, (1, 4, 4))["down.weight"] == 4
    assert model.training  # restored
    with pytest.raises(ValueError, match="input_shape"):
        layer_flops(model, ())


def test_sparsity_table_from_model_and_totals():
    model = _tiny_with_zeros()
    rows = sparsity_table(model, input_shape=(1, 4, 4), names=["conv.weight", "down.weight", "head.weight"])
    by = {r["layer"]: r for r in rows}
    assert by["conv.weight"]["shape"] == (2, 1, 3, 3)
    assert by["conv.weight"]["nnz"] == 13 and by["conv.weight"]["sparsity"] == pytest.approx(100 * 5 / 18)
    assert by["down.weight"]["flops_sparse"] == 27 * 4 and by["down.weight"]["flops_dense"] == 54 * 4
    total = table_totals(rows)
    assert total["params"] == 18 + 54 + 60 and total["nnz"] == 13 + 27 + 30
    assert total["sparsity"] == pytest.approx(100 * (1 - 70 / 132))
    assert total["flops_sparse"] == 13 * 16 + 27 * 4 + 30
    text = format_table(rows, title="tiny")
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 3 + 1  # header, rows, total
    assert lines[-1].split("|")[1].strip() == "total" and "46.97" in lines[-1]
    with pytest.raises(ValueError, match="^names: no module or parameter named .nope.weight."):
        sparsity_table(model, names=["nope.weight"])


def test_sparsity_table_from_prune_result_like():
    result = SimpleNamespace(layers=[dict(name="head.weight", shape=(5, 12), numel=60, nnz=15, sparsity=0.75)])
    rows = sparsity_table(result, model=_tiny_with_zeros(), input_shape=(1, 4, 4))
    assert rows[0]["sparsity"] == pytest.approx(75.0)
    assert rows[0]["flops_sparse"] == 15 and rows[0]["flops_dense"] == 60
    with pytest.raises(ValueError, match="result_or_model"):
        sparsity_table(42)


def test_json_and_plots(tmp_path):
    obj = {"t": torch.tensor([1.0, 2.0]), "s": torch.tensor(3), "shape": (2, 3), "f": float("nan"), "fn": len}
    path = write_json(tmp_path / "sub" / "r.json", obj)
    assert json.load(open(path)) == {"t": [1.0, 2.0], "s": 3, "shape": [2, 3], "f": "nan", "fn": "len"}
    assert to_jsonable({1: (torch.zeros(1),)}) == {"1": [0.0]}
    curves = {"a": [(50, 90.0, 1.0), (10, 95.0, 0.5)], "b": [(10, 94.0, 0.0), (50, 80.0, 0.0)]}
    png = plot_accuracy_vs_sparsity(curves, tmp_path / "acc.png", dense_accuracy=96.0)
    rows = sparsity_table(_tiny_with_zeros())
    png2 = plot_layer_sparsity({"x": rows, "y": rows}, tmp_path / "layers.png")
    for p in (png, png2):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_accuracy_vs_sparsity({}, tmp_path / "x.png")


def test_layer_sparsity_plot_labels_both_axes(tmp_path):
    """Both axes of the per-layer plot say what they show (SVG keeps each text as a comment)."""
    rows = [{"layer": "enc.0.weight", "sparsity": 40.0}, {"layer": "head.weight", "sparsity": 90.0}]
    svg = open(plot_layer_sparsity({"woodfisher": rows}, tmp_path / "layers.svg", title="T")).read()
    for text in ("layer (weight name without .weight)", "sparsity (%)", "enc.0", "head", "T"):
        assert f"<!-- {text} -->" in svg


def test_layer_sparsity_plot_shows_the_layers_of_every_table(tmp_path):
    """Tables of different layer selections (a head-only run beside a full one): every layer gets its group, whatever
    the order of the tables (the first table's layers only were drawn)."""
    head = [{"layer": "head.weight", "sparsity": 60.0}]
    full = [{"layer": "enc.0.weight", "sparsity": 40.0}, {"layer": "head.weight", "sparsity": 90.0}]
    svg = open(plot_layer_sparsity({"head only": head, "all": full}, tmp_path / "mixed.svg")).read()
    assert "<!-- enc.0 -->" in svg and "<!-- head -->" in svg


def test_to_jsonable_turns_a_prune_result_and_its_config_into_their_fields():
    """``to_jsonable`` / ``write_json`` of a PruneResult give its fields (not its summary string), and the JSON
    read back holds the same masks, per-weight table, sparsity and config."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    loader = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    result = wf.prune_one_shot(model, loader, sparsity=0.5, num_grads=16, progress=False,
                               loss_fn=torch.nn.functional.cross_entropy)
    back = json.loads(json.dumps(to_jsonable(result)))
    assert back["sparsity"] == result.sparsity and back["damp"] == result.damp
    assert back["config"]["loss_fn"] == "cross_entropy" and back["config"]["sparsity"] == 0.5
    assert back["masks"].keys() == result.masks.keys()
    assert all(torch.equal(torch.tensor(back["masks"][n]), m) for n, m in result.masks.items())
    assert [row["nnz"] for row in back["layers"]] == [row["nnz"] for row in result.layers]
    config = to_jsonable(wf.PruneConfig(sparsity=0.3, block_size=None))
    assert config["sparsity"] == 0.3 and config["block_size"] is None and config["method"] == "woodfisher"


class _CrossAttention(nn.Module):
    """Self-attention over the input (L_q = 5 tokens), then attention to a fixed memory of L_k = 7 tokens."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.register_buffer("memory", torch.randn(1, 7, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.self_attn(x, x, x, need_weights=False)[0]
        x = self.cross(x, self.memory, self.memory, need_weights=False)[0]
        return self.head(x.mean(1))


def test_attention_projections_are_counted_in_flops_and_the_report_table():
    """``nn.MultiheadAttention`` reads its projections without calling a submodule: their FLOPs are counted
    from the query / key lengths (E x E per token and projection: q over L_q, k and v over L_k, out over L_q),
    sparse FLOPs from their zeros, so a transformer's report table keeps its FLOPs columns."""
    torch.manual_seed(0)
    model, dim, lq, lk = _CrossAttention(), 8, 5, 7
    with torch.no_grad():
        model.cross.in_proj_weight[:dim].zero_()  # the query rows: used L_q times each
    stats = layer_flops(model, (lq, dim))
    assert stats["self_attn.in_proj"]["flops_dense"] == 3 * dim * dim * lq
    assert stats["self_attn.out_proj"]["flops_dense"] == dim * dim * lq
    assert stats["cross.in_proj"]["flops_dense"] == dim * dim * (lq + 2 * lk)
    assert stats["cross.in_proj"]["flops_sparse"] == dim * dim * 2 * lk
    assert stats["cross.out_proj"]["weight"] == "cross.out_proj.weight" and stats["head"]["flops_dense"] == 3 * dim
    rows = sparsity_table(model, input_shape=(lq, dim), names=["self_attn.in_proj_weight", "cross.in_proj_weight",
                                                              "cross.out_proj.weight", "head.weight"])
    assert [row["flops_dense"] for row in rows] == [3 * dim * dim * lq, dim * dim * (lq + 2 * lk), dim * dim * lq,
                                                    3 * dim]
    assert "FLOPs dense" in format_table(rows)
