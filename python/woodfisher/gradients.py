"""Gradients of the pruned weights for the empirical (or sampled) Fisher.

Each of the ``num_grads`` gradients ("fisher subsample size", m) is the gradient of the
mean loss over ``fisher_batch_size`` samples ("fisher mini-batch size"). How fast they come
depends on the work, not on the loader's batch size: the samples the loader yields are
buffered into *chunks* (as many samples as a memory budget for the chunk's gradients
allows, :func:`woodfisher.chunking.chunk_samples`), and each chunk is one call:

- ``fisher_batch_size=1``: exact per-sample gradients over the whole chunk in one call
  (``vmap``, or expanded weights with ``per_sample="expanded"``), so a loader of batch 1 costs
  what a loader of batch 256 costs;
- ``fisher_batch_size > 1``: one plain batched backward per group of samples;
- activation checkpointing (``torch.utils.checkpoint``, HuggingFace's ``gradient_checkpointing_enable``) is
  switched off while a chunk is computed (:mod:`woodfisher.recompute`: ``vmap`` cannot trace it; the chunk's
  activations are then held, and a chunk that runs out of memory is halved as below);
- models or losses that ``vmap`` cannot trace fall back to the per-group autograd loop
  (same numbers, slower), with one warning at the caller's line giving vmap's reason.

The three ways are in :mod:`woodfisher.per_sample`. A chunk that runs out of memory (the
activations of its samples in flight, which the memory plan does not count) is computed in
halves, and the rest at the size that fitted, with one warning (the later steps of one
``prune_one_shot`` call start at that size: :func:`woodfisher.chunking.fitted_chunks`): the same
gradients, more calls;
only a single group that does not fit raises (the allocator's own error).

Masking and the NaN/Inf check stay off the critical path: the keep-masks are applied in
place, and the finiteness of a chunk is read from the per-weight sums of squares that the
Fisher statistics need anyway (one host synchronisation per chunk).

Batches go through the batch adapter (:mod:`woodfisher.batches`), so tuples, dicts
(HuggingFace) and bare tensors work, and the loss is the model's own ``outputs.loss`` when
it computes one. Gradients are taken with respect to the pruned Parameters themselves
(:mod:`woodfisher.targets`), so tied weights get the sum over every use and weights read
without calling their module (``nn.MultiheadAttention.in_proj_weight``) get their real
gradient.

The model is put in eval mode while gradients are collected (every submodule's own flag
restored afterwards): BatchNorm then uses its running statistics, so every sample's
gradient depends on that sample only, and dropout is off. Half-precision models are
differentiated in float32 (:mod:`woodfisher.precision`).

An error of the model or the loss on a batch is a ValueError naming the loader
(:func:`woodfisher.batches.loader_errors`); a loader that runs out before ``num_grads``
gradients is a ValueError naming ``num_grads``.

Already-pruned weights (keep-mask False) get their gradient entries zeroed, so they stay
decoupled from the rest of the Fisher and are never revived.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn
from torch.func import functional_call

from . import per_sample
from .batches import Batch, check_batch_dims, check_labelled, loader_errors
from .chunking import (
    CHUNK_BYTES,
    MAX_CHUNK_SAMPLES,
    SampleChunks,
    chunk_samples,
    fitted_chunk,
    remember_chunk,
    remember_vmap_refused,
    spread_total,
    vmap_refused,
)
from .diagnostics import warn_at_caller
from .grad_pieces import assemble, regroup
from .losses import compute_loss, logits_of, sample_targets, warn_loss_beyond_outputs
from .memory import is_out_of_memory, note_activations_too_large
from .per_sample import PER_SAMPLE_PATHS, check_batch_statistics
from .precision import compute_dtype, compute_state, half_dtype, native_state, prepare_batch
from .progress import progress_bar
from .recompute import checkpointing_off
from .state import eval_mode
from .targets import PruneTarget, unwrap_model
from .vmap_modules import batch_norm_as_affine

__all__ = ["GradientCollector", "LoaderExhausted", "chunk_samples", "CHUNK_BYTES", "MAX_CHUNK_SAMPLES",
           "PER_SAMPLE_PATHS"]

class LoaderExhausted(ValueError):
    """The loader ran out before ``num_grads`` gradients: ``needed`` gradients asked, ``got`` produced."""

    def __init__(self, message: str, needed: int, got: int):
        super().__init__(message)
        self.needed, self.got = needed, got


class GradientCollector:
    """Computes m masked gradients of the pruned weights, chunk by chunk.

    Args:
        model: the network (not modified; wrappers are seen through).
        loader: iterable of batches (read through ``batch_adapter``); any batch size.
        targets: the pruned weights (:func:`woodfisher.targets.resolve_targets`).
        loss_fn: ``loss_fn(predictions, targets)`` -> mean loss (None: see :mod:`woodfisher.batches`).
        num_grads: m >= 1, or None for every sample the loader yields (it must end).
        fisher_batch_size: samples averaged per gradient (>= 1).
        sampled_fisher: draw targets from the model's predictive distribution
            ``softmax(predictions)`` over the last dim instead of using the loader's (the
            paper's Sec. 6.3; unlabelled batches need no dummy targets).
        seed: seeds the target sampling.
        keep_masks: {target name: bool keep-mask}; gradients are zeroed where False.
        want_loss_grad: also compute the mean loss gradient (WoodTaylor): the mean of the
            m gradients, or, with ``sampled_fisher``, of extra gradients taken with the
            loader's targets.
        progress: show a progress bar (rate and ETA): a phase of the active
            :mod:`woodfisher.progress` display, else a tqdm bar of its own.
        batch_adapter: loader item -> :class:`woodfisher.Batch` (None: the default reading).
        chunk_bytes: memory for one chunk's gradients (see :func:`chunk_samples`); None: :data:`CHUNK_BYTES`, as
            a soft budget (off the CPU, a small last chunk is spread over the others: :func:`spread_total`).
        per_sample: "vmap" | "expanded": how ``fisher_batch_size=1`` gradients are formed (module docstring).

    After a pass (:meth:`collect` or :meth:`chunks` exhausted): ``count`` (gradients
    produced), ``samples`` (samples used), ``sum_sq`` (float64 sum of the squared masked
    gradient entries, for :class:`woodfisher.damping.FisherStats`), ``nonzero`` ({name: whether
    any of its masked gradients was non-zero}) and ``loss_grad`` ({name: (numel,)} or None).
    Gradients are flat (k, numel), contiguous, in the weight's storage order, in :attr:`dtype`.
    Raises: ValueError for a ``per_sample`` outside :data:`PER_SAMPLE_PATHS` or, with ``fisher_batch_size=1``, a
    BatchNorm without running statistics (:func:`woodfisher.per_sample.check_batch_statistics`), at
    construction; during the pass, ValueError for an empty loader, unlabelled batches without a model loss,
    floating targets the default loss cannot take (naming ``loss_fn``), or NaN/Inf gradients (naming the weight).
    """

    def __init__(self, model: nn.Module, loader, targets: List[PruneTarget], *,
                 loss_fn: Optional[Callable] = None, num_grads: Optional[int] = 128,
                 fisher_batch_size: int = 1, sampled_fisher: bool = False, seed: int = 0,
                 keep_masks: Optional[Dict[str, torch.Tensor]] = None,
                 want_loss_grad: bool = False, progress: bool = True,
                 desc: str = "Fisher gradients", batch_adapter: Optional[Callable] = None,
                 chunk_bytes: Optional[int] = None, per_sample: str = "vmap"):
        if per_sample not in PER_SAMPLE_PATHS:
            raise ValueError(f"per_sample must be one of {PER_SAMPLE_PATHS}, got {per_sample!r}")
        self.model, self.loader, self.targets = model, loader, targets
        self.inner = unwrap_model(model)[0]
        check_batch_statistics(self.inner, int(fisher_batch_size))  # BatchNorm without running statistics
        self.loss_fn = loss_fn
        self.num_grads = None if num_grads is None else int(num_grads)
        self.fbs = int(fisher_batch_size)
        self.sampled, self.seed = bool(sampled_fisher), seed
        self.keep = keep_masks or {}
        self.want_loss_grad, self.progress, self.desc = want_loss_grad, progress, desc
        self.adapter = batch_adapter
        self.dtype = compute_dtype(targets[0].param.dtype)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        forward = getattr(self.inner, "forward", None)  # the adapter a dict batch without a target is told fits it
        # no target, no model loss; a target that cannot be split into per-sample targets along dim 0
        check = None if self.sampled else (
            lambda batch: check_labelled(batch, loss_fn, forward) or check_batch_dims(batch))
        soft = None if chunk_bytes is not None else spread_total(self.num_grads, self.fbs, targets[0].param.device)
        chunk = chunk_samples(sum(target.numel for target in targets), itemsize, self.fbs,
                              CHUNK_BYTES if chunk_bytes is None else chunk_bytes, total=soft)
        # an earlier step of the same call ran out of memory: its size (chunking.fitted_chunks)
        self._source = SampleChunks(loader, batch_adapter, self.fbs, self.num_grads,
                                    fitted_chunk(chunk, self.fbs), check)
        self.count, self.samples, self.sum_sq, self.loss_grad = 0, 0, 0.0, None
        self.nonzero: Dict[str, bool] = {}  # weight name -> whether any of its (masked) gradients was non-zero
        self._use_vmap, self._vmap_error, self._shrunk = not vmap_refused(), None, False
        self._bar, self._ticked = None, 0  # the progress display while collect() runs; groups the loop showed
        self._use_expanded = per_sample == "expanded"
        self._native = half_dtype(targets[0].param)  # the fallback dtype (:func:`native_state`)

    @property
    def chunk(self) -> int:
        """Samples per ``vmap`` call (whole groups): from the gradients' memory budget, lowered by a chunk that ran out
        of memory."""
        return self._source.chunk

    # ---- gradients --------------------------------------------------------------
    def _loss_fn(self, params, buffers, gathered: bool = False):
        """``group_loss(sub, args, kwargs, target)``: the loss with the weights ``sub`` in place; ``gathered``: the
        default cross-entropy in the form ``vmap`` batches with fewer operators (:func:`.losses.default_loss`)."""
        model, loss_fn = self.inner, self.loss_fn
        fixed = {k: v for k, v in params.items() if k not in self._keys}

        def group_loss(sub, args, kwargs, target):
            out = functional_call(model, ({**fixed, **sub}, buffers), tuple(args), dict(kwargs))
            return compute_loss(out, target, loss_fn, gathered)
        return group_loss

    def _tick(self, n: int) -> None:
        """Advance the progress display by ``n`` groups done inside a chunk (the per-sample loop: a slow chunk shows
        its progress); :meth:`collect` counts them off the chunk's own update."""
        if self._bar is not None:
            self._ticked += n
            self._bar.update(n)

    def _chunk_grads(self, params, buffers, flat: Batch, tick: bool = True) -> Dict[str, torch.Tensor]:
        """{key: (G, *shape)} gradients of the mean loss of each of the chunk's G groups (:mod:`.per_sample`);
        ``tick``: the per-sample loop advances the progress display group by group."""
        sub = {k: params[k] for k in self._keys}
        if self._use_expanded and self.fbs == 1 and per_sample.expandable(flat, self.loss_fn):
            try:
                return per_sample.expanded_grads(self._loss_fn(params, buffers), sub, flat)
            except Exception as err:  # noqa: BLE001 - an operator expanded weights has no rule for: vmap
                if is_out_of_memory(err):
                    raise  # too many samples in flight, not an unsupported model (:meth:`_pieces` halves the chunk)
                self._use_expanded = False
        if self._use_vmap and self.fbs == 1:
            try:
                with per_sample.batched_rnn_states(self.inner), per_sample.time_major_guard(self.inner, 1), \
                        batch_norm_as_affine(self.inner, {**params, **buffers}):
                    return per_sample.vmap_grads(self._loss_fn(params, buffers, gathered=True), sub, flat)
            except Exception as err:  # noqa: BLE001 - untraceable model/loss: use the autograd loop
                if is_out_of_memory(err):
                    raise
                self._use_vmap, self._vmap_error = False, err
        with per_sample.time_major_guard(self.inner, self.fbs):
            out = per_sample.loop_grads(self._loss_fn(params, buffers), sub, self._keys, flat, self.fbs,
                                        self._tick if tick else None)
        if self._vmap_error is not None:  # the loop ran where vmap could not: say so once, at the user's line
            per_sample.warn_vmap_fallback(self._vmap_error, self.inner)
            self._vmap_error = None
            remember_vmap_refused()  # the later steps of the call: the loop at once, no second warning
        return out

    def _sampled(self, params, buffers, flat: Batch, gen) -> Batch:
        """The samples with targets drawn from the model's predictions (dict ``labels`` dropped)."""
        bare = flat.without_target()
        with torch.no_grad():
            out = functional_call(self.inner, (params, buffers), bare.args, bare.kwargs)
        return Batch(bare.args, bare.kwargs, sample_targets(logits_of(out), gen))

    def _native_state(self, flat: Batch, err: RuntimeError):
        """((params, buffers), flat) in the half model's own dtype (:func:`native_state`), at most once; None
        otherwise. The gradients are upcast by :meth:`_masked`."""
        state = native_state(self.inner, self._native, flat, err)
        self._native = None
        if state is None:
            return None
        self._use_vmap, self._vmap_error = True, None  # vmap failed on the float32 error, not on the model
        return state[:2], state[2]

    def _masked(self, grads: Dict[str, torch.Tensor], count: int) -> Dict[str, torch.Tensor]:
        """{name: (G, numel)} masked in place; one fused finiteness check, the sum of squares added up."""
        flat = {}
        for target in self.targets:
            # contiguous: vmap returns a broadcast zero for a weight the loss never reaches (not writable in place)
            g = grads[target.key].detach().reshape(count, target.numel).to(self.dtype).contiguous()
            keep = self._keep_flat.get(target.name)
            if keep is not None:
                g.mul_(keep)
            flat[target.name] = g
        # each weight's norm over the chunk in the compute dtype (one fused foreach kernel on a GPU, not four
        # operators per weight), squared in float64: one sync per chunk; an overflow is redone below
        sums = torch.stack(torch._foreach_norm(list(flat.values()))).double().square()
        for (name, g), s in zip(flat.items(), sums.tolist()):
            if not math.isfinite(s):
                if not bool(torch.isfinite(g).all()):
                    label = next(target.label for target in self.targets if target.name == name)
                    raise ValueError(f"gradients of layer {label!r} contain NaN or Inf; "
                                     "check the model, the data and the loss")
                s = float(g.double().square().sum())  # finite entries whose float32 squares overflowed
            self.sum_sq += s
            self.nonzero[name] = self.nonzero.get(name, False) or s != 0.0
        return flat

    def _computed(self, params, buffers, flat: Batch, gen, device):
        """(params, buffers, {key: (G, *shape)} gradients, loss gradients or None) of one chunk; params and buffers
        change only for a half model that fails in float32 (:meth:`_native_state`)."""
        # activation checkpointing off: torch.func cannot trace its recomputation (woodfisher.recompute)
        with loader_errors(flat, replay=lambda: self._replay(params, buffers, device)), \
                checkpointing_off(self.inner):
            try:
                labelled = self._sampled(params, buffers, flat, gen) if self.sampled else flat
                if self.loss_fn is not None and not self.count:  # the first chunk: a regulariser in loss_fn?
                    warn_loss_beyond_outputs(lambda b: functional_call(self.inner, (params, buffers), tuple(b.args),
                                                                       dict(b.kwargs)), self.loss_fn,
                                             labelled.take(0, self.fbs))
                grads = self._chunk_grads(params, buffers, labelled)
            except RuntimeError as err:  # a half model that fails in float32: its own dtype?
                state = None if is_out_of_memory(err) else self._native_state(flat, err)
                if state is None:
                    raise
                (params, buffers), flat = state
                labelled = self._sampled(params, buffers, flat, gen) if self.sampled else flat
                grads = self._chunk_grads(params, buffers, labelled)
            del labelled
            extra = self._chunk_grads(params, buffers, flat, tick=False) if self.want_loss_grad and self.sampled \
                else None
        return params, buffers, grads, extra

    def _halves(self, flat: Batch) -> List[Batch]:
        """``flat`` in two halves of whole groups after it ran out of memory (the activations of its samples, which
        the memory plan does not count); later chunks take at most half as many samples, said once."""
        half = flat.size // self.fbs // 2 * self.fbs
        if half < self._source.chunk:
            if not self._shrunk:
                warn_at_caller(
                    f"per-sample gradients: {flat.size} samples at a time ran out of memory (the model's activations "
                    f"for the samples in flight); computing them {half} at a time from here on (the same "
                    "gradients, more calls)")
            self._source.chunk, self._shrunk = half, True
            remember_chunk(half, self.fbs)
        return [flat.take(0, half), flat.take(half, flat.size)]

    def _replay(self, params, buffers, device):
        """(loader index, item, error) for the first item of the failed chunk on which the model or the loss
        fails when called on the item exactly as the loader yielded it (no grouping, no ``vmap``); None when
        every item runs on its own."""
        for index, batch in self._source.sources:
            try:
                one = prepare_batch(batch, device, self.dtype)
                with torch.no_grad():
                    out = functional_call(self.inner, (params, buffers), one.args, one.kwargs)
                    if self.sampled:
                        logits_of(out)
                    else:
                        compute_loss(out, one.target, self.loss_fn)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - the caller's model on the caller's data, for the message
                return index, batch, err
        return None

    def _pieces(self) -> Iterator[Dict[str, torch.Tensor]]:
        """{name: (G, numel)} per chunk, masked and checked."""
        params, buffers = compute_state(self.inner, self.dtype)
        device = next(iter(params.values())).device
        self._keys = [target.key for target in self.targets]
        self._keep_flat = {n: k.reshape(1, -1).to(device=device, dtype=self.dtype) for n, k in self.keep.items()
                           if not bool(k.all())}
        gen = torch.Generator().manual_seed(int(self.seed))
        self.count, self.samples, self.sum_sq = 0, 0, 0.0
        loss_sum = None
        bar = progress_bar(self.num_grads, self.desc, "grad", enabled=self.progress)
        self._bar, self._ticked = bar, 0
        try:
            with eval_mode(self.model):
                for flat in self._source(device, self.dtype):
                    parts = [flat]
                    while parts:
                        flat = parts.pop()
                        if flat.size > self._source.chunk:  # cut before a chunk ran out of memory: the size that fits
                            parts.extend(reversed(list(self._source.split(flat, flat.size))))
                            continue
                        drawn = gen.get_state()
                        try:
                            params, buffers, grads, extra = self._computed(params, buffers, flat, gen, device)
                        except Exception as err:  # noqa: BLE001 - only running out of memory is retried
                            if flat.size <= self.fbs or not is_out_of_memory(err):
                                if flat.size <= self.fbs:  # halved down to one gradient: nothing left to cut
                                    note_activations_too_large(err, self.fbs)
                                raise
                            grads = None  # (retried below, once the failed call's tensors are freed)
                        if grads is None:  # the same samples in two halves (the same sampled targets)
                            bar.update(-self._ticked)  # groups the per-sample loop showed before it failed
                            self._ticked = 0
                            gen.set_state(drawn)
                            parts.extend(reversed(self._halves(flat)))
                            continue
                        count = flat.size // self.fbs
                        piece = self._masked(grads, count)
                        if self.want_loss_grad:
                            lg = piece
                            if extra is not None:
                                saved = self.sum_sq  # the loss-gradient pass is not part of the Fisher
                                lg = self._masked(extra, count)
                                self.sum_sq = saved
                            part = {k: v.sum(0) for k, v in lg.items()}
                            loss_sum = part if loss_sum is None else {k: loss_sum[k] + part[k] for k in part}
                        self.count += count
                        self.samples += count * self.fbs
                        bar.update(count - self._ticked)  # the per-sample loop showed _ticked of them already
                        self._ticked = 0
                        # drop this frame's references before the next chunk is computed: the consumer holds the
                        # piece as long as it needs it, and a generator's locals live on across the yield
                        del grads, extra
                        yield piece
                        del piece
        finally:
            bar.close()
            self._bar = None
        if self.count == 0:
            raise ValueError(f"loader yielded fewer than fisher_batch_size={self.fbs} samples: "
                             "no gradient could be computed (empty data loader?)")
        if self.num_grads is not None and self.count < self.num_grads:
            raise LoaderExhausted(f"num_grads={self.num_grads} with fisher_batch_size={self.fbs} needs "
                                  f"{self.num_grads * self.fbs} samples, but the loader ran out after {self.count} "
                                  f"gradients ({self.samples} samples); pass num_grads <= {self.count} or more data",
                                  self.num_grads, self.count)
        if loss_sum is not None:
            self.loss_grad = {k: v / self.count for k, v in loss_sum.items()}

    def chunks(self, k: int) -> Iterator[Dict[str, torch.Tensor]]:
        """Stream the gradients ``k`` at a time (one pass over the loader).

        Args:
            k: gradients per chunk (>= 1).
        Yields:
            {weight name: (k_i, numel)} with k_i = k except maybe the last, in the gradients' dtype.
        """
        yield from regroup(self._pieces(), k)

    def collect(self, blocked: bool = False) -> Dict[str, torch.Tensor]:
        """All gradients at once (one pass over the loader).

        The blocked form is :meth:`woodfisher.targets.BlockLayout.grad_blocks` of the flat
        one (canonical order, zero padded), written chunk by chunk into one buffer.

        Args:
            blocked: return the blocked form (B, m, c) instead of the flat (m, numel).
        Returns:
            {weight name: (m, numel)} or, with ``blocked``, {weight name: (B, m, c)}; m = the fisher
            subsample size collected.
        """
        return assemble(self._pieces(), self.targets, self.num_grads, blocked)
