"""SIGINT, SIGTERM and SIGHUP while an output file is open: unwind and clean up, never
inside an HDF5 call.

Python runs signal handlers in the main thread between bytecodes, which can be inside a
Python callback HDF5 made (the partial file's I/O methods). An exception raised there would
break the HDF5 library's state (and crash the process at exit), so a signal that arrives
inside such a callback is held and delivered by `deliver_pending` at the next safe point.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import CodeType, FrameType

from ...errors import Terminated

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
                if s is not None)
_unsafe_code: set[CodeType] = set()
_pending: list[int] = []


def mark_unsafe(*functions) -> None:
    """Register functions that HDF5 calls back into: no exception may be raised in them."""
    _unsafe_code.update(f.__code__ for f in functions)


def _exception_for(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    while frame is not None:
        if frame.f_code in _unsafe_code:
            _pending.append(signum)
            return
        frame = frame.f_back
    raise _exception_for(signum)


def deliver_pending() -> None:
    """Raise the exception of a signal held back while HDF5 was running (call at safe
    points)."""
    if _pending:
        signum = _pending[0]
        _pending.clear()
        raise _exception_for(signum)


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block: SIGINT raises KeyboardInterrupt, SIGTERM/SIGHUP raise Terminated
    (held while inside an HDF5 callback). Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue  # e.g. SIGHUP under nohup: the user asked for it to be ignored
        previous[signum] = current
        signal.signal(signum, _handler)
    try:
        yield
    except BaseException:
        _restore(previous)
        _pending.clear()
        raise
    _restore(previous)
    deliver_pending()  # a signal held during the block's last HDF5 call is not dropped


def _restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
