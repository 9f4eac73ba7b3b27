"""Command line: ``python -m woodfisher demo | prune | report | pai | export`` (also ``woodfisher ...``).

One module per subcommand (``add_parser(subparsers)`` + ``run(args)``), listed once in
:data:`COMMANDS`; shared helpers in :mod:`._common`. Every subcommand takes
``--config file.json`` (keys = option names, see :mod:`._config`); flags given on the
command line override the file. Errors in the inputs (bad values, missing, empty, corrupt
or unsafe files, unreadable paths, and argparse's own: see :class:`._common.Parser`) are
printed as one line ``woodfisher: error: ...`` (exit code 2), never as a traceback or a
usage block; ``--help`` shows every option's default. The library's warnings are printed as
one line ``note: ...`` each.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence, Tuple

from ..config import pattern_fixed_sparsity
from ..distributed.group import agreed
from . import demo, export, pai, prune, report
from ._common import Parser, one_line
from ._config import config_defaults, load_config
from ._spelling import cli_text, user_spellings

__all__ = ["build_parser", "parse_args", "main", "COMMANDS"]

COMMANDS = (demo, prune, report, pai, export)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand of :data:`COMMANDS`."""
    parser = Parser(prog="woodfisher", description="WoodFisher (OBS) pruning for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(c.__name__.rsplit(".", 1)[1]
                                                                       for c in COMMANDS) + "}")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise RuntimeError("parser has no subcommands")  # pragma: no cover


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file sets the subcommand's defaults, flags override.

    Required flags are required by argparse (shown so in ``--help`` and the usage line),
    unless the config file gives them; ``--pattern N:M`` gives ``--sparsity`` (1 - N/M).
    """
    return _parse(argv)[0]


def _parse(argv: Optional[Sequence[str]],
           spellings: Optional[dict] = None) -> Tuple[argparse.Namespace, Optional[dict]]:
    """:func:`parse_args`; ``spellings`` (a dict) is filled with the subcommand's :func:`._spelling.user_spellings`
    once the command and the config file are known."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = Parser(prog="woodfisher", add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--pattern")
    known, _ = pre.parse_known_args(argv)
    command = next((a for a in argv if a in {c.__name__.rsplit(".", 1)[1] for c in COMMANDS}), None)
    if command is not None:
        sub = _subparser(parser, command)
        cfg = load_config(known.config) if known.config else {}
        if spellings is not None:
            spellings.update(user_spellings(sub, argv, cfg))
        defaults = config_defaults(sub, cfg) if known.config else {}
        pattern = known.pattern or defaults.get("pattern")
        if "sparsity" not in defaults and any(a.dest == "sparsity" for a in sub._actions):
            try:
                defaults["sparsity"] = pattern_fixed_sparsity(pattern)
            except ValueError:
                pass                    # no N:M pattern (or a bad one, refused when the flags are parsed)
        sub.set_defaults(**defaults)
        for action in sub._actions:
            if action.dest in defaults:
                action.required = False
    return parser.parse_args(argv), spellings


#: torch's CPU allocator asks for transparent huge pages on buffers of 2 MiB or more when this is "1" at its first
#: such allocation (it reads the variable once); a pruning step's fresh gradients then cost a fraction of the page
#: faults (benchmarks/results/thp_step.md: default steps 1.09-1.22x faster on a Linux VM). Set by the command-line
#: programs only, before they load anything; a library call leaves the caller's process as it is.
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def console_main(argv: Optional[Sequence[str]] = None) -> int:
    """``woodfisher ...`` / ``python -m woodfisher ...``: :func:`main` in a process of its own, with torch's huge-page
    allocation on (:data:`HUGE_PAGES_VARIABLE`) unless the environment already says otherwise."""
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    return main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (2 on bad input or an unreadable / unwritable path, 1 when an optional
    dependency is missing, e.g. scikit-learn for the demo; each with a one-line message). Warnings of the library
    (UserWarning) are printed as one line ``note: ...``."""
    spellings: dict = {}  # the options as the user wrote them (:mod:`._spelling`), once the command is known
    with warnings.catch_warnings():  # restores warnings.showwarning afterwards
        warnings.showwarning = _notes(warnings.showwarning, spellings)
        try:
            args, _ = _parse(argv, spellings)
            return int(args.func(args) or 0)
        except (ValueError, OSError) as err:  # OSError: FileNotFoundError, PermissionError, IsADirectoryError...
            # under torchrun an error every rank raised (naming the rank it came from) is printed once, by rank 0
            if not agreed(err) or os.environ.get("RANK", "0") == "0":
                print(f"woodfisher: error: {cli_text(one_line(err), spellings)}", file=sys.stderr)
            return 2
        except ImportError as err:  # an optional dependency the command needs (its message says what to install)
            if os.environ.get("RANK", "0") == "0":
                print(f"woodfisher: error: {one_line(err)}", file=sys.stderr)
            return 1


def _notes(show_other, spellings: dict):
    """A ``warnings.showwarning`` that prints a UserWarning as one line ``note: ...`` on a line of its own
    (no source line) and passes any other category to ``show_other``. Under ``torchrun`` only rank 0 prints
    the notes: every rank holds the same model and result, so the others would print the same lines."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, UserWarning):
            show_other(message, category, filename, lineno, file, line)
            return
        if os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            return
        from ..progress import write_line

        write_line(f"note: {cli_text(one_line(message), spellings)}")
    return show
