"""Tiny random-config HuggingFace models (no hub access): BERT for classification, GPT-2 LM head.

GPT-2 has tied embeddings (``lm_head.weight is wte.weight``) and ``Conv1D`` layers (weights
stored (in, out)); its loss is its own ``outputs.loss`` (labels shifted inside the model).
``transformers`` is a test-only dependency (``pip install .[hf]``; scripts/setup_env.sh
installs it); these tests skip with a reason where it is absent.
"""
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from woodfisher import (  # noqa: E402
    Batch,
    GradientCollector,
    make_permanent,
    prune_one_shot,
    resolve_targets,
)
from woodfisher.flops import flops_per_param_of_batch  # noqa: E402
from woodfisher.tuning import heldout_loss  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, T = 40, 8


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double()


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg).double()


def _lm_batches(n=16, batch=4, labels=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::3, -2:] = 0  # some padded samples
    out = []
    for i in range(0, n, batch):
        item = {"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch]}
        if labels:
            item["labels"] = ids[i:i + batch].masked_fill(mask[i:i + batch] == 0, -100)
        out.append(item)
    return out


def _cls_batches(n=16, batch=4, seed=1):
    out = _lm_batches(n, batch, labels=False, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for item in out:
        item["labels"] = torch.randint(0, 3, (batch,), generator=g)
    return out


def _unique_sparsity(model, names):
    """Zeros over the unique tensors of ``names`` (the test's own count)."""
    tensors = {id(p): p for n, p in model.named_parameters() if n in names}
    return sum(int((p == 0).sum()) for p in tensors.values()) / sum(p.numel() for p in tensors.values())


def test_gpt2_targets_conv1d_and_leaves_the_tied_embedding_alone():
    model = _gpt2()
    targets = resolve_targets(model)
    assert all(t.kind == "conv1d_hf" for t in targets) and len(targets) == 8
    assert not any("wte" in t.name or "lm_head" in t.name or "wpe" in t.name for t in targets)
    x = _lm_batches()[0]
    flops = flops_per_param_of_batch(model, Batch((), {"input_ids": x["input_ids"]}, None), targets)
    assert set(flops.values()) == {float(T)}  # every Conv1D weight entry is used once per position


def test_gpt2_gradients_are_those_of_its_own_shifted_loss():
    model = _gpt2()
    wanted = ("h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight")
    targets = [t for t in resolve_targets(model) if t.name.endswith(wanted)]
    loader = _lm_batches(n=8)
    got = GradientCollector(model, loader, targets, num_grads=8, progress=False).collect()
    model.eval()
    for i in range(8):
        one = {k: v[i % 4:i % 4 + 1] for k, v in loader[i // 4].items()}
        grads = torch.autograd.grad(model(**one).loss, [t.param for t in targets])
        for t, g in zip(targets, grads):
            torch.testing.assert_close(got[t.name][i], g.flatten(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["woodfisher", "global_magnitude", "kfac"])
def test_gpt2_one_shot(method):
    model = _gpt2()
    loader, held = _lm_batches(), _lm_batches(n=8, seed=5)
    names = [t.name for t in resolve_targets(model)]
    wte = model.transformer.wte.weight.detach().clone()
    before = heldout_loss(model, held)
    result = prune_one_shot(model, loader, sparsity=0.5, method=method, num_grads=16, block_size=128,
                            progress=False)
    after = heldout_loss(model, held)
    assert _unique_sparsity(model, names) == pytest.approx(0.5, abs=1e-3) == result.sparsity
    assert model.lm_head.weight is model.transformer.wte.weight and torch.equal(wte, model.lm_head.weight)
    assert math.isfinite(after) and abs(after - before) < 0.5  # no collapse at 50% on a random model


def test_gpt2_sampled_fisher_on_unlabelled_batches_and_nm_pattern():
    model = _gpt2()
    names = [t.name for t in resolve_targets(model)]
    result = prune_one_shot(model, _lm_batches(labels=False), pattern="2:4", sampled_fisher=True,
                            num_grads=16, block_size=64, progress=False)
    assert _unique_sparsity(model, names) == pytest.approx(0.5) == result.sparsity
    for name in names:  # N:M along the input axis of each output feature: rows of the stored (in, out) weight
        kept = result.masks[name].T.reshape(-1, 4).sum(1)
        assert torch.all(kept == 2), name


def test_padding_masks_fall_back_from_vmap_with_a_note_and_eager_attention_stays_batched():
    """sdpa attention's padding-mask check cannot run under vmap: the note names attn_implementation='eager',
    which runs batched, with the same gradients (float64)."""
    loader = _lm_batches(n=8)
    got = {}
    for impl in ("sdpa", "eager"):
        model = _gpt2()
        model.config._attn_implementation = impl
        targets = [t for t in resolve_targets(model) if t.name.endswith("h.0.attn.c_attn.weight")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got[impl] = GradientCollector(model, loader, targets, num_grads=8, progress=False).collect()
        notes = [str(w.message) for w in caught if "vmap cannot run" in str(w.message)]
        assert (len(notes), "attn_implementation='eager'" in "".join(notes)) == ((1, True) if impl == "sdpa" else
                                                                                 (0, False))
    for name, g in got["sdpa"].items():
        torch.testing.assert_close(got["eager"][name], g, rtol=1e-9, atol=1e-12)


def test_bert_regression_head_is_differentiated_through_its_own_loss():
    """Float labels= (num_labels=1: the model's MSE) are not the default cross-entropy's targets: no refusal,
    and the gradients are those of the model's own loss (float64 autograd)."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=1)
    model = BertForSequenceClassification(cfg).double().eval()
    loader = _lm_batches(n=8, labels=False)
    g = torch.Generator().manual_seed(3)
    for item in loader:
        item["labels"] = torch.randn(4, generator=g, dtype=torch.float64)
    targets = [t for t in resolve_targets(model) if t.name == "classifier.weight"]
    got = GradientCollector(model, loader, targets, num_grads=8, progress=False).collect()["classifier.weight"]
    for i in range(8):
        one = {k: v[i % 4:i % 4 + 1] for k, v in loader[i // 4].items()}
        ref = torch.autograd.grad(model(**one).loss, targets[0].param)[0]
        torch.testing.assert_close(got[i], ref.flatten(), rtol=1e-9, atol=1e-12)
    assert prune_one_shot(model, loader, sparsity=0.5, num_grads=8, progress=False).sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["woodfisher", "global_magnitude", "kfac"])
def test_bert_one_shot_and_masks_survive_save_pretrained(method, tmp_path):
    model = _bert()
    loader = _cls_batches()
    names = [t.name for t in resolve_targets(model)]
    assert names[-1] == "classifier.weight" and not any("embeddings" in n for n in names)
    before = heldout_loss(model, loader)
    result = prune_one_shot(model, loader, sparsity=0.6, method=method, num_grads=16, progress=False,
                            keep_masks=True)
    assert _unique_sparsity(model, [n + "_orig" for n in names]) == pytest.approx(0.6, abs=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for item in loader:  # fine-tuning: the masks hold
        opt.zero_grad()
        model(**item).loss.backward()
        opt.step()
    after = heldout_loss(model, loader)
    make_permanent(model)
    model.save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).double()
    params = dict(loaded.named_parameters())
    for name, keep in result.masks.items():
        assert torch.equal(params[name] != 0, keep), name
    assert _unique_sparsity(loaded, names) == pytest.approx(0.6, abs=1e-3)
    assert after < before  # fine-tuning the pruned model on its data lowers the loss


def test_bert_tuple_batches_need_the_adapter_the_error_shows():
    model = _bert()
    items = [(d["input_ids"], d["attention_mask"], d["labels"]) for d in _cls_batches()]
    with pytest.raises(ValueError, match="ambiguous"):
        prune_one_shot(model, items, sparsity=0.5, num_grads=8, progress=False)

    def adapter(b):
        return Batch(kwargs={"input_ids": b[0], "attention_mask": b[1], "labels": b[2]})
    ref = prune_one_shot(_bert(), _cls_batches(), sparsity=0.5, num_grads=8, progress=False)
    got = prune_one_shot(model, items, sparsity=0.5, num_grads=8, progress=False, batch_adapter=adapter)
    assert all(torch.equal(ref.masks[k], got.masks[k]) for k in ref.masks)
