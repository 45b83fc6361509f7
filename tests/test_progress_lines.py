"""Issue 23 item 16: with stderr not a terminal (a log file), long steps print a progress line
every ~30 s instead of nothing (`log.progress`; the frozen-compute cache, epochs and prepare use it)."""
from __future__ import annotations

import logging

from cxr_dist import log


def test_without_a_terminal_progress_is_logged_as_lines(caplog):
    log.setup(is_main=True)
    with caplog.at_level(logging.INFO, logger="cxr_dist"):
        bar = log.progress(4, "caching train (batches)", is_main=True, every_s=0.0)
        for _ in range(4):
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if "caching train" in r.getMessage()]
    assert lines and lines[-1].startswith("caching train (batches): 4/4 (100%)")


def test_other_ranks_and_quiet_intervals_print_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="cxr_dist"):
        other = log.progress(3, "epoch 1 (batches)", is_main=False, every_s=0.0)
        slow = log.progress(3, "epoch 2 (batches)", is_main=True, every_s=3600.0)
        for bar in (other, slow):
            bar.update(3)
            bar.close()
    assert not [r for r in caplog.records if "epoch" in r.getMessage()]
