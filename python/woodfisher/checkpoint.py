"""Safe checkpoint loading.

:func:`load_checkpoint` reads a file with ``torch.load(weights_only=True)`` (no code
runs while unpickling). A file that needs arbitrary unpickling (for example one that
stores an optimizer or LR-scheduler class) is refused with a clear message unless
the caller passes ``trust_pickle=True``; an empty, truncated or corrupt file (or one not
written by ``torch.save``) is reported as such, never as an unsafe pickle.

The state dict found in the file is normalised before a strict load:

- it is taken from ``state_dict`` / ``model_state_dict`` / ``model`` if the file holds
  a training checkpoint dict, else the file itself must be a {name: tensor} dict; a whole
  pickled module (``torch.save(model)``, loadable only with ``trust_pickle=True``) gives
  its ``state_dict()``;
- wrapper prefixes common to all keys are stripped, outermost first: ``module.``
  (DataParallel / DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``);
- masked-layer wrappers ``X._layer.<p>`` become ``X.<p>`` and a mask ``X._weight_mask``
  is multiplied into ``X.weight`` (an all-ones mask changes nothing).
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Dict, Mapping, Union

import torch
from torch import nn

from .targets import strip_wrapper_prefixes

__all__ = ["load_checkpoint", "read_state_dict", "normalise_state_dict", "save_state_dict"]

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
_MASK_SUFFIX = "._weight_mask"
_WRAPPER = "._layer."


def _torch_load(path: str, trust_pickle: bool):
    """``torch.load`` of ``path`` on the CPU, its failures sorted into corrupt, unsafe and untrusted."""
    with open(path, "rb") as f:  # an unreadable file fails here, with its own OSError
        head = f.read(32)
    if not head:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes): it is not a torch.save file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing; the error says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = [ln.strip().split(" was not an allowed global")[0] for ln in str(err).splitlines()
                  if "Unsupported global" in ln]
        if not _pickle_intact(path):  # random bytes, a plain pickle, a cut file: never call it unsafe
            raise _corrupt(path, err) from None
        if not trust_pickle:
            why = ("it pickles Python objects" if unsafe else
                   "it uses pickle instructions the safe loader does not read (pickle_protocol > 3?)")
            raise ValueError(
                f"checkpoint {path!r} cannot be loaded safely (weights_only=True): {why}, and unpickling "
                f"can run arbitrary code. If you trust this file, pass trust_pickle=True (CLI: --trust-pickle). "
                f"Detail: {unsafe[0] if unsafe else _detail(err)}") from None
    except Exception as err:  # noqa: BLE001 - truncated zip archives, bad records: torch raises many kinds
        raise _corrupt(path, err) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a trusted pickle that still cannot be read
        raise ValueError(f"checkpoint {path!r} could not be unpickled even with trust_pickle=True "
                         f"({_detail(err)})") from None


def _pickle_intact(path: str) -> bool:
    """Whether ``path`` is a torch.save file whose pickled records parse completely (opcodes only,
    nothing executed): the ``data.pkl`` of a zip archive, or the magic number, protocol, system
    info, object and storage-key records of the legacy format. False for random bytes, a plain
    pickle, or a file cut inside its records (whose last class name would be a fragment)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as f:
                    for _ in pickletools.genops(f):
                        pass
            return True
        with open(path, "rb") as f:
            for _ in range(5):
                for _ in pickletools.genops(f):
                    pass
        return True
    except Exception:  # noqa: BLE001 - any parse failure means the records are not intact
        return False


def _detail(err: BaseException) -> str:
    """``"Type: the informative line of the message"`` (torch's unpickling errors open with a long preamble)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    best = [ln for ln in lines if "Unsupported" in ln or "load key" in ln]
    line = (best or lines or [""])[0].split(". ")[0][:200]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _corrupt(path: str, err: BaseException) -> ValueError:
    return ValueError(f"checkpoint {path!r} is corrupt or truncated, or not a file written by torch.save "
                      f"({os.path.getsize(path)} bytes; {_detail(err)})")


def _fold_prune_pairs(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``{X.p_orig, X.p_mask}`` -> ``{X.p: p_orig * p_mask}`` wherever both are present with one shape."""
    pairs = [key[:-len("_orig")] for key in state if key.endswith("_orig") and
             isinstance(state.get(key[:-len("_orig")] + "_mask"), torch.Tensor) and
             state[key[:-len("_orig")] + "_mask"].shape == state[key].shape]
    if not pairs:
        return state
    dropped = {f"{name}_{end}" for name in pairs for end in ("orig", "mask")}
    out = {key: value for key, value in state.items() if key not in dropped}
    for name in pairs:
        orig = state[name + "_orig"]
        out[name] = orig * state[name + "_mask"].to(orig.dtype)
    return out


_PARAMETRIZED = re.compile(r"^((?:.*\.)?)parametrizations\.([^.]+)\.(original|\d+\.mask)$")


def _fold_mask_parametrizations(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``{X.parametrizations.p.original, X.parametrizations.p.<i>.mask}`` -> ``{X.p: original * masks}``: a model
    saved with ``torch.nn.utils.parametrize`` masks attached. A parametrization whose masks are not in the file
    (``torch.ao.pruning``'s ``FakeSparsity`` keeps its mask out of the state dict) is refused: its zeros are lost."""
    chains: Dict[str, Dict[str, list]] = {}
    for key in state:
        match = _PARAMETRIZED.match(key)
        if match:
            chain = chains.setdefault(match.group(1) + match.group(2), {"original": [], "masks": []})
            chain["original" if match.group(3) == "original" else "masks"].append(key)
    chains = {name: chain for name, chain in chains.items() if chain["original"]}
    if not chains:
        return state
    folded = {key for chain in chains.values() for key in chain["original"] + chain["masks"]}
    out = {key: value for key, value in state.items() if key not in folded}
    for name, chain in chains.items():
        original = state[chain["original"][0]]
        if not chain["masks"]:
            raise ValueError(
                f"checkpoint holds {chain['original'][0]!r} (saved while a torch.nn.utils.parametrize "
                f"parametrization was attached) but no mask for it, so {name!r} cannot be rebuilt (torch.ao.pruning's "
                f"FakeSparsity keeps its mask out of the state dict: the pruned zeros are not in the file); save the "
                f"state dict after woodfisher.make_permanent(model) (or the sparsifier's squash_mask())")
        for key in sorted(chain["masks"]):
            original = original * state[key].to(original.dtype)
        out[name] = original
    return out


def normalise_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``), unwrap ``X._layer.p`` -> ``X.p``, fold
    ``X._weight_mask`` into ``X.weight`` and ``torch.nn.utils.prune``'s ``X.p_orig`` / ``X.p_mask`` pair (a model
    saved with masks attached: ``keep_masks=True``, ``attach_masks``, ``GradualPruner``) into ``X.p``, and a mask
    parametrization's ``X.parametrizations.p.original`` / ``X.parametrizations.p.<i>.mask`` into ``X.p`` (one whose
    mask is not in the file is a ValueError)."""
    state = _fold_mask_parametrizations(_fold_prune_pairs(state))
    state = {new: state[old] for old, new in strip_wrapper_prefixes(state).items()}
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
            if isinstance(obj.get(key), (Mapping, nn.Module)):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):  # torch.save(model): only reached with trust_pickle=True
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path!r} holds no state dict (expected a {{name: tensor}} dict, "
                         f"one under {', '.join(_CONTAINER_KEYS)}, or a whole nn.Module)")
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
        FileNotFoundError if ``path`` does not exist; ValueError if the file is empty,
        truncated or corrupt (said so), needs unpickling and ``trust_pickle`` is False (said
        so), or if its keys / shapes do not match.
    """
    state = read_state_dict(path, trust_pickle)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if k in state and state[k].shape != v.shape]
    if missing or unexpected:
        shapes = f"; shapes that differ (file vs model): {bad[:6]}" if bad else ""
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not match {type(model).__name__}: "
                         f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                         f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}{shapes}")
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
