"""A writer thread, so host copies and HDF5 writes overlap with the next batch's compute."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class BackgroundWriter:
    """Runs submitted jobs in order on one thread; at most `max_pending` wait at a time.

    A job's exception is raised in the caller at the next `submit` or at `close`.
    """

    def __init__(self, max_pending: int = 2):
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="jaccli-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # re-raised in the submitting thread
                    self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise_pending()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait for every submitted job; raise the first error one of them hit."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._raise_pending()
