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
``progress=False`` print nothing. Where the display goes (:func:`output_mode`, the same
rule for the API's ``progress=True`` -- its default -- and the CLI without a flag):

- stderr is a terminal: one live tqdm line, removed when the run ends;
- a Jupyter notebook (whose stderr is no terminal): tqdm's notebook widget (``tqdm.auto``);
- anything else (a CI log, ``nohup``, ``2> file``, a pipe): plain newline-ended lines,
  never carriage returns: one when a phase that took at least :data:`LINE_SECONDS` ends
  (``woodfisher: Fisher gradients: 512/512 grad [12.3 s, 41.63 grad/s]``), and one every
  :data:`HEARTBEAT_SECONDS` while a phase runs, with the time left and the rate of a counted phase
  (``[30 s so far, ~12 s left, 2.10 grad/s]``), so a long run in a log shows it is alive and when it ends;
- ``TQDM_DISABLE=1`` in the environment (tqdm's own switch, also honoured by HuggingFace's
  bars) turns the default display off.

``force=True`` (the CLI's ``--progress``) shows it despite ``TQDM_DISABLE`` and, in a log,
writes a line for every phase however short. :func:`write_line` prints a message (a CLI
note) on a line of its own while a display runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from typing import Dict, Iterator, List, Optional

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, this only guards odd installs
    tqdm = None

__all__ = ["Progress", "display", "current", "phase", "step_label", "progress_bar", "write_line", "output_mode",
           "LINE_SECONDS", "HEARTBEAT_SECONDS"]

#: in a log (stderr no terminal), a phase that ends gets a line when it took at least this long (seconds).
LINE_SECONDS = 1.0
#: in a log, a running phase gets a line at least this often (seconds).
HEARTBEAT_SECONDS = 30.0

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
        elif self.owner.mode == "lines":
            self.owner._heartbeat(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner._end(self)


class Progress:
    """One display for the phases of a run, and the seconds spent in each.

    Args:
        enabled: show it where :func:`output_mode` says (False: only time the phases).
        desc: prefix of the line, e.g. ``"woodfisher prune"``.
        force: show it even with ``TQDM_DISABLE`` set, and in a log a line for every phase.

    Attributes:
        seconds: {phase name: seconds spent in it, nested phases excluded}, in first-seen order.
        mode: None, "live" (a tqdm line or notebook widget) or "lines" (plain lines, a log).
    """

    def __init__(self, enabled: bool = True, desc: str = "woodfisher", force: bool = False):
        self.desc = desc
        self.seconds: Dict[str, float] = {}
        self.stack: List[list] = []  # [phase, started (perf_counter), seconds of its nested phases]
        self.bar = None
        self.suffix = ""  # after the phase name while a :func:`step_label` block runs, e.g. ", step 2/8"
        self.stream = sys.stderr  # tqdm's default file, read now as tqdm reads it
        self.mode = output_mode(enabled, force)
        self.min_seconds = 0.0 if force else LINE_SECONDS
        self.last_line = time.perf_counter()
        if self.mode == "live":
            self.bar = tqdm(total=None, desc=desc, leave=False, dynamic_ncols=True, bar_format=_OPEN, disable=False)

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
                if self.mode == "lines" and spent - nested >= self.min_seconds:
                    self._line(handle, f"{spent - nested:.1f} s" + _rate(handle, spent - nested))
                break
        if self.stack:
            self._show(self.stack[-1][0])

    def _line(self, handle: _Phase, when: str) -> None:
        """One plain line about ``handle`` (log mode): ``"desc: name, step 2/8: 5/8 grad [1.2 s]"``."""
        count = "" if handle.total is None else f": {handle.done}/{handle.total} {handle.unit}"
        self.stream.write(f"{self.desc}: {handle.name}{self.suffix}{count} [{when}]\n")
        self.stream.flush()
        self.last_line = time.perf_counter()

    def _heartbeat(self, handle: _Phase) -> None:
        now = time.perf_counter()
        if now - self.last_line >= HEARTBEAT_SECONDS:
            started = next(item[1] for item in self.stack if item[0] is handle)
            spent = now - started
            left = ""
            if handle.total is not None and 0 < handle.done < handle.total:
                left = f", ~{spent * (handle.total - handle.done) / handle.done:.0f} s left"
            self._line(handle, f"{spent:.0f} s so far{left}" + _rate(handle, spent))

    def close(self) -> None:
        """End every open phase and remove the line."""
        while self.stack:
            self.stack[-1][0].close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self) -> str:
        """``"data 1.2 s, gradients 3.4 s, ..."`` (phases in the order they first ran)."""
        return ", ".join(f"{name} {secs:.1f} s" for name, secs in self.seconds.items())


def _rate(handle: _Phase, seconds: float) -> str:
    """``", 2.50 grad/s"`` (or ``", 4.00 s/grad"`` when slower than one per second) of a counted phase; else ""."""
    if handle.total is None or handle.done <= 0 or seconds <= 0:
        return ""
    rate = handle.done / seconds
    return f", {rate:.2f} {handle.unit}/s" if rate >= 1 else f", {1 / rate:.2f} s/{handle.unit}"


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
    """A counted loop: a phase of the active display, else (when ``enabled``) a display of its own
    where :func:`output_mode` says.

    Returns a handle with ``update(n)`` and ``close()`` (call ``close`` when the loop ends).
    """
    active = _ACTIVE.get()
    if active is not None:
        return active.start(desc, total, unit)
    mode = output_mode(enabled)
    if mode == "live":
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=False)
    if mode == "lines":
        return _Own(Progress(True), desc, total, unit)
    return _Null()


class _Own:
    """A phase of a display of its own: closing the phase closes the display."""

    def __init__(self, owner: Progress, desc: str, total: Optional[int], unit: str):
        self.owner, self.handle = owner, owner.start(desc, total, unit)

    def update(self, n: int = 1) -> None:
        self.handle.update(n)

    def close(self) -> None:
        self.owner.close()


def output_mode(enabled: bool = True, force: bool = False) -> Optional[str]:
    """Where a display goes: None (nothing), "live" (a terminal, or a notebook's widget) or "lines" (a log).

    ``enabled`` False and not ``force``: None; ``TQDM_DISABLE`` set (not "0"/"false") and not ``force``:
    None; stderr a terminal, or running in a Jupyter kernel: "live" (needs tqdm); otherwise "lines".
    """
    if not (enabled or force):
        return None
    if not force and os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return None
    if _isatty(sys.stderr) or _in_notebook():
        return "live" if tqdm is not None else "lines"
    return "lines"


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (notebook, lab, VS Code, Colab, qtconsole), whose stderr is no terminal but
    renders tqdm: its widget where ipywidgets exists (``tqdm.auto``), else the text line (carriage returns work)."""
    return "ipykernel" in sys.modules


def write_line(text: str) -> None:
    """Print ``text`` to stderr on a line of its own, above the active display's line if one is drawn."""
    active = _ACTIVE.get()
    bar = active.bar if active is not None else None
    if bar is None:
        print(text, file=sys.stderr, flush=True)
    else:
        tqdm.write(text, file=sys.stderr)  # clears the line, prints, redraws it


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
