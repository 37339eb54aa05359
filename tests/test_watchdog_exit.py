"""A rank's watchdog thread is out of its store call before the rank's interpreter finalizes (Note [watchdog at exit]).

A daemon thread that returns from a store call (C++, the GIL released) while the interpreter finalizes aborts the
process after a successful run ("terminate called without an active exception"). Each case freezes the job's store
host (SIGSTOP) while the thread waits for it, and ends the rank.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from common import TESTS_DIR

pytestmark = pytest.mark.slow  # fresh processes: the interpreter's own exit is what is checked


def _end_a_rank(*args: str, timeout: float = 60) -> tuple[float, bool, str]:
    result = subprocess.run(
        [sys.executable, str(TESTS_DIR / "scripts" / "watchdog_slow_store.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "terminate called" not in log, log
    found = re.search(r"stop\(\) took ([0-9.]+) s; thread alive after stop\(\): (True|False)", log)
    assert found, log
    return float(found[1]), found[2] == "True", log


def test_a_slow_store_host_is_waited_for_before_the_rank_exits():
    took, alive, log = _end_a_rank("--freeze", "5")
    assert not alive and took > 2, log  # the host thawed 3.5 s into stop(): the thread came back first


def test_a_store_host_that_never_answers_delays_the_exit_by_a_bounded_time_only():
    try:
        took, alive, log = _end_a_rank("--freeze", "0", "--stop-timeout", "2")
    finally:
        subprocess.run(["pkill", "-KILL", "-f", "watchdog_slow_store_host"], check=False)
    assert alive and took < 5, log  # the thread is left in its call; the rank does not write to the host either
