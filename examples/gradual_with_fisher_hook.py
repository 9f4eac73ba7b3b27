"""Gradual pruning with the Fisher fed from the training loop (no extra data pass).

A digits MLP is trained briefly, then fine-tuned while being pruned to 90% on the cubic
schedule of :func:`woodfisher.polynomial_sparsity`. A :class:`woodfisher.FisherHook` reads
the gradients of the optimizer steps the fine-tuning does anyway, folds them ``buffer`` at
a time into running block inverses (``woodbury_update_``), and at each pruning step the
window of the last ``num_grads`` steps is the curvature of :func:`woodfisher.prune_with`.
Masks are held by ``torch.nn.utils.prune`` between steps (:func:`woodfisher.attach_masks`).

    python examples/gradual_with_fisher_hook.py            # ~10 s on a CPU
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from woodfisher import FisherHook, attach_masks, make_permanent, polynomial_sparsity, prune_with
from woodfisher.data import evaluate, load_digits
from woodfisher.demo import train_digits_mlp


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--final-sparsity", type=float, default=0.9)
    p.add_argument("--pretrain-epochs", type=int, default=20, help="dense training epochs")
    p.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs")
    p.add_argument("--prune-every", type=int, default=2, help="epochs between pruning steps")
    p.add_argument("--num-grads", type=int, default=32, help="optimizer steps in the Fisher window")
    p.add_argument("--block-size", type=int, default=64)
    args = p.parse_args(argv)

    train, test = load_digits("train"), load_digits("test")
    model = train_digits_mlp(train, epochs=args.pretrain_epochs, seed=0).train()
    dense = evaluate(model, test)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hook = FisherHook(model, num_grads=args.num_grads, damp=1e-4, block_size=args.block_size, buffer=8)
    hook.attach(opt)                     # reads .grad before every opt.step()
    x, y = train.tensors
    g = torch.Generator().manual_seed(0)
    last = (args.epochs - args.prune_every) // args.prune_every * args.prune_every  # a multiple of the frequency
    history = []
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch % args.prune_every == 0 and epoch <= last and hook.ready:
            target = polynomial_sparsity(epoch, final_sparsity=args.final_sparsity, start_step=0, end_step=last,
                                         frequency=args.prune_every)
            result = prune_with(model, hook.curvature(), target)   # the last num_grads steps' Fisher
            attach_masks(model, result.masks)                     # pruned weights stay 0 while training
            hook.reset()                                          # a new window on the new weights
            history.append((epoch, result.sparsity, evaluate(model, test)))
            print(f"epoch {epoch:2d}: pruned to {100 * result.sparsity:5.1f}%, "
                  f"test accuracy {100 * history[-1][2]:.2f}%")
    make_permanent(model)
    final = evaluate(model, test)
    print(f"dense {100 * dense:.2f}% -> {100 * history[-1][1]:.1f}% sparse after fine-tuning: {100 * final:.2f}%")
    return {"dense": dense, "final": final, "history": history}


if __name__ == "__main__":
    main()
