"""FLOPs of Linear / Conv / HF Conv1D layers and attention projections, dense and sparse, measured with hooks.

Convention: one multiply-accumulate = one FLOP (the convention under which ResNet-50
has ~4.1 GFLOPs, as in the pruning literature); biases, BN, activations and pooling
are not counted. For a layer whose weight has ``numel`` entries, every entry is used
``uses`` times per sample (``uses`` = output positions: H_out*W_out for a 2-d conv, 1
for a Linear on a vector; input positions H_in*W_in for a transposed conv, pruned when named), so

    dense FLOPs = numel * uses,   sparse FLOPs = nnz(weight) * uses.

``uses`` is also the FLOPs-per-parameter factor of the FLOPs-aware statistic
rho / flops_per_param^beta (paper Sec. 5.4). HuggingFace's ``Conv1D`` is a Linear layer
(``uses`` = positions of its output, whose last dim is ``nf``); the matrices of an ``nn.RNN`` / ``nn.LSTM`` /
``nn.GRU`` (``weight_ih_l0``, ``weight_hh_l0``, ...) are used once per time step (``uses`` = T, the real
steps of a ``PackedSequence``); the projections an
``nn.MultiheadAttention`` reads directly are counted from its query / key lengths
(:func:`flops_per_param_of_batch`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call

from .batches import loader_errors, peek, to_batch
from .buffers import buffers_kept
from .precision import compute_dtype, compute_state, half_dtype, native_state, prepare_batch
from .state import eval_mode
from .targets import is_hf_conv1d, unwrap_model

__all__ = ["FLOP_MODULES", "layer_flops", "count_flops", "flops_per_param", "flops_per_param_of_batch",
           "layer_flops_per_param"]

FLOP_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: Sequence[int],
                device: Optional[Union[str, torch.device]] = None) -> Dict[str, Dict[str, object]]:
    """Per-layer FLOPs for ONE sample of shape ``input_shape`` (without the batch dim).

    The sample is zeros in the weights' dtype, or token ids (int64 zeros) for a model with an ``nn.Embedding``
    that refuses floating inputs.

    Returns:
        {module name: {"weight": param name, "shape": tuple, "params": numel, "nnz": int,
         "uses": int, "flops_dense": int, "flops_sparse": int}} in forward order. An
        ``nn.MultiheadAttention`` ``attn`` adds ``attn.in_proj`` (or ``attn.q_proj`` / ``k_proj`` / ``v_proj``,
        weight ``attn.in_proj_weight`` ...) and ``attn.out_proj``, counted from its query / key lengths
        (``uses`` of ``in_proj_weight`` is (L_q + 2 L_k) / 3, a float when they differ; its FLOPs count its query
        rows L_q times and its key / value rows L_k times).
    """
    if not input_shape or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("model has no parameters")
    device = torch.device(device) if device is not None else first.device
    names = {m: n for n, m in model.named_modules()}
    stats: Dict[str, Dict[str, object]] = {}

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        name = names[module]
        uses = _positions(module, inputs, output)  # batch of one sample
        w = module.weight
        entry = stats.setdefault(name, {"weight": f"{name}.weight" if name else "weight",
                                        "shape": tuple(w.shape), "params": w.numel(),
                                        "nnz": int(torch.count_nonzero(w)), "uses": 0})
        entry["uses"] = int(entry["uses"]) + int(uses)  # a module called twice counts twice

    def attention_hook(module: nn.MultiheadAttention, args, kwargs, _output) -> None:
        # it reads its projections' weights without calling a submodule: counted from its query / key lengths
        per = _projection_uses(module, args, kwargs)
        lq, lk = per["q_proj_weight"], per["k_proj_weight"]
        for attr, uses in per.items():
            owner, param = (module.out_proj, "weight") if attr == "out_proj" else (module, attr)
            w = getattr(owner, param, None)
            if not isinstance(w, torch.Tensor):
                continue
            name = names[owner] + ("" if attr == "out_proj" else "." + attr.removesuffix("_weight"))
            entry = stats.setdefault(name, {"weight": f"{names[owner]}.{param}", "shape": tuple(w.shape),
                                            "params": w.numel(), "nnz": int(torch.count_nonzero(w)), "uses": 0,
                                            "flops_dense": 0, "flops_sparse": 0})
            entry["uses"] = entry["uses"] + uses
            # in_proj_weight's rows are [q; k; v], each third used over its own length: exact dense / sparse FLOPs
            parts = zip(w.chunk(3), (lq, lk, lk)) if attr == "in_proj_weight" else [(w, uses)]
            for rows, length in parts:
                entry["flops_dense"] += int(rows.numel() * length)
                entry["flops_sparse"] += int(torch.count_nonzero(rows)) * int(length)

    def rnn_hook(module: nn.RNNBase, inputs, _output) -> None:
        steps = _rnn_steps(module, inputs)
        for attr in _rnn_weights(module):
            w = getattr(module, attr)
            name = f"{names[module]}.{attr}" if names[module] else attr
            entry = stats.setdefault(name, {"weight": name, "shape": tuple(w.shape), "params": w.numel(),
                                            "nnz": int(torch.count_nonzero(w)), "uses": 0})
            entry["uses"] = int(entry["uses"]) + steps

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, FLOP_MODULES) or is_hf_conv1d(m)]
    handles += [m.register_forward_hook(rnn_hook) for m in model.modules() if isinstance(m, nn.RNNBase)]
    handles += [m.register_forward_hook(attention_hook, with_kwargs=True) for m in model.modules()
                if isinstance(m, nn.MultiheadAttention)]
    inner = unwrap_model(model)[0]  # torch.compile would trace the hooks: run the module it wraps (names keep
    try:                              # the caller's prefix: they come from model.named_modules())
        with eval_mode(model), buffers_kept(inner):
            shape = (1, *[int(s) for s in input_shape])
            try:
                inner(torch.zeros(shape, dtype=first.dtype, device=device))
            except (RuntimeError, TypeError, IndexError):
                if not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in inner.modules()):
                    raise
                stats.clear()  # token ids in: id 0 of every embedding (what the float call counted is dropped)
                inner(torch.zeros(shape, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    for entry in stats.values():
        if "flops_dense" not in entry:  # attention projections counted theirs in attention_hook
            entry["flops_dense"] = int(entry["params"]) * int(entry["uses"])
            entry["flops_sparse"] = int(entry["nnz"]) * int(entry["uses"])
        entry["uses"] = int(entry["uses"]) if float(entry["uses"]).is_integer() else entry["uses"]
    return stats


def count_flops(model: nn.Module, input_shape: Sequence[int], sparse: bool = False) -> Dict[str, int]:
    """{module name: FLOPs for one sample}; ``sparse=True`` counts only nonzero weights."""
    key = "flops_sparse" if sparse else "flops_dense"
    return {name: int(s[key]) for name, s in layer_flops(model, input_shape).items()}


def flops_per_param(model: nn.Module, input_shape: Sequence[int]) -> Dict[str, int]:
    """{weight param name: FLOPs each of its entries costs per sample} (``uses`` above)."""
    return {str(s["weight"]): int(s["uses"]) for s in layer_flops(model, input_shape).values()}


def _positions(module: nn.Module, inputs, output: torch.Tensor) -> int:
    """How often one call uses each weight entry (one sample): the output positions of a Linear / conv (each
    output entry reads every weight of its row once); the *input* positions of a transposed convolution (each
    input entry is multiplied by every weight of its input channel once: stride^2 fewer than its outputs)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return inputs[0].numel() // module.in_channels
    return output.numel() // _out_channels(module)


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_hf_conv1d(module):  # HuggingFace Conv1D: (in, out) weight, outputs (..., nf)
        return int(module.nf)
    return module.out_channels


def _rnn_weights(module: nn.RNNBase) -> list:
    """The matrices of an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: ``weight_ih_l{k}``, ``weight_hh_l{k}`` (and
    ``weight_hr_l{k}`` with ``proj_size``), ``_reverse`` ones when bidirectional; not the biases."""
    return [attr for attr in module._flat_weights_names if attr.startswith("weight_")]


def _rnn_steps(module: nn.RNNBase, inputs) -> int:
    """Time steps of one call of a recurrent layer (one sample): every entry of each of its matrices is used
    once per step (each step multiplies the layer's input and its hidden state by them). A
    ``PackedSequence`` counts its real steps (the sum of the lengths), a padded tensor its padded length."""
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return int(x.data.shape[0])
    return int(x.shape[1] if (x.dim() == 3 and module.batch_first) else x.shape[0])


def _seq_len(x: torch.Tensor, batch_first: bool) -> int:
    """Sequence length of an MHA input: (L, E) unbatched, (N, L, E) batch-first, else (L, N, E)."""
    return int(x.shape[1] if (x.dim() == 3 and batch_first) else x.shape[0])


def _projection_uses(mha: nn.MultiheadAttention, args, kwargs) -> Dict[str, float]:
    """{projection: uses per entry} of one call of ``mha`` (its query / key lengths; see
    :func:`_attention_hooks`); keys ``in_proj_weight``, ``q/k/v_proj_weight`` and ``out_proj``."""
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    lq, lk = _seq_len(query, mha.batch_first), _seq_len(key, mha.batch_first)
    return {"in_proj_weight": (lq + 2 * lk) / 3, "q_proj_weight": lq, "k_proj_weight": lk, "v_proj_weight": lk,
            "out_proj": lq}


def _attention_hooks(inner: nn.Module, targets, uses: Dict[str, float]) -> Tuple[list, set]:
    """Hooks on every nn.MultiheadAttention whose projections are targets (it reads them without calling
    a submodule): ``in_proj_weight`` rows serve the query (L_q uses) and key / value (L_k uses each),
    ``q_proj_weight`` L_q, ``k_proj_weight`` / ``v_proj_weight`` L_k, ``out_proj.weight`` L_q.
    Returns (hook handles, names of the targets they count)."""
    handles, covered = [], set()
    for mha in (m for m in inner.modules() if isinstance(m, nn.MultiheadAttention)):
        mine = {}
        for target in targets:
            if target.module is mha and target.attr in (
                "in_proj_weight",
                "q_proj_weight",
                "k_proj_weight",
                "v_proj_weight",
            ):
                mine[target.name] = target.attr
            elif target.module is mha.out_proj and target.attr == "weight":
                mine[target.name] = "out_proj"
        if not mine:
            continue
        covered |= set(mine)

        def hook(module, args, kwargs, _output, mine=mine):
            per = _projection_uses(module, args, kwargs)
            for name, attr in mine.items():
                uses[name] = uses.get(name, 0) + per[attr]
        handles.append(mha.register_forward_hook(hook, with_kwargs=True))
    return handles, covered


@torch.no_grad()
def flops_per_param_of_batch(model: nn.Module, batch, targets) -> Dict[str, float]:
    """{target name: FLOPs per weight entry and sample}, measured on the first sample of ``batch``.

    Args:
        model: the network (its unwrapped module is run once in eval mode, every module's
            flag restored; half-precision models in float32, as the gradients are).
        batch: a :class:`woodfisher.Batch` (its first sample is used, moved to the model's device).
        targets: the :class:`woodfisher.targets.PruneTarget` weights: weights of Linear /
            Conv / HF Conv1D modules called in the forward pass, or projections of an
            ``nn.MultiheadAttention`` (counted from its query and key lengths).
    Raises:
        ValueError: a target that is none of these (e.g. a named embedding), naming it; a batch
            the model fails on (naming the loader).
    """
    inner = unwrap_model(model)[0]
    dtype = compute_dtype(targets[0].param.dtype)
    params, buffers = compute_state(inner, dtype)
    batch = prepare_batch(batch, targets[0].param.device, dtype)
    one = batch.take(0, 1)
    uses: Dict[str, float] = {}
    handles, covered = _attention_hooks(inner, targets, uses)
    for target in targets:
        if isinstance(target.module, nn.RNNBase) and target.attr in _rnn_weights(target.module):
            def rnn_hook(module, inputs, output, name=target.name):
                uses[name] = uses.get(name, 0) + _rnn_steps(module, inputs)
            handles.append(target.module.register_forward_hook(rnn_hook))
            continue
        if target.name in covered or target.attr != "weight" or target.kind not in ("linear", "conv", "conv1d_hf"):
            continue

        def hook(module, inputs, output, name=target.name):
            uses[name] = uses.get(name, 0) + _positions(module, inputs, output)
        handles.append(target.module.register_forward_hook(hook))
    try:
        with eval_mode(model), buffers_kept(inner), loader_errors(batch):
            try:
                functional_call(inner, (params, buffers), one.args, one.kwargs)
            except RuntimeError as err:  # a half model that runs in its own dtype only (native_state)
                state = native_state(inner, half_dtype(targets[0].param), one, err, warn=False)  # counts only
                if state is None:
                    raise
                uses.clear()
                functional_call(inner, state[:2], state[2].args, state[2].kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [target.label for target in targets if uses.get(target.name, 0) <= 0]
    if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass; cannot count their FLOPs "
                         "(beta > 0 needs every pruned weight to belong to a Linear / Conv / HF Conv1D module "
                         "that runs, to an nn.MultiheadAttention or to an nn.RNN / LSTM / GRU)")
    return {target.name: float(uses[target.name]) for target in targets}


def layer_flops_per_param(model: nn.Module, loader, targets, batch_adapter=None) -> Dict[str, float]:
    """FLOPs per weight entry and sample of each target, for the FLOPs-aware statistic.

    :func:`flops_per_param_of_batch` on the first batch of ``loader`` (a re-iterable loader is not
    consumed; a single-pass iterator loses that batch). The statistic ``rho_q / flops^beta`` is the
    WoodFisher paper's FLOPs-aware pruning statistic (Sec. 5.4).

    Args:
        model: the network. loader: batches in any format :func:`woodfisher.batches.to_batch` reads.
        targets: the :class:`woodfisher.PruneTarget` weights to measure.
        batch_adapter: loader item -> :class:`woodfisher.Batch`, or None for the default reading.
    Returns:
        {target name: FLOPs per weight entry and sample (one multiply-accumulate = one FLOP: the
        entry's uses in one sample's forward pass, see the module docstring)}.
    Raises:
        ValueError: an empty loader, and every case of :func:`flops_per_param_of_batch`.
    """
    first, _ = peek(loader)
    if first is None:
        raise ValueError("loader is empty: cannot measure FLOPs per parameter")
    return flops_per_param_of_batch(model, to_batch(first, batch_adapter), targets)
