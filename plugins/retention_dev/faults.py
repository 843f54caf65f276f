"""Fault injection for tests: an `on_point` hook that kills the process at a named point.

The product calls `on_point(point, process)` at the points of its send loop
(`retention.campaigns.dispatch.POINTS`) and of a trigger run
(`retention.triggers.runner.POINTS`) when a caller passes one; `process` is the index of
the dispatch worker process that reached the point (0 .. processes - 1), None in the
calling process. `KillAt` is picklable, so it reaches spawned worker processes, each of
which gets its own copy and counts its own hits.
"""

from __future__ import annotations

import os
import sys
import threading

from retention.campaigns.dispatch import POINTS as DISPATCH_POINTS
from retention.triggers.runner import POINTS as TRIGGER_POINTS

#: every point the product calls `on_point` at
POINTS = DISPATCH_POINTS + TRIGGER_POINTS
#: the exit status of a process killed at its point (as if by SIGKILL: 128 + 9)
EXIT_CODE = 137


class KillAt:
    """`os._exit(137)` at the `nth` time (1 = the first) `point` is reached in this
    process: no cleanup, no `finally`, the database sessions simply vanish, as when a
    worker is killed. Hits are counted per process, over every thread of it.

    `process`: only the dispatch worker process with this index dies (the others, and
    the calling process, go on); None: whichever process reaches the point."""

    def __init__(self, point: str, nth: int = 1, process: int | None = None) -> None:
        if point not in POINTS:
            raise ValueError(f"unknown point {point!r}; the points are: {', '.join(POINTS)}")
        if isinstance(nth, bool) or not isinstance(nth, int) or nth < 1:
            raise ValueError(f"nth must be a whole number >= 1, not {nth!r}")
        if process is not None and (isinstance(process, bool) or not isinstance(process, int)
                                    or process < 0):
            raise ValueError(f"process must be a worker process index >= 0 or None, "
                             f"not {process!r}")
        self.point, self.nth, self.process = point, nth, process
        self._hits = 0
        self._lock = threading.Lock()

    def __call__(self, point: str, process: int | None) -> None:
        if point != self.point or (self.process is not None and process != self.process):
            return
        with self._lock:
            self._hits += 1
            hit = self._hits
        if hit == self.nth:
            print(f"KillAt: hit {hit} of {point} in process {os.getpid()} (dispatch worker "
                  f"{process}): exiting with {EXIT_CODE}", file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)

    def __getstate__(self) -> dict:
        # a copy in another process starts counting from zero there
        return {"point": self.point, "nth": self.nth, "process": self.process}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"KillAt({self.point!r}, nth={self.nth}, process={self.process!r})"
