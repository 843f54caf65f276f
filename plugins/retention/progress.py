"""Progress of long commands (a load, a dbt build, a campaign step): done/total, rate, time left.

On a terminal (stderr is a TTY) it is a live tqdm bar; anywhere else (an Airflow task
log, a file, a pipe) plain lines on stderr, at most one every `interval` seconds, and a
last line when the work ends:

    build: nodes 12/60 (20%) 1.3 nodes/s, 37 s left
    load orders.csv: 120.0 MB/450.0 MB (26%) 60.0 MB/s, 6 s left; 812,040 rows, 406,020 rows/s
    build: nodes 60/60 (100%) in 42 s, 1.4 nodes/s

`configure(mode=..., interval=...)` sets the process-wide defaults (the CLI's
`--progress` and `--progress-interval`): mode `auto` (bar on a TTY, else lines), `bar`,
`lines` or `off`. A `Progress` is safe to update from several threads (the campaign
dispatcher's senders). Rates and times left are wall-clock figures for the operator's
eyes only; nothing computes with them.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

MODES = ("auto", "bar", "lines", "off")
_defaults: dict[str, Any] = {"mode": "auto", "interval": 30.0}


def configure(mode: str | None = None, interval: float | None = None) -> None:
    """Process-wide defaults for every `Progress` created afterwards."""
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
        _defaults["mode"] = mode
    if interval is not None:
        if interval < 0:
            raise ValueError("the progress interval must be >= 0 seconds")
        _defaults["interval"] = float(interval)


def human_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def human_amount(value: float, unit: str) -> str:
    """`1,172,135` for counts; `450.0 MB` for bytes (unit "B")."""
    if unit == "B":
        for suffix in ("B", "KB", "MB", "GB", "TB"):
            if abs(value) < 1000 or suffix == "TB":
                return f"{value:.0f} B" if suffix == "B" else f"{value:.1f} {suffix}"
            value /= 1000
    return f"{value:,.0f}"


class Progress:
    """One piece of long work: `update(n)` as it goes, `close()` (or `with`) at the end."""

    def __init__(self, what: str, total: int | None = None, unit: str = "rows", *,
                 mode: str | None = None, interval: float | None = None,
                 stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 started: float | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.note = ""  # see set_note
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _defaults["interval"] if interval is None else interval
        self.clock = clock
        mode = mode or _defaults["mode"]
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        self.mode = mode
        # `started`: when the work began, if before this object (a clock() reading)
        self.started = self.clock() if started is None else started
        self._rate_start = self.started  # where the counted work began (see set_total)
        self._last_line = self.started
        self._lock = threading.Lock()
        self._closed = False
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=" " + unit if unit != "B" else "B",
                             unit_scale=unit == "B", file=self.stream, dynamic_ncols=True,
                             leave=True, mininterval=0.2)

    # ------------------------------------------------------------------ updates

    def set_total(self, total: int | None) -> None:
        """The total, once known; before the first step it also marks where the counted
        work begins (dbt parses first), so rate and time left leave the preparation out."""
        with self._lock:
            self.total = total
            if self.done == 0:
                self._rate_start = self._last_line = self.clock()
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def describe(self, what: str) -> None:
        """Rename the work shown (e.g. the file now being loaded)."""
        with self._lock:
            self.what = what
            if self._bar is not None:
                self._bar.set_description(what, refresh=False)

    def set_note(self, note: str) -> None:
        """A second figure shown after the rate while the work runs (e.g. the rows of a
        load measured in bytes); the last line leaves it out."""
        with self._lock:
            self.note = note
            if self._bar is not None:
                self._bar.set_postfix_str(note, refresh=False)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.mode == "lines" and not (self.total and self.done >= self.total):
                now = self.clock()  # (at the total, the last line follows at close)
                if now - self._last_line >= self.interval:
                    self._last_line = now
                    self._write(self.line(now))

    def set_done(self, done: int) -> None:
        """Move to an absolute position (e.g. bytes read so far)."""
        with self._lock:
            delta = done - self.done
        if delta:
            self.update(delta)

    def close(self, summary: bool = True) -> None:
        """End the bar; in plain lines, write the last line (`summary`: the work ended;
        False when it failed and its error says the rest)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.mode == "lines" and summary:
                self._write(self.line(self.clock(), final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(summary=exc_type is None)

    # ------------------------------------------------------------------ text

    def line(self, now: float, final: bool = False) -> str:
        """`what: done/total (pct) rate, time left` (final: `... in <elapsed>, rate`)."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / max(now - self._rate_start, 1e-9)
        amount = human_amount(self.done, self.unit)
        noun = "" if self.unit == "B" else f"{self.unit} "
        if self.total:
            share = 100 * self.done / self.total
            amount += f"/{human_amount(self.total, self.unit)} ({share:.0f}%)"
        speed = (f"{human_amount(rate, self.unit)}/s" if self.unit == "B"
                 else f"{rate:,.{1 if rate < 10 else 0}f} {self.unit}/s")
        if final:
            return f"{self.what}: {noun}{amount} in {human_seconds(elapsed)}, {speed}"
        left = ""
        if self.total and rate > 0 and self.done < self.total:
            left = f", {human_seconds((self.total - self.done) / rate)} left"
        note = f"; {self.note}" if self.note else ""
        return f"{self.what}: {noun}{amount} {speed}{left}{note}"

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not fail the work itself
            pass


class _Off(Progress):
    def __init__(self) -> None:  # noqa: D107 - nothing to set up
        self.done, self.total, self.mode = 0, None, "off"
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        pass

    def set_total(self, total: int | None) -> None:
        pass

    def describe(self, what: str) -> None:
        pass

    def set_note(self, note: str) -> None:
        pass

    def set_done(self, done: int) -> None:
        pass

    def close(self, summary: bool = True) -> None:
        pass


def progress(what: str, total: int | None = None, unit: str = "rows", **kwargs: Any) -> Progress:
    """A `Progress` with the process-wide defaults (a silent one in mode `off`)."""
    if (kwargs.get("mode") or _defaults["mode"]) == "off":
        return _Off()
    return Progress(what, total, unit, **kwargs)
