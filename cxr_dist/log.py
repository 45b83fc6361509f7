"""Logging and progress bars, set up in one place.

`setup(is_main)` is called once per process by every entry point (the CLI for single-process
commands, training once its accelerator knows the rank): cxr-dist's own messages at INFO on the
main process and at WARNING on the others; other libraries at WARNING everywhere. Messages go to
stderr, so stdout stays for results (JSON, tables).

`bars_enabled(is_main)` decides every tqdm bar: on the main process, and only when stderr is a
terminal; in a SLURM log file a bar is thousands of carriage-return updates, so there the
one-line-per-epoch summaries are what is printed.
"""
from __future__ import annotations

import logging
import sys

PACKAGE = "cxr_dist"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each message.

    A handler that kept the stream it was created with would write into a closed stream after
    the stream is swapped (pytest's capture, a caller redirecting stderr).
    """

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup(is_main: bool = True, rank: int | None = None) -> None:
    """Configure logging for this process; calling it again only updates the levels.

    `rank`, when given for a process other than the main one, prefixes its messages so that the
    lines of several ranks in one log file can be told apart.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)  # the root keeps its level (WARNING): other libraries' warnings only
    prefix = "" if is_main or rank is None else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(prefix + FORMAT, DATEFMT))
    logging.getLogger(PACKAGE).setLevel(logging.INFO if is_main else logging.WARNING)


def bars_enabled(is_main: bool = True) -> bool:
    """Whether a tqdm progress bar is shown: main process and an interactive stderr only."""
    try:
        return bool(is_main) and sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Lines:
    """A progress bar's stand-in where bars are off (a log file): one INFO line every `every_s`
    seconds ("cache views 1/3: 120/170 batches (71%), 95 s"), so a long step is never silent."""

    def __init__(self, total: int | None, desc: str, is_main: bool, every_s: float) -> None:
        import time

        self.total, self.desc, self.every_s, self.n = total, desc, every_s, 0
        self.log = logging.getLogger(PACKAGE) if is_main else None
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        import time

        self.n += n
        now = time.monotonic()
        if self.log is not None and now - self.last >= self.every_s:
            self.last = now
            share = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
            self.log.info("%s: %d%s, %.0f s", self.desc, self.n, share, now - self.t0)

    def set_postfix(self, **_kw) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, is_main: bool = True, every_s: float = 30.0):
    """A tqdm bar on an interactive main process; elsewhere a line in the log every `every_s`
    seconds on the main process (nothing on the others). Both have update(n), set_postfix, close."""
    if bars_enabled(is_main):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    return _Lines(total, desc, is_main, every_s)
