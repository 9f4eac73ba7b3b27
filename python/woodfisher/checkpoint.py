"""Safe checkpoint loading.

:func:`load_checkpoint` reads a file with ``torch.load(weights_only=True)`` (no code
runs while unpickling). A file that needs arbitrary unpickling (for example one that
stores an optimizer or LR-scheduler class) is refused with a clear message unless
the caller passes ``trust_pickle=True``.

The state dict found in the file is normalised before a strict load:

- it is taken from ``state_dict`` / ``model_state_dict`` / ``model`` if the file holds
  a training checkpoint dict, else the file itself must be a {name: tensor} dict;
- a ``module.`` prefix common to all keys (DataParallel) is stripped;
- masked-layer wrappers ``X._layer.<p>`` become ``X.<p>`` and a mask ``X._weight_mask``
  is multiplied into ``X.weight`` (an all-ones mask changes nothing).
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, Mapping, Union

import torch
from torch import nn

__all__ = ["load_checkpoint", "read_state_dict", "normalise_state_dict", "save_state_dict"]

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
_MASK_SUFFIX = "._weight_mask"
_WRAPPER = "._layer."


def _torch_load(path: str, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            lines = [ln.strip().split(" by default.")[0] for ln in str(err).splitlines()
                     if "Unsupported global" in ln]
            raise ValueError(
                f"checkpoint {path!r} cannot be loaded safely (weights_only=True): it pickles "
                f"Python objects, and unpickling them can run arbitrary code. If you trust this "
                f"file, pass trust_pickle=True (CLI: --trust-pickle). Detail: "
                f"{lines[0] if lines else type(err).__name__}") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def normalise_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip ``module.``, unwrap ``X._layer.p`` -> ``X.p`` and fold ``X._weight_mask`` into ``X.weight``."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        state = {k[len("module."):]: v for k, v in state.items()}
    out: Dict[str, torch.Tensor] = {}
    masks: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(_MASK_SUFFIX):
            masks[key[:-len(_MASK_SUFFIX)] + ".weight"] = value
        else:
            out[key.replace(_WRAPPER, ".")] = value
    for name, mask in masks.items():
        if name not in out:
            raise ValueError(f"checkpoint has a mask for {name!r} but no such weight")
        if mask.shape != out[name].shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(out[name].shape)}")
        out[name] = out[name] * mask.to(out[name].dtype)
    return out


def read_state_dict(path: Union[str, os.PathLike], trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """The normalised {name: tensor} state dict stored in ``path`` (on the CPU)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path!r} holds no state dict (expected a {{name: tensor}} dict "
                         f"or one under {', '.join(_CONTAINER_KEYS)})")
    return normalise_state_dict(obj)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike], trust_pickle: bool = False) -> nn.Module:
    """Load the weights stored at ``path`` into ``model`` (strict key and shape matching).

    Args:
        model: the module to fill in place.
        path: a ``torch.save`` file (state dict or training checkpoint dict).
        trust_pickle: allow full unpickling for files that ``weights_only`` refuses.
    Returns:
        ``model``.
    Raises:
        FileNotFoundError if ``path`` does not exist; ValueError if the file needs
        unpickling and ``trust_pickle`` is False, or if its keys / shapes do not match.
    """
    state = read_state_dict(path, trust_pickle)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not match {type(model).__name__}: "
                         f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                         f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"checkpoint {os.fspath(path)!r} has shapes that do not match "
                         f"{type(model).__name__} (file vs model): {bad[:6]}")
    model.load_state_dict(state, strict=True)
    return model


def save_state_dict(model: nn.Module, path: Union[str, os.PathLike]) -> str:
    """Save ``model.state_dict()`` (tensors only, loadable with weights_only=True); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path
