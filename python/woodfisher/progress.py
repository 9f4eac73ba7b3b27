"""One progress display for every phase of a run: data, gradients, inverses, selection, update, evaluation.

A :class:`Progress` is one tqdm line that each phase takes over in turn (its name, a count
when the phase knows its total, the elapsed and remaining time), and it records the
seconds spent in each phase (:attr:`Progress.seconds`, :meth:`Progress.summary`).

The code that does the work does not hold the display: it reports to whichever one is
active (:func:`display` activates one for a block; the CLI opens one around the whole
command, :func:`woodfisher.prune_one_shot` around a call when none is active):

- :func:`phase` ``(name, total=None)``: a block of work, nested phases included (a phase
  inside another is timed on its own, the outer one resumes after it);
- :func:`progress_bar` ``(total, desc, unit)``: a counted loop (gradients, K-FAC samples);
  a phase of the active display, else a plain tqdm bar of its own (or nothing when
  ``enabled`` is False).

Without an active display, :func:`phase` does nothing, so library calls with
``progress=False`` print nothing. ``progress=True`` (the API's default) draws only when
stderr is a terminal (tqdm's ``disable=None``); ``force=True`` (the CLI's ``--progress``)
draws anyway, and then ends its line on close so that what follows starts on a fresh one.
:func:`write_line` prints a message (a CLI note) on a line of its own while a display runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Dict, Iterator, List, Optional

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, this only guards odd installs
    tqdm = None

__all__ = ["Progress", "display", "current", "phase", "step_label", "progress_bar", "write_line"]

_OPEN = "{desc} [{elapsed}]"
_COUNTED = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]"
_ACTIVE: contextvars.ContextVar[Optional["Progress"]] = contextvars.ContextVar("woodfisher_progress", default=None)


class _Null:
    """A handle that counts nothing (no display)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Phase:
    """A running phase of a :class:`Progress`: ``update(n)`` advances its count."""

    def __init__(self, owner: "Progress", name: str, total: Optional[int], unit: str):
        self.owner, self.name, self.total, self.unit = owner, name, total, unit
        self.done = 0
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.owner.bar is not None and self.owner.stack and self.owner.stack[-1][0] is self:
            self.owner.bar.update(n)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner._end(self)


class Progress:
    """One display for the phases of a run, and the seconds spent in each.

    Args:
        enabled: draw the tqdm line when stderr is a terminal (False: only time the phases).
        desc: prefix of the line, e.g. ``"woodfisher prune"``.
        force: draw it even when stderr is not a terminal (a file, a pipe).

    Attributes:
        seconds: {phase name: seconds spent in it, nested phases excluded}, in first-seen order.
    """

    def __init__(self, enabled: bool = True, desc: str = "woodfisher", force: bool = False):
        self.desc = desc
        self.seconds: Dict[str, float] = {}
        self.stack: List[list] = []  # [phase, started (perf_counter), seconds of its nested phases]
        self.bar = None
        self.suffix = ""  # after the phase name while a :func:`step_label` block runs, e.g. ", step 2/8"
        self.stream = sys.stderr  # tqdm's default file, read now as tqdm reads it
        if (enabled or force) and tqdm is not None:
            bar = tqdm(total=None, desc=desc, leave=False, dynamic_ncols=True, bar_format=_OPEN,
                       disable=False if force else None)  # None: tqdm's rule, off when stderr is no terminal
            self.bar = None if bar.disable else bar

    def start(self, name: str, total: Optional[int] = None, unit: str = "it") -> _Phase:
        """Begin phase ``name`` (``total`` steps of ``unit`` when known); close the handle to end it."""
        handle = _Phase(self, name, total, unit)
        self.stack.append([handle, time.perf_counter(), 0.0])
        self.seconds.setdefault(name, 0.0)
        self._show(handle)
        return handle

    def _show(self, handle: _Phase) -> None:
        if self.bar is None:
            return
        # label, unit and format first: reset() redraws, and must not show the new count under the old label
        self.bar.set_description_str(f"{self.desc}: {handle.name}{self.suffix}", refresh=False)
        self.bar.unit = handle.unit
        self.bar.bar_format = _OPEN if handle.total is None else _COUNTED
        self.bar.total = handle.total
        self.bar.reset(total=handle.total)
        self.bar.n = handle.done
        self.bar.refresh()

    def _end(self, handle: _Phase) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] is handle:
                _, started, nested = self.stack.pop(i)
                spent = time.perf_counter() - started
                self.seconds[handle.name] += spent - nested
                if i > 0:
                    self.stack[i - 1][2] += spent
                break
        if self.stack:
            self._show(self.stack[-1][0])

    def close(self) -> None:
        """End every open phase and remove the line."""
        while self.stack:
            self.stack[-1][0].close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            if not _isatty(self.stream):  # a forced line in a file: end it, so the next output starts a line
                self.stream.write("\n")
                self.stream.flush()

    def summary(self) -> str:
        """``"data 1.2 s, gradients 3.4 s, ..."`` (phases in the order they first ran)."""
        return ", ".join(f"{name} {secs:.1f} s" for name, secs in self.seconds.items())


def current() -> Optional[Progress]:
    """The active display, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def display(enabled: bool = True, desc: str = "woodfisher", force: bool = False) -> Iterator[Progress]:
    """Activate a :class:`Progress` ``(enabled, desc, force)`` for the block, or keep using the one already active."""
    active = _ACTIVE.get()
    if active is not None:
        yield active
        return
    prog = Progress(enabled, desc, force)
    token = _ACTIVE.set(prog)
    try:
        yield prog
    finally:
        _ACTIVE.reset(token)
        prog.close()


@contextlib.contextmanager
def phase(name: str, total: Optional[int] = None, unit: str = "it") -> Iterator[object]:
    """A phase of the active display (nothing happens without one); yields a handle with ``update(n)``."""
    active = _ACTIVE.get()
    if active is None:
        yield _Null()
        return
    handle = active.start(name, total, unit)
    try:
        yield handle
    finally:
        handle.close()


@contextlib.contextmanager
def step_label(text: Optional[str]) -> Iterator[None]:
    """Show ``text`` (e.g. ``"step 2/8"``) after the phase names of the active display during the block
    (nothing without a display or with ``text=None``); the phases' timings are unchanged."""
    active = _ACTIVE.get()
    if active is None or text is None:
        yield
        return
    previous, active.suffix = active.suffix, f", {text}"
    try:
        yield
    finally:
        active.suffix = previous


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A counted loop: a phase of the active display, else its own tqdm bar when ``enabled``
    (and stderr is a terminal).

    Returns a handle with ``update(n)`` and ``close()`` (call ``close`` when the loop ends).
    """
    active = _ACTIVE.get()
    if active is not None:
        return active.start(desc, total, unit)
    if enabled and tqdm is not None:
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)
    return _Null()


def write_line(text: str) -> None:
    """Print ``text`` to stderr on a line of its own, above the active display's line if one is drawn."""
    active = _ACTIVE.get()
    bar = active.bar if active is not None else None
    if bar is None:
        print(text, file=sys.stderr, flush=True)
    elif _isatty(sys.stderr):
        tqdm.write(text, file=sys.stderr)  # clears the line, prints, redraws it
    else:
        sys.stderr.write("\n" + text + "\n")  # a forced line in a file: the text on a line of its own
        sys.stderr.flush()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
