"""Errors that the command line turns into a clear message and a non-zero exit, never a traceback.

`UserError` is the one root: every error that a user can fix (a bad config, a missing folder, a
corrupt checkpoint, an allocation that cannot be launched) derives from it, and every entry point
(`cxr-dist ...`, `python -m cxr_dist.X`) runs through `run_main`, which prints
"PROG: message" on stderr and exits with code 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2  # the code argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UserError(Exception):
    """Bad input from the user (missing data, wrong path, corrupt checkpoint...); the message says what to do."""


class DataError(UserError):
    """The dataset folder or the shards are missing, malformed or mostly unreadable."""


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt or not a cxr-dist checkpoint."""


def report(prog: str, error: BaseException) -> int:
    """Print `PROG: message` on stderr and return the exit code of a user error."""
    print(f"{prog}: {error}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run_main(prog: str, main: Callable[[list[str]], int | None], argv: list[str] | None = None,
             *, setup_logging: bool = True) -> int:
    """Run an entry point's `main(argv)` and return its exit code.

    A `UserError` becomes one message on stderr prefixed by `prog` and exit code 2; Ctrl-C
    becomes "PROG: interrupted" and 130. `setup_logging` configures logging for a
    single-process command (training configures it itself once it knows its rank).

        if __name__ == "__main__":
            sys.exit(run_main("cxr-dist evaluate", main))
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if setup_logging:
        from .log import setup

        setup(is_main=True)
    try:
        return int(main(argv) or 0)
    except UserError as e:
        return report(prog, e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
