"""The README's Python snippets run as written (README stays true).

Every ```python block of README.md runs, chained with the earlier blocks of its section as a reader
would run them, in a fresh interpreter with UserWarnings turned into errors; a block that cannot run
here carries the line ``<!-- not run in tests: <reason> -->`` right before its fence (the HuggingFace block,
which downloads a model, runs unchanged on a tiny offline BERT instead). Every ``woodfisher ...`` command line
of the README's text blocks parses with the CLI's parser.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = re.compile(r"<!-- not run in tests: (.+?) -->\n*$")


def _python_blocks():
    """[(section heading, line number, code, skip reason or None)] of every ```python block."""
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        before = text[:match.start()]
        heading = re.findall(r"^(#{2,} .+)$", before, flags=re.M)
        skip = SKIP_MARKER.search(before)
        blocks.append((heading[-1] if heading else "(top)", before.count("\n") + 1, match.group(1),
                       skip.group(1) if skip else None))
    return blocks


def _sections():
    sections = {}
    for heading, line, code, skip in _python_blocks():
        sections.setdefault(heading, []).append((line, code, skip))
    return sections


# what each section's snippets leave behind, beyond running without an error or a warning
CHECKS = {
    "## Quick start": "\n".join([
        "assert 0.79 <= res.sparsity <= 0.81, res.sparsity",
        "assert all(float((p == 0).float().mean()) > 0.5 for n, p in model.named_parameters()",
        "           if n.endswith('weight'))",
        "assert all(float((p == 0).float().mean()) == 0.0 for p in dense.parameters())  # dense stays dense",
    ]),
}


def test_every_python_block_runs_or_says_why_not():
    blocks = _python_blocks()
    assert len(blocks) >= 7  # the extraction finds the README's snippets
    skipped = [(line, reason) for _, line, _, reason in blocks if reason]
    assert all(reason.strip() for _, reason in skipped)
    assert len(skipped) <= 1, f"most snippets must run in the tests; skipped: {skipped}"
    assert set(CHECKS) <= set(_sections())


@pytest.mark.parametrize("section", [s for s, bs in _sections().items() if any(not skip for _, _, skip in bs)])
def test_readme_section_snippets_run_as_written(section, tmp_path):
    parts = ["import warnings", "warnings.simplefilter('error', UserWarning)"]
    for line, code, skip in _sections()[section]:
        if not skip:
            parts.append(f"# README.md line {line}\n{code}")
    parts.append(CHECKS.get(section, ""))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-c", "\n".join(parts)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"{section}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    if section == "## Quick start":  # `print(res)`: the one-line summary the README promises
        summary = [ln for ln in run.stdout.splitlines() if ln.startswith("PruneResult(")]
        assert len(summary) == 1 and "sparsity=0.8" in summary[0] and "method='woodfisher'" in summary[0]


def _command_lines():
    """Every `woodfisher ...` / `python -m woodfisher ...` command of the README's ```text / ```bash blocks, as argv."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"^```(?:text|bash)\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0].strip()
            words = line.split()
            if "woodfisher" not in words or "..." in words:
                continue
            argv = words[words.index("woodfisher") + 1:]
            if argv:
                commands.append(argv)
    return commands


def test_readme_command_lines_parse(tmp_path, monkeypatch):
    """The CLI accepts every command line the README shows (flags renamed or removed break this)."""
    from woodfisher.cli import parse_args
    commands = _command_lines()
    assert {argv[0] for argv in commands} >= {"demo", "prune", "export", "pai"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prune.json").write_text('{"model": "mlpnet"}')  # the README's `--config prune.json`
    for argv in commands:
        try:
            args = parse_args(argv)
        except SystemExit:
            pytest.fail(f"woodfisher {' '.join(argv)}: refused by the parser")
        assert args.command == argv[0]


HF_STUBS = '''
import torch
import transformers
torch.manual_seed(0)
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

words = "the a movie was good bad great awful plot actors fine boring".split()
with open("vocab.txt", "w") as f:
    f.write("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
tiny = dict(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)
transformers.AutoModelForSequenceClassification.from_pretrained = (
    lambda name, num_labels: BertForSequenceClassification(BertConfig(**tiny, num_labels=num_labels)))
transformers.AutoTokenizer.from_pretrained = lambda name: BertTokenizerFast("vocab.txt")
g = torch.Generator().manual_seed(0)
texts = [" ".join(words[int(j)] for j in torch.randint(0, len(words), (int(n),), generator=g))
         for n in torch.randint(3, 12, (512,), generator=g)]
labels = torch.randint(0, 2, (512,), generator=g)
'''

HF_CHECK = '''
reloaded = dict(BertForSequenceClassification.from_pretrained("bert-50").named_parameters())
assert abs(res.sparsity - 0.5) < 0.01 and res.masks and not [n for n in res.masks if "embeddings" in n]
for name, keep in res.masks.items():  # the zeros survive save_pretrained / from_pretrained, exactly
    assert torch.equal(reloaded[name] != 0, keep) and torch.equal(reloaded[name], dict(model.named_parameters())[name])
'''


def test_huggingface_snippet_runs_offline_on_a_tiny_bert(tmp_path):
    """The HuggingFace block needs the network as written: here its code runs unchanged on a tiny random BERT and
    a local tokenizer standing in for bert-base-uncased, with texts / labels of the reader's calibration data."""
    pytest.importorskip("transformers")
    (code,) = [code for _, _, code, skip in _python_blocks() if skip and "from transformers" in code]
    program = "\n".join(["import warnings", "warnings.simplefilter('error', UserWarning)",
                         # a padded attention_mask sends BERT one sample at a time: the README says so, warned
                         "warnings.filterwarnings('ignore', 'per-sample gradients: torch.func.vmap cannot run')",
                         # random tiny weights are near-isotropic: WoodFisher's mask follows magnitude, warned
                         "warnings.filterwarnings('ignore', '.*the same weights as magnitude pruning')",
                         HF_STUBS, code, HF_CHECK])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def _resolve(dotted):
    """The object a dotted name of the README names (``wf.`` = ``woodfisher.``), importing submodules on the way."""
    import importlib
    parts = dotted.split(".")
    parts[0] = "woodfisher" if parts[0] == "wf" else parts[0]
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(".".join(parts[:i + 1]))
    return obj


def test_readme_names_exist():
    """Every `wf.X` / `woodfisher.X` / `woodfisher_kernels.X` the README's prose names, and every op of its kernel
    table, exists under that name."""
    import woodfisher_kernels as wk
    text = README.read_text()
    spans = " ".join(re.findall(r"`[^`\n]*`", text))
    names = set(re.findall(r"\b((?:wf|woodfisher|woodfisher_kernels)(?:\.[A-Za-z_]\w*)+)", spans))
    assert len(names) >= 20
    for name in sorted(names):
        assert _resolve(name) is not None, name
    table = text[text.index("## The kernel library"):text.index("## Results")]
    ops = re.findall(r"^\| `([a-z_]+)[(`]", table, flags=re.M) + re.findall(r"^\| `[a-z_]+`, `([a-z_]+)`", table,
                                                                            flags=re.M)
    assert len(ops) >= 12 and all(hasattr(wk, op) for op in ops), [op for op in ops if not hasattr(wk, op)]
