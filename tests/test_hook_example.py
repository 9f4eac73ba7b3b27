"""The FisherHook docstring's training loop keeps its sparsity: ``prune_with(..., keep_masks=True)`` in it (the
example pruned without masks, and the next optimizer steps revived every pruned weight: 0% zeros at the end)."""
import torch
import torch.nn.functional as F
from torch import nn

import woodfisher as wf


def _run(keep_masks: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 3))
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 4, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(12)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hook = wf.FisherHook(model, num_grads=4, damp=1e-4, block_size=16, buffer=2).attach(optimizer)
    prune_steps, sparsity_at = {3, 7}, {3: 0.3, 7: 0.6}.get
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad(); F.cross_entropy(model(x), y).backward(); optimizer.step()  # noqa: E702
        if hook.ready and step in prune_steps:
            wf.prune_with(model, hook.curvature(), sparsity_at(step), keep_masks=keep_masks)
            hook.reset()
    weights = [model[0].weight, model[3].weight]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_the_docstring_loop_keeps_its_sparsity():
    assert "keep_masks=True" in wf.FisherHook.__doc__
    assert abs(_run(keep_masks=True) - 0.6) < 0.01
    assert _run(keep_masks=False) < 0.05   # what the example did before: the zeros revived
