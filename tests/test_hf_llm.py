"""Tiny random-config Llama (tied embeddings, grouped-query attention) through the whole user path:
2:4 on its Linear layers, layerwise, masks kept through training, make_permanent,
save_pretrained / from_pretrained, bfloat16; and the vmap note of an eager BERT with padding.
No hub access; skipped with a reason where transformers is absent.
"""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")

from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM  # noqa: E402

from woodfisher import GradientCollector, make_permanent, prune_one_shot, resolve_targets  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, T = 32, 8


def _llama(dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                      tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype)


def _batches(n=4, batch=4, seed=1, labels=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, T), generator=g)
        mask = torch.ones_like(ids)
        mask[::2, -3:] = 0                                        # right padding on half the samples
        item = {"input_ids": ids, "attention_mask": mask}
        item["labels"] = ids.masked_fill(mask == 0, -100) if labels else torch.randint(0, 3, (batch,), generator=g)
        out.append(item)
    return out


def _weight(model, name):
    module, attr = name.rsplit(".", 1)
    return getattr(model.get_submodule(module), attr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_two_four_layerwise_kept_through_training_and_save(dtype, tmp_path):
    model = _llama(dtype)
    names = {t.name for t in resolve_targets(model)}
    embed = model.model.embed_tokens.weight.detach().clone()
    result = prune_one_shot(model, _batches(), sparsity=0.5, pattern="2:4", mode="layerwise", keep_masks=True,
                            num_grads=16, progress=False)
    assert set(result.masks) == names and not any("embed" in n or "lm_head" in n for n in names)
    zeros = sum(int((_weight(model, n) == 0).sum()) for n in names)
    assert result.sparsity == zeros / sum(_weight(model, n).numel() for n in names) == 0.5
    for name, mask in result.masks.items():                   # N:M along the input axis of each output row
        assert torch.equal(_weight(model, name) != 0, mask) and torch.all(mask.reshape(-1, 4).sum(1) == 2), name
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(embed, model.lm_head.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for item in _batches(n=2, seed=3):
        model(**item).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not bool((_weight(model, n)[~m] != 0).any()) for n, m in result.masks.items())  # nothing revived
    make_permanent(model)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    params = dict(loaded.named_parameters())
    assert next(loaded.parameters()).dtype == dtype
    for name, mask in result.masks.items():
        assert torch.equal(params[name] != 0, mask) and torch.equal(params[name], _weight(model, name).detach())


def test_eager_bert_with_padding_note_does_not_suggest_eager_and_gradients_are_exact():
    """An encoder checks its padding mask under vmap even with eager attention: the note says so (it does not
    suggest the eager attention already in use) and the per-sample gradients are float64 autograd's."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3, attn_implementation="eager")
    model = BertForSequenceClassification(cfg).double()
    target = [t for t in resolve_targets(model) if t.name.endswith("layer.0.attention.self.query.weight")]
    loader = _batches(n=2, labels=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = GradientCollector(model, loader, target, num_grads=8, progress=False).collect()
    notes = "".join(str(w.message) for w in caught if "vmap cannot run" in str(w.message))
    assert "even with eager attention" in notes and "load it with attn_implementation='eager'" not in notes
    model.eval()
    for i in range(8):
        one = {k: v[i % 4:i % 4 + 1] for k, v in loader[i // 4].items()}
        (g,) = torch.autograd.grad(model(**one).loss, [target[0].param])
        torch.testing.assert_close(got[target[0].name][i], g.flatten(), rtol=1e-9, atol=1e-12)
