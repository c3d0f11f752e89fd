"""SIGTERM, SIGINT and SIGHUP during a conversion: stop cleanly with one line.

Slurm sends SIGTERM at a time limit, torchrun sends it to every rank as soon as one rank
exits, and Ctrl-C is SIGINT. The handler raises :class:`~reshard.errors.Interrupted` in the main
thread at the next Python instruction, so the run unwinds through the usual failure path:
rank 0 removes this run's staging directory and releases its claim, nothing is committed.
While that clean-up runs, further signals wait (:func:`interrupts_deferred`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from .errors import Interrupted

log = logging.getLogger("reshard")
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_state = {"deferred": 0, "pending": None, "raised": False, "depth": 0}


def _handler(signum, frame):
    name = signal.Signals(signum).name
    if _state["raised"]:
        return  # already unwinding: one line is enough
    if _state["deferred"]:
        _state["pending"] = name
        return
    _state["raised"] = True
    raise Interrupted(f"stopped by {name} (a Slurm time limit or scancel, torchrun stopping the job after another "
                      "rank failed, or Ctrl-C); nothing was committed and this run's staging is removed")


@contextlib.contextmanager
def stop_on_signals():
    """Install the handlers for the duration of one conversion (main thread only). Nested uses
    share the outermost one: the CLI keeps them until the failure's line is printed."""
    if threading.current_thread() is not threading.main_thread() or _state["depth"]:
        yield
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.update(deferred=0, pending=None, raised=False, depth=1)
    try:
        yield
    finally:
        _state["depth"] = 0
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def interrupts_deferred():
    """A block that a signal must not cut short (removing staging, releasing the claim)."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
        if _state["pending"] and not _state["deferred"]:
            log.warning("%s arrived while finishing; what was committed (if anything) is complete", _state["pending"])
            _state["pending"] = None
