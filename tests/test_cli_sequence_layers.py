"""The CLI on a speech model (Conv1d, GRU, Linear).

``woodfisher export --format csr``: the sparse Conv1d and recurrent layers it leaves dense are named (they were
left dense without a word, and a refusal named only the dense Linear head). ``woodfisher report``: recurrent
weights pruned with ``prune --modules`` are in the table and its total (they were left out)."""
import textwrap

import torch

from woodfisher.checkpoint import save_state_dict
from woodfisher.cli import main

MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4, padding_idx=0)    # its padding row: zeros, never pruned
            self.conv = nn.Conv1d(4, 8, 3)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            out, _ = self.rnn(self.conv(x).transpose(1, 2))
            return self.head(self.fc(out[:, -1]))

    def build():
        return Net()
""")


def _checkpoint(tmp_path, fc_zeros: bool):
    (tmp_path / "speech_net.py").write_text(MODEL)
    import importlib.util
    spec = importlib.util.spec_from_file_location("speech_net_t", tmp_path / "speech_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.build()
    with torch.no_grad():
        model.conv.weight[:, :, 1:] = 0                 # 2/3 zeros
        model.rnn.weight_ih_l0[:, 4:] = 0               # half of the input matrix: 1/4 of the layer's matrices
        if fc_zeros:
            model.fc.weight[:, 2:] = 0                  # 3/4 zeros
    return str(save_state_dict(model, tmp_path / "pruned.pt"))


def test_csr_export_names_the_conv1d_and_rnn_layers_it_leaves_dense(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path, fc_zeros=True)
    base = ["export", "--model", "speech_net.py:build", "--checkpoint", ckpt, "--format", "csr",
            "--out", str(tmp_path / "x.pt")]
    assert main([*base, "--min-sparsity", "0.2"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("converted to csr: ")][0]
    assert line == ("converted to csr: fc (75.0% zeros); left dense (--format csr converts Linear layers only): "
                    "conv (Conv1d, 66.7% zeros), rnn (GRU, 25.0% zeros)")
    assert main([*base, "--min-sparsity", "0.5", "--conv"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("converted to csr: ")][0]
    assert line.endswith("left dense (--format csr converts Linear and Conv2d layers only): conv (Conv1d, 66.7% zeros)")


def test_refusal_names_the_sparse_layers_left_dense(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path, fc_zeros=False)
    assert main(["export", "--model", "speech_net.py:build", "--checkpoint", ckpt, "--format", "csr",
                 "--min-sparsity", "0.6", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "converted no layer" in err
    assert err.rstrip().endswith("left dense (--format csr converts Linear layers only): conv (Conv1d, 66.7% zeros)")
    assert not (tmp_path / "x.pt").exists()


def test_report_lists_pruned_weights_outside_the_default_targets(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path, fc_zeros=True)
    assert main(["report", "--model", "speech_net.py:build", "--checkpoint", ckpt]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    table = {row[0]: row for row in rows}
    # the model's order; weight_hh_l0 (no zeros: not pruned) and the dense head stay as they were listed before
    assert list(table) == ["conv.weight", "rnn.weight_ih_l0", "fc.weight", "head.weight", "total"]
    assert table["rnn.weight_ih_l0"][1:5] == ["24x8", "192", "96", "50.00"]
    conv, fc, head = 8 * 4 * 3, 8 * 8, 3 * 8
    assert table["total"][2:4] == [f"{conv + 192 + fc + head}", f"{conv // 3 + 96 + fc // 4 + head}"]
