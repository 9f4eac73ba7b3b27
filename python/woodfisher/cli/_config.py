"""JSON config files for the CLI: keys are option names, command-line flags win.

A config ``{"sparsity": 0.9, "num_grads": 256, "obs_update": false}`` sets the defaults
of a subcommand's parser before the command line is parsed again, so any flag also given
on the command line overrides the file. Keys are the API's option names (the fields of
:class:`woodfisher.PruneConfig` for ``prune``) or the flags' spellings (``"num-grads"``,
``"no-obs-update": true``); unknown keys, wrong types and values outside an option's
choices are refused with a ValueError naming the key.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Union

from ..names import unknown_names

__all__ = ["load_config", "config_defaults"]


def load_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a JSON object from ``path``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path!r} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {path!r} must hold a JSON object {{option: value}}")
    return cfg


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    flag = action.option_strings[0] if action.option_strings else key
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} ({flag}) must be true or false, got {value!r}")
        negative = str(key).lstrip("-").replace("-", "_").startswith("no_") and not action.dest.startswith("no_")
        return (not value) if negative else value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} ({flag}) must be true or false, got {value!r}")
        # true means "the flag is given", as on the command line
        return (not value) if isinstance(action, argparse._StoreFalseAction) else value
    if value is None:
        return None

    def one(v: Any) -> Any:
        if isinstance(v, dict) and getattr(action.type, "takes_json_object", False):
            v = json.dumps(v)  # e.g. "sparsity": {"fc1": 0.5}, read as on the command line
        elif isinstance(v, (dict, list)):
            raise ValueError(f"config key {key!r} ({flag}) got a nested value {v!r}")
        if action.type is not None:
            try:
                v = action.type(str(v))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"config key {key!r} ({flag}): {err}") from None
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"config key {key!r} ({flag}) must be one of {list(action.choices)}, got {v!r}")
        return v

    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [one(v) for v in values]
    return one(value)


def config_defaults(parser: argparse.ArgumentParser, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Map config keys to ``parser`` destinations with converted, validated values."""
    actions = {}
    for action in parser._actions:
        if action.dest in ("help", "config") or action.dest is argparse.SUPPRESS:
            continue
        actions[action.dest] = action
        for opt in action.option_strings:
            actions[opt.lstrip("-").replace("-", "_")] = action
    out: Dict[str, Any] = {}
    for key, value in cfg.items():
        norm = str(key).lstrip("-").replace("-", "_")
        if norm not in actions:
            known = sorted({a.option_strings[0].lstrip("-") for a in actions.values() if a.option_strings})
            raise ValueError(f"{unknown_names([key], actions, 'config key')}: not an option of this command; "
                             f"known: {known}")
        action = actions[norm]
        out[action.dest] = _convert(action, str(key), value)
    return out
