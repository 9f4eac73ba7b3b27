"""The one place where the library's messages are put in the command line's words.

Errors and notes of the library name options as the API spells them (``num_grads=16``, ``block_size``,
``obs_update=False``). On the command line the user typed ``--num-grads 16`` or a config-file key
(``"num-grads": 16``); :func:`user_spellings` records which, and :func:`cli_text` rewrites a message
in that spelling: ``name=value`` becomes ``--flag value`` (``--flag`` / ``--no-flag`` for on/off
options) or ``"key": value``; a bare option name with an underscore (``num_grads``) becomes ``--flag``
or ``"key"``. Text inside a Python call the message suggests (``estimate_curvature(model, loader,
num_grads=...)``) and the function-valued options (``batch_adapter=``, ``loss_fn=``, which
:func:`._common.cli_spelling` explains) are left as they are.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ._common import cli_spelling

__all__ = ["user_spellings", "cli_text"]

#: (written, kind) per API name: kind "flag", "bool" (--x / --no-x; written is the positive form), "switch" (a flag
#: that only turns an option on), "key" (a config-file key) or "boolkey" (a config-file key of an on/off option).
Spellings = Dict[str, Tuple[str, str]]

_CALL = re.compile(r"\w+\([^()]*\)")  # a Python call the message suggests: left in the API's words
_SKIP = ("help", "config", "batch_adapter")
_QUOTED = re.compile(r"""^['"]([^'"\s]*)['"]""")  # a quoted value: a flag takes it without the quotes


def _normal(text: str) -> str:
    return str(text).lstrip("-").replace("-", "_")


def user_spellings(parser: argparse.ArgumentParser, argv: Sequence[str],
                   config: Optional[Mapping[str, Any]] = None) -> Spellings:
    """{API name (a destination of ``parser``, or a name of its ``api_names`` {API name: destination}): (what the user
    wrote for it, kind)}: the flag of ``argv``, else the key of the ``--config`` file, else the option's first long
    flag.

    Args:
        parser: a subcommand's parser. argv: the command line. config: the ``--config`` file's object, if any.
    Returns:
        :data:`Spellings`.
    """
    typed = {str(a).split("=", 1)[0] for a in argv if str(a).startswith("--")}
    keys = {_normal(key): str(key) for key in (config or {})}
    out: Spellings = {}
    for action in parser._actions:
        longs = [opt for opt in action.option_strings if opt.startswith("--")]
        if not longs or action.dest in _SKIP:
            continue
        on_off = isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction))
        switch = isinstance(action, argparse._StoreTrueAction)
        positive = next((opt for opt in longs if not opt.startswith("--no-")), longs[0])
        names = {action.dest} | {_normal(opt) for opt in longs}
        written = next((opt for opt in longs if opt in typed), None)
        key = next((keys[name] for name in names if name in keys), None)
        if written is None and key is not None:
            out[action.dest] = (key, "boolkey" if on_off else "key")
        else:
            kind = "switch" if switch else "bool" if on_off else "flag"
            out[action.dest] = (positive if on_off else (written or longs[0]), kind)
    for api, dest in getattr(parser, "api_names", {}).items():  # the API's own name of an option, where it differs
        if dest in out:
            out[api] = out[dest]
    return out


def _assignment(spelling: Tuple[str, str], value: str) -> str:
    written, kind = spelling
    if kind in ("bool", "switch") and value in ("True", "False"):
        if value == "True":
            return written
        return "--no-" + written[2:] if kind == "bool" else f"no {written}"
    if kind == "boolkey" and value in ("True", "False"):
        return f'"{written}": {value.lower()}'
    if kind in ("key", "boolkey"):
        return f'"{written}": {value}'
    return written + " " + _QUOTED.sub(r"\1", value)  # --pattern 2:4, as typed


def _translate(text: str, spellings: Spellings) -> str:
    for name, spelling in spellings.items():
        text = re.sub(rf"(?<![\w.\-'\"]){re.escape(name)}=([^\s,;)]*)",
                      lambda match: _assignment(spelling, match.group(1)), text)
        if "_" in name:
            shown = spelling[0] if spelling[1] in ("flag", "bool", "switch") else f'"{spelling[0]}"'
            text = re.sub(rf"(?<![\w.\-'\"]){re.escape(name)}(?![\w'\"(=])", lambda _: shown, text)
    return text


def cli_text(message: str, spellings: Optional[Spellings] = None) -> str:
    """``message`` (one line) in the command line's words (see the module), with :func:`._common.cli_spelling`'s
    note on function-valued options.

    Args:
        message: an error's or a note's text. spellings: from :func:`user_spellings` (None: unchanged words).
    Returns:
        The text to print.
    """
    note = cli_spelling(message)
    if spellings:
        parts, last = [], 0
        for match in _CALL.finditer(message):
            parts += [_translate(message[last:match.start()], spellings), match.group(0)]
            last = match.end()
        message = "".join(parts) + _translate(message[last:], spellings)
    return message + note
