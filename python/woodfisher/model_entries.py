"""The parameters of a model as the pruner sees them: logical names, owners, default targets, wrappers.

One entry per unique Parameter (tied weights once, under the first name ``named_parameters()`` gives them),
named logically: ``torch.nn.utils.prune``'s ``weight_orig`` and a ``torch.nn.utils.parametrize`` chain's
``parametrizations.weight.original`` are read as ``"<m>.weight"``. :func:`default_target_names` is the one
rule for what is pruned when the caller names nothing (the rules: :mod:`woodfisher.targets`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from torch import nn

from .weight_transform import transforms_weight

__all__ = ["PRUNABLE_TYPES", "WRAPPER_PREFIXES", "own_forward", "is_hf_conv1d", "strip_wrapper_prefixes",
           "unwrap_model", "logical_name", "join_name", "param_entries", "weight_kind", "mask_reparam_ok",
           "default_target_names"]

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


def logical_name(module_name: str, param_attr: str) -> Tuple[str, str, Optional[str]]:
    """(owner module path, logical attribute, reparam) of a named_parameters entry."""
    parts = module_name.split(".") if module_name else []
    if len(parts) >= 2 and parts[-2] == "parametrizations" and param_attr == "original":
        return ".".join(parts[:-2]), parts[-1], "parametrize"
    if param_attr.endswith("_orig"):
        return module_name, param_attr[: -len("_orig")], "prune"
    return module_name, param_attr, None


def join_name(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def param_entries(model: nn.Module) -> Dict[str, dict]:
    """{logical param name: info} for every unique Parameter of the (unwrapped) model.

    ``holders`` lists (module name, module, logical attribute) of every module holding the
    Parameter, once per module object (a shared submodule is listed once).
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    holders: Dict[int, List[Tuple[str, nn.Module, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owner_name, logical, _ = logical_name(mod_name, pname)
            owner = modules[owner_name]
            if all(m is not owner for _, m, _ in holders.get(id(p), [])):
                holders.setdefault(id(p), []).append((owner_name, owner, logical))
    out: Dict[str, dict] = {}
    for key, p in model.named_parameters():
        mod_name, _, attr = key.rpartition(".")
        owner_name, logical, reparam = logical_name(mod_name, attr)
        owner = modules[owner_name]
        if reparam == "prune" and not hasattr(owner, logical + "_mask"):
            reparam, logical = None, attr
        out[join_name(owner_name, logical)] = dict(key=key, module=owner, attr=logical, reparam=reparam, param=p,
                                               owners=[(n, m) for n, m, _ in holders.get(id(p), [])],
                                               holders=[(m, a) for _, m, a in holders.get(id(p), [])])
    return out


def weight_kind(module: nn.Module, attr: str) -> Optional[str]:
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


def mask_reparam_ok(info: dict) -> bool:
    """False for a torch.nn.utils.parametrize chain that is not made of masks (e.g. weight norm)."""
    if info["reparam"] != "parametrize":
        return True
    return all(hasattr(f, "mask") for f in info["module"].parametrizations[info["attr"]])


def default_target_names(model: nn.Module) -> List[str]:
    """Logical names of the default targets of ``model`` (unwrapped), in registration order."""
    names = []
    for name, info in param_entries(unwrap_model(model)[0]).items():
        if weight_kind(info["module"], info["attr"]) is None or not mask_reparam_ok(info):
            continue
        if info["attr"] == "weight" and own_forward(info["module"]):
            continue  # its forward may transform the weight: said by left_out.warn_left_out, refused when named
        if any(isinstance(o, nn.Embedding) for _, o in info["owners"]):
            continue  # tied LM head: prune the embedding only when named
        names.append(name)
    return names

