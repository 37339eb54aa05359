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


def _end_ranks(*cases: tuple[str, ...], timeout: float = 60) -> list[tuple[float, bool, str]]:
    """Run the script once per case, all at once (they mostly wait); per case, how long ``stop()`` took, whether
    the thread was still in its call after it, and the log."""
    script = str(TESTS_DIR / "scripts" / "watchdog_slow_store.py")
    runs = [
        subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for args in cases
    ]
    results = []
    for run in runs:
        log = run.communicate(timeout=timeout)[0]
        assert run.returncode == 0 and "terminate called" not in log, log
        found = re.search(r"stop\(\) took ([0-9.]+) s; thread alive after stop\(\): (True|False)", log)
        assert found, log
        results.append((float(found[1]), found[2] == "True", log))
    return results


def test_the_rank_exits_after_a_slow_store_host_and_after_one_that_never_answers():
    try:
        slow, never = _end_ranks(("--freeze", "5"), ("--freeze", "0", "--stop-timeout", "2"))
    finally:
        subprocess.run(["pkill", "-KILL", "-f", "watchdog_slow_store_host"], check=False)
    took, alive, log = slow
    assert not alive and took > 2, log  # the host thawed 3.5 s into stop(): the thread came back first
    took, alive, log = never
    assert alive and took < 5, log  # the thread is left in its call; the rank does not write to the host either
