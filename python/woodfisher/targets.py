"""What is pruned: parameters (not modules), each once, and how each is cut into Fisher blocks.

A :class:`PruneTarget` is one weight Parameter, named as the caller's model names it. By
default the targets are the ``weight`` of every ``nn.Linear`` / ``nn.Conv{1,2,3}d``, of
HuggingFace's ``Conv1D`` (GPT-2; weight stored ``(in, out)``) and the input projections
of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``), which that
module reads without calling a submodule. ``modules=`` accepts parameter names
(``"attn.in_proj_weight"``, any name of a tied Parameter), names of modules with a
``weight`` (meaning that weight, e.g. an ``nn.Embedding`` named on purpose) and names of
any other module (meaning the default targets inside it: ``"encoder.layers.0"``, or an
``nn.MultiheadAttention``'s projections), and shell-style patterns (``fnmatch``: ``*``, ``?``,
``[...]``; ``"blocks.*.mlp.*"``, ``"*.attn"``) over full names, meaning the default targets whose
name, or the name of a module holding them, matches. Biases and normalisation layers are never
pruned by default.

Rules (one place for all of them, the pruner, pruning at initialisation and reports):

- a Parameter shared by several modules (tied weights) is one target, under the first
  name ``named_parameters()`` gives it; sparsity is counted over unique tensors;
- a default target that is also held by an ``nn.Embedding`` (a tied LM head) is left out
  unless the caller names it;
- wrappers (``nn.DataParallel``, ``DistributedDataParallel``, ``torch.compile``, an FSDP root
  inside :func:`woodfisher.distributed.full_parameters`) are seen through: the pruner works
  on the wrapped module and reports names with the wrapper's prefix (``"module.fc1.weight"``),
  as the caller's ``named_parameters()`` names them;
- reparametrised weights are pruned in their real storage: ``torch.nn.utils.prune``
  (``weight_orig`` + ``weight_mask``) and ``torch.nn.utils.parametrize`` with a mask
  (``torch.ao.pruning``'s ``FakeSparsity``); targets keep the logical name ``"<m>.weight"``.

Blocks: see :mod:`woodfisher.layout` (canonical (out, in, ...) order, HF ``Conv1D`` transposed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layout import BlockLayout, Layout
from .masks import is_int
from .name_patterns import match_pattern, regex_hint, regex_like
from .names import closest
from .weight_transform import base_type, refuse_recomputed, transforms_weight

__all__ = ["PRUNABLE_TYPES", "BlockLayout", "Layout", "PruneTarget", "resolve_targets", "unwrap_model",
           "default_target_names", "check_model", "WRAPPER_PREFIXES", "strip_wrapper_prefixes",
           "own_forward"]

#: Module types whose ``weight`` is pruned by default (plus HF ``Conv1D`` and MHA projections).
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def own_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a subclass of a :data:`PRUNABLE_TYPES` type whose own ``forward`` computes with a
    transform of ``self.weight`` (timm's ``StdConv2d``: weight standardization; fake quantization), where a pruned
    zero does not stay zero, so the OBS maths on ``weight`` would not hold. A subclass whose forward uses the weight
    as it is (HuggingFace's ``FalconLinear``) is not one (one probe: :mod:`woodfisher.weight_transform`)."""
    return transforms_weight(module, PRUNABLE_TYPES)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (no import of transformers needed)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


#: Prefixes a wrapper puts before every name of the model it wraps (DataParallel / DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(names: Iterable[str]) -> Dict[str, str]:
    """{name: name without the wrapper prefixes (:data:`WRAPPER_PREFIXES`) that every name starts with}.

    A prefix is dropped only when all names share it (a model's own submodule called ``module`` keeps its name
    next to others), repeatedly (``module._orig_mod.``).
    """
    names = list(names)
    out = {name: name for name in names}
    while out and (prefix := next((p for p in WRAPPER_PREFIXES if all(v.startswith(p) for v in out.values())),
                                  None)):
        out = {k: v[len(prefix):] for k, v in out.items()}
    return out


def unwrap_model(model: nn.Module) -> Tuple[nn.Module, str]:
    """(wrapped module, name prefix) through DataParallel / DDP / torch.compile wrappers."""
    prefix = ""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "_fsdp_wrapped_module"):
            # FSDP1: only meaningful inside summon_full_params (woodfisher.distributed.full_parameters)
            model, prefix = model._fsdp_wrapped_module, prefix + "_fsdp_wrapped_module."
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


@dataclass
class PruneTarget(BlockLayout):
    """One pruned weight.

    Attributes:
        name: the caller's name of the weight, e.g. ``"fc1.weight"``, ``"module.fc1.weight"``
            (wrapped), ``"attn.in_proj_weight"``; keys of masks and reports.
        key: its key in the unwrapped model's ``named_parameters()`` (``"fc1.weight_orig"``
            under torch.nn.utils.prune), for ``torch.func.functional_call``.
        module: the module that owns the attribute; ``attr``: its attribute name (``"weight"``).
        kind: ``"linear"`` (``(out, in)``, also raw MHA projections), ``"conv"``,
            ``"conv1d_hf"`` (``(in, out)`` storage).
        block_size: ``c``, entries per Fisher block (``numel`` for a whole-layer block).
        reparam: ``None``, ``"prune"`` (torch.nn.utils.prune) or ``"parametrize"``.
        owners: names of every module that holds this Parameter (several when tied).
        holders: (module, logical attribute) of every module that holds it (masks of
            tied weights are kept on each of them).
        channels_last: blocks in (out, *kernel, in) order (conv weights under an N:M pattern,
            see :mod:`woodfisher.layout`).
    """

    name: str
    key: str
    module: nn.Module
    attr: str
    kind: str
    block_size: int
    reparam: Optional[str] = None
    owners: Tuple[str, ...] = ()
    holders: Tuple[Tuple[nn.Module, str], ...] = ()
    channels_last: bool = False

    @property
    def param_name(self) -> str:
        """Alias of :attr:`name` (the key of masks)."""
        return self.name

    @property
    def label(self) -> str:
        """Short name for messages: the module name for ``<module>.weight``, else the parameter name."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def reparametrised(self) -> bool:
        return self.reparam is not None

    @property
    def param(self) -> torch.Tensor:
        """The Parameter that stores the weight (``weight_orig`` / ``original`` when reparametrised)."""
        if self.reparam == "prune":
            return getattr(self.module, self.attr + "_orig")
        if self.reparam == "parametrize":
            return self.module.parametrizations[self.attr].original
        return getattr(self.module, self.attr)

    def _holders(self) -> Tuple[Tuple[nn.Module, str], ...]:
        return self.holders or ((self.module, self.attr),)

    def _mask_buffers(self) -> List[torch.Tensor]:
        """Every mask applied to the weight: ``<attr>_mask`` / parametrization masks of each holder."""
        masks = []
        for module, attr in self._holders():
            if self.reparam == "prune" and hasattr(module, attr + "_mask"):
                masks.append(getattr(module, attr + "_mask"))
            elif self.reparam == "parametrize" and parametrize.is_parametrized(module, attr):
                masks += [p.mask for p in module.parametrizations[attr]]
        return masks

    def refresh(self) -> None:
        """Recompute the derived ``<attr> = <attr>_orig * <attr>_mask`` of torch.nn.utils.prune holders now
        (their forward pre-hook would do it at the next call; a stale tensor must not be read before)."""
        if self.reparam != "prune":
            return
        with torch.no_grad():
            for module, attr in self._holders():
                if hasattr(module, attr + "_mask"):
                    setattr(module, attr, getattr(module, attr + "_orig") * getattr(module, attr + "_mask"))

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def layout(self) -> Layout:
        """The weight's name, shape, kind and block size, without the tensors.

        Returns:
            :class:`Layout` (what a :class:`woodfisher.Curvature` keeps per weight).
        """
        return Layout(self.name, self.shape, self.kind, self.block_size, self.channels_last)

    def effective_weight(self) -> torch.Tensor:
        """The weight the model computes with (storage times every mask).

        Returns:
            Detached tensor of the weight's shape, dtype and device.
        """
        w = self.param.detach()
        for mask in self._mask_buffers():
            w = w * mask
        return w

    def keep_mask(self) -> torch.Tensor:
        """Current keep-mask: ``effective weight != 0`` (exact zeros count as pruned and stay pruned).

        Returns:
            Bool tensor of the weight's shape.
        """
        return self.effective_weight() != 0

    @torch.no_grad()
    def write(self, weight: torch.Tensor, keep: torch.Tensor) -> None:
        """Store new weights (pruned entries forced to exactly 0) and the keep-mask.

        Unchecked (the engine validates before writing).

        Args:
            weight: new values, any shape with the weight's number of entries (cast to its dtype).
            keep: bool keep-mask with the weight's number of entries.
        """
        keep = keep.reshape(self.shape)
        param = self.param
        param.copy_(weight.reshape(self.shape).to(param.dtype) * keep)
        for mask in self._mask_buffers():
            mask.copy_(keep.to(mask.dtype))
        self.refresh()


def _logical(module_name: str, param_attr: str) -> Tuple[str, str, Optional[str]]:
    """(owner module path, logical attribute, reparam) of a named_parameters entry."""
    parts = module_name.split(".") if module_name else []
    if len(parts) >= 2 and parts[-2] == "parametrizations" and param_attr == "original":
        return ".".join(parts[:-2]), parts[-1], "parametrize"
    if param_attr.endswith("_orig"):
        return module_name, param_attr[: -len("_orig")], "prune"
    return module_name, param_attr, None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _entries(model: nn.Module) -> Dict[str, dict]:
    """{logical param name: info} for every unique Parameter of the (unwrapped) model.

    ``holders`` lists (module name, module, logical attribute) of every module holding the
    Parameter, once per module object (a shared submodule is listed once).
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    holders: Dict[int, List[Tuple[str, nn.Module, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owner_name, logical, _ = _logical(mod_name, pname)
            owner = modules[owner_name]
            if all(m is not owner for _, m, _ in holders.get(id(p), [])):
                holders.setdefault(id(p), []).append((owner_name, owner, logical))
    out: Dict[str, dict] = {}
    for key, p in model.named_parameters():
        mod_name, _, attr = key.rpartition(".")
        owner_name, logical, reparam = _logical(mod_name, attr)
        owner = modules[owner_name]
        if reparam == "prune" and not hasattr(owner, logical + "_mask"):
            reparam, logical = None, attr
        out[_join(owner_name, logical)] = dict(key=key, module=owner, attr=logical, reparam=reparam, param=p,
                                               owners=[(n, m) for n, m, _ in holders.get(id(p), [])],
                                               holders=[(m, a) for _, m, a in holders.get(id(p), [])])
    return out


def _kind(module: nn.Module, attr: str) -> Optional[str]:
    """Kind of a prunable weight, or None when this (module, attribute) is not a prunable weight."""
    if attr == "weight":
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return "conv"
        if isinstance(module, nn.Linear):
            return "linear"
        if is_hf_conv1d(module):
            return "conv1d_hf"
    if isinstance(module, nn.MultiheadAttention) and attr in _MHA_WEIGHTS:
        return "linear"
    return None


def _mask_reparam_ok(info: dict) -> bool:
    """False for a torch.nn.utils.parametrize chain that is not made of masks (e.g. weight norm)."""
    if info["reparam"] != "parametrize":
        return True
    return all(hasattr(f, "mask") for f in info["module"].parametrizations[info["attr"]])


def default_target_names(model: nn.Module) -> List[str]:
    """Logical names of the default targets of ``model`` (unwrapped), in registration order."""
    names = []
    for name, info in _entries(unwrap_model(model)[0]).items():
        if _kind(info["module"], info["attr"]) is None or not _mask_reparam_ok(info):
            continue
        if info["attr"] == "weight" and own_forward(info["module"]):
            continue  # its forward may transform the weight: said by left_out.warn_left_out, refused when named
        if any(isinstance(o, nn.Embedding) for _, o in info["owners"]):
            continue  # tied LM head: prune the embedding only when named
        names.append(name)
    return names


def _refuse_left_out_match(entries: Dict[str, dict], pattern: str, model: nn.Module, arg: str,
                           error: ValueError) -> None:
    """A pattern that matches no default target but weights left out of the defaults: a ValueError saying which
    of those can be pruned when named (the list to paste) and which cannot (why); returns when it matches none."""
    others = {name: [owner for owner, _ in info["owners"]] for name, info in entries.items()
              if info["param"].dim() >= 2 and name not in default_target_names(model)}
    try:
        matched = match_pattern(pattern, others, arg)
    except ValueError:
        return
    modules = dict(model.named_modules(remove_duplicate=False))
    named, refused = [], []
    for name in matched:
        info = entries[name]
        path = name.split(".parametrizations.")[0] if ".parametrizations." in name else name.rpartition(".")[0]
        try:
            refuse_recomputed(modules.get(path), name, arg)
        except ValueError:
            refused.append(f"{name!r} (recomputed on every forward, e.g. by weight_norm)")
            continue
        if info["attr"] == "weight" and own_forward(info["module"]):
            refused.append(f"{name!r} (its layer's forward transforms the weight)")
        elif not _mask_reparam_ok(info):
            refused.append(f"{name!r} (reparametrised by torch.nn.utils.parametrize without a mask)")
        else:
            named.append(name)
    parts = [f"{arg}: the pattern {pattern!r} matches only weights left out of the defaults"]
    if named:
        parts.append(f"these are pruned when named exactly: {arg}={named!r}")
    if refused:
        parts.append("these cannot be pruned: " + ", ".join(refused))
    raise ValueError("; ".join(parts)) from error


def _lookup(entries: Dict[str, dict], raw: str, model: nn.Module, arg: str = "modules") -> List[str]:
    """Logical parameter names for a user-given name or pattern (:func:`_glob`); a name with a wrapper's prefix
    (:data:`WRAPPER_PREFIXES`) the model does not have is read without it.

    A parameter name (any name of a tied Parameter) or a module with a ``weight`` gives
    that weight; any other module gives the default targets held by it or its submodules
    (``"enc.layers.0.self_attn"``: ``in_proj_weight`` and ``out_proj.weight``).
    """
    if not isinstance(raw, str):
        raise ValueError(f"{arg} must hold module or parameter names (str), got {raw!r}")
    by_id = {id(info["param"]): name for name, info in entries.items()}
    aliases = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        mod_name, _, attr = key.rpartition(".")
        owner_name, logical, _ = _logical(mod_name, attr)
        aliases.setdefault(_join(owner_name, logical), by_id.get(id(p)))
    for cand in (raw, _join(raw, "weight")):
        if cand in entries:
            return [cand]
        if aliases.get(cand) is not None:
            return [aliases[cand]]
    modules = dict(model.named_modules(remove_duplicate=False))
    refuse_recomputed(modules.get(raw.removesuffix(".weight") if raw not in modules else raw), raw, arg)
    if raw not in modules:
        for wrapper in WRAPPER_PREFIXES:  # a name from the model wrapped otherwise (DataParallel, torch.compile)
            if raw.startswith(wrapper):
                try:
                    return _lookup(entries, raw[len(wrapper):], model, arg)
                except ValueError:
                    break  # the message below names what was given
        if any(c in raw for c in "*?["):  # not a name: a shell-style pattern
            try:
                return match_pattern(raw, {name: [owner for owner, _ in entries[name]["owners"]]
                                           for name in default_target_names(model)}, arg)
            except ValueError as error:
                _refuse_left_out_match(entries, raw, model, arg, error)
                raise
        if raw in dict(model.named_buffers()):
            raise ValueError(f"{arg}: {raw!r} is a buffer, not a Parameter; only parameters are pruned")
        names = list(modules) + [key for key, _ in model.named_parameters()]
        ends = [name for name in names if name.endswith("." + raw)]
        if ends:  # a name relative to each block ("mlp.c_fc"): every full name is needed
            shown = ", ".join(repr(name) for name in ends[:3]) + (f" and {len(ends) - 3} more" if len(ends) > 3 else "")
            raise ValueError(f"{arg}: no module or parameter is named {raw!r}; {len(ends)} end with it ({shown}): "
                             f"names are full names, e.g. {arg}=[name for name, _ in model.named_modules() "
                             f"if name.endswith({'.' + raw!r})]")
        if regex_like(raw):  # say what names are, not a near name
            raise ValueError(f"{arg}: {raw!r} looks like a regular expression; names are exact, or shell-style "
                             f"patterns (fnmatch: * ? [...]) such as 'blocks.*.mlp.*'{regex_hint(arg)}")
        match = closest(raw, names)
        hint = f" (did you mean {match!r}?)" if match else ""
        raise ValueError(f"{arg}: no module or parameter named {raw!r} in the model{hint}")
    inside = [name for name in default_target_names(model)
              if any(_within(owner, raw) for owner, _ in entries[name]["owners"])]
    if not inside:
        named = [name for name, info in entries.items() if _within(name.rpartition(".")[0], raw)
                 and info["param"].is_floating_point() and info["param"].dim() >= 2]
        every = (named if len(named) <= 12 else  # all of them (a 2-layer bidirectional LSTM has 8 or 12)
                 f"[name for name, p in model.named_parameters() if name.startswith({raw + '.'!r}) and p.dim() >= 2]")
        hint = (f"; its weights are not pruned by default, name them to prune them: modules={every}"
                if named else " (and has no floating parameter of >= 2 dims either)")
        raise ValueError(f"{arg}: {raw!r} is a {type(modules[raw]).__name__}, which holds no Linear / Conv / "
                         f"attention projection weight{hint}")
    return inside


def _within(name: str, parent: str) -> bool:
    return not parent or name == parent or name.startswith(parent + ".")


def check_module(model: nn.Module) -> None:
    """ValueError naming ``model`` unless it is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_model(model: nn.Module) -> None:
    """``model`` must be an ``nn.Module``, not TorchScript, whose parameters and buffers hold data (none on the meta
    device, no uninitialized lazy parameter)."""
    check_module(model)
    if isinstance(unwrap_model(model)[0], torch.jit.ScriptModule):  # functional_call cannot run it
        raise ValueError("model: a TorchScript module (torch.jit.script / torch.jit.trace) cannot be pruned: its "
                         "forward cannot run on other weights (torch.func); prune the nn.Module, then script or "
                         "trace the pruned one")
    tensors = (*model.named_parameters(), *model.named_buffers())
    lazy = [n for n, t in tensors if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise ValueError(f"model: {lazy[:4]}{'...' if len(lazy) > 4 else ''} are uninitialized lazy parameters "
                         "(LazyLinear / LazyConv...): run one forward pass on a sample batch first")
    meta = [n for n, t in tensors if t.is_meta]
    if meta:
        raise ValueError(f"model: {meta[:4]}{'...' if len(meta) > 4 else ''} are on the meta device (no data); "
                         "materialise the model first (e.g. model.to_empty(device=...) and load its weights)")


def resolve_targets(model: nn.Module, modules: Optional[Iterable[str]] = None,
                    block_size: Optional[int] = None, arg: str = "modules",
                    channels_last: bool = False) -> List[PruneTarget]:
    """The pruned weights of ``model``, each once, in registration order.

    Args:
        model: the network (wrappers are seen through, see the module docstring).
        modules: module names (``"fc1"``: its weight; a module without a weight, e.g.
            ``"layer1"`` or an ``nn.MultiheadAttention``: the default targets inside it) or
            parameter names (``"fc1.weight"``, ``"attn.in_proj_weight"``), optionally with
            the wrapper prefix (``"module.fc1"``); None = the default targets.
        block_size: entries per Fisher block (int >= 1), or None for whole-weight blocks; a weight
            smaller than ``block_size`` is one whole-weight block (blocks never span two weights).
        arg: the caller's argument that holds the names, for messages (``"masks"`` for
            :func:`woodfisher.attach_masks`).
        channels_last: lay conv weights out in (out, *kernel, in) order (for N:M patterns:
            :attr:`woodfisher.PruneConfig.channels_last`); other kinds keep theirs.
    Returns:
        list of :class:`PruneTarget`.
    Raises:
        ValueError: ``model`` not an ``nn.Module`` or on the meta device, unknown name (named), a
            named module without any prunable weight, a named parameter that is not a floating
            tensor of >= 2 dims, a weight of a non-floating dtype, no prunable weight, or a bad
            ``block_size``.
    """
    if block_size is not None and (not is_int(block_size) or block_size < 1):
        raise ValueError(f"block_size must be None (whole layers) or an int >= 1, got {block_size!r}")
    block_size = None if block_size is None else int(block_size)
    check_model(model)
    inner, prefix = unwrap_model(model)
    entries = _entries(inner)
    if modules is None:
        chosen = default_target_names(inner)
    else:
        if isinstance(modules, str):
            modules = [modules]
        chosen = []
        for raw in modules:
            stripped = raw[len(prefix):] if prefix and isinstance(raw, str) and raw.startswith(prefix) else raw
            chosen += [name for name in _lookup(entries, stripped, inner, arg) if name not in chosen]
    if not chosen:
        candidates = [name for name, info in entries.items()
                      if info["param"].is_floating_point() and info["param"].dim() >= 2][:5]
        hint = (f"; its floating parameters of >= 2 dims can be named: modules={candidates}" if candidates else
                "; it has no floating parameter of >= 2 dims either")
        raise ValueError("modules: the model has no prunable module (Linear / Conv1d/2d/3d or a named weight)" + hint)
    targets = []
    for name in chosen:
        info = entries[name]
        p = info["param"]
        kind = _kind(info["module"], info["attr"])
        if kind is None:
            if not p.is_floating_point() or p.dim() < 2:
                raise ValueError(f"{arg}: {name!r} has shape {tuple(p.shape)}; only weights with >= 2 dims "
                                 f"(rows = dim 0) can be pruned")
            kind = "linear" if p.dim() == 2 else "conv"
        if info["attr"] == "weight" and own_forward(info["module"]):
            cls = parametrize.type_before_parametrizations(info["module"])
            raise ValueError(f"{arg}: {name!r} belongs to a {cls.__name__}, a subclass of "
                             f"{base_type(info['module'], PRUNABLE_TYPES).__name__} whose forward computes with a "
                             "transform of the weight (weight standardization as in timm's StdConv2d, fake "
                             "quantization): a pruned zero would not stay zero there, so it cannot be pruned; prune a "
                             "plain layer (or fold the transform into the weight first)")
        if not _mask_reparam_ok(info):
            raise ValueError(f"{arg}: {name!r} is reparametrised by torch.nn.utils.parametrize without a "
                             "'mask' (only mask parametrizations such as torch.ao.pruning's FakeSparsity can "
                             "be pruned); remove the parametrization first")
        if not p.is_floating_point():
            raise ValueError(f"model: weight {prefix + name!r} has dtype {p.dtype}; only floating-point weights "
                             "(float16, bfloat16, float32, float64) can be pruned")
        c = p.numel() if block_size is None else min(block_size, p.numel())
        targets.append(PruneTarget(prefix + name, info["key"], info["module"], info["attr"], kind, c,
                                   info["reparam"], tuple(prefix + n for n, _ in info["owners"]),
                                   tuple(info["holders"]), channels_last and kind == "conv"))
    return targets
