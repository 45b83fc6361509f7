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
