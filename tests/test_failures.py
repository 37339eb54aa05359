"""A rank that raises or dies ends the whole CP job quickly, and the log says which rank it was."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from common import run_script, script_command

pytestmark = pytest.mark.slow  # every case launches a fresh job, as a user does

BOUND_S = 120  # the collective timeout is 60 s; peers notice a dead rank much sooner


def _fail(tmp_path: Path, *args: str) -> tuple[str, int, float]:
    started = time.monotonic()
    result = run_script(
        "trainer_llama.py", "--out", str(tmp_path / "r.pt"), "--timeout", "60", *args, timeout=BOUND_S, fresh=True
    )
    assert not (tmp_path / "r.pt").exists()
    return result.stdout + result.stderr, result.returncode, time.monotonic() - started


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_rank_raising_mid_step_ends_every_rank_and_is_named(tmp_path, failing_rank):
    log, returncode, elapsed = _fail(tmp_path, "--fail-rank", str(failing_rank))
    assert returncode != 0 and elapsed < BOUND_S
    assert (
        f"lightning_cp: rank {failing_rank} (data-parallel rank 0, context-parallel rank {failing_rank})"
        " failed: RuntimeError: injected failure" in log
    )
    other = 1 - failing_rank
    assert f"lightning_cp: rank {other} (data-parallel rank 0, context-parallel rank {other}) lost a peer" in log


def test_a_rank_dying_mid_step_ends_the_others(tmp_path):
    log, returncode, elapsed = _fail(tmp_path, "--fail-rank", "1", "--die")
    assert returncode != 0 and elapsed < BOUND_S
    assert "lightning_cp: rank 0 (data-parallel rank 0, context-parallel rank 0) lost a peer" in log


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def _processes_left(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _run_with_a_stopped_rank(tmp_path: Path, *args: str, send: signal.Signals | None, to_group: bool = True):
    """Launch a Trainer job whose rank 1 SIGSTOPs itself; optionally signal it as a terminal or scheduler would.

    Returns the log, the launcher's exit code and the seconds from the stop (or the signal) to the end.
    """
    log_path = tmp_path / "log.txt"
    command, env = script_command("trainer_llama.py", "--out", str(tmp_path / "r.pt"), "--stop-rank", "1", *args)
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    group = launcher.pid  # a new session: the launcher leads the process group its ranks inherit
    try:
        assert _wait_for(lambda: "stopping rank 1" in log_path.read_text(), 120), log_path.read_text()[-3000:]
        time.sleep(2)  # rank 0 is now blocked in a collective with the stopped rank
        started = time.monotonic()
        if send is not None:
            (os.killpg if to_group else os.kill)(group, send)  # Ctrl-C reaches the whole foreground group
        returncode = launcher.wait(timeout=90)
        elapsed = time.monotonic() - started
        assert _wait_for(lambda: not _processes_left(group), 10), "a rank outlived the job"
        return log_path.read_text(), returncode, elapsed
    finally:
        if _processes_left(group):
            os.killpg(group, signal.SIGKILL)


STOPPED = "stopped answering: rank 1 (data-parallel rank 0, context-parallel rank 1)"


def test_ctrl_c_ends_a_job_with_a_stopped_rank_within_seconds_and_names_it(tmp_path):
    log, returncode, elapsed = _run_with_a_stopped_rank(tmp_path, "--heartbeat-timeout", "0", send=signal.SIGINT)
    assert returncode == 128 + signal.SIGINT and elapsed < 60, (returncode, elapsed, log[-3000:])
    assert STOPPED in log and "SIGINT received" in log


def test_sigterm_to_the_launcher_ends_a_job_with_a_stopped_rank_with_a_nonzero_code(tmp_path):
    log, returncode, elapsed = _run_with_a_stopped_rank(
        tmp_path, "--heartbeat-timeout", "0", send=signal.SIGTERM, to_group=False
    )
    assert returncode == 128 + signal.SIGTERM and elapsed < 60, (returncode, elapsed, log[-3000:])
    assert STOPPED in log


def test_a_stopped_rank_is_detected_named_and_the_job_ended(tmp_path):
    log, returncode, elapsed = _run_with_a_stopped_rank(tmp_path, "--heartbeat-timeout", "5", send=None)
    assert returncode != 0 and elapsed < 60, (returncode, elapsed, log[-3000:])
    assert STOPPED in log and "no heartbeat" in log


HEALTHY_SIGNALS = {
    # Trainer: Lightning stops gracefully on SIGTERM but exits 0, a scheduler must read a killed job as failed;
    # Fabric: SIGTERM killed the launcher outright (-15) and left its rank to find it gone
    "sigterm_to_launcher": (
        signal.SIGTERM,
        False,
        "received SIGTERM: training stops, and the job ends with exit code 143",
    ),
    # Trainer: Lightning ends a run stopped by Ctrl-C with exit code 1; Fabric: Python kills itself with SIGINT (-2)
    # after a traceback per rank (issue 26). Ctrl-C reaches the whole foreground group
    "ctrl_c": (signal.SIGINT, True, "was interrupted (Ctrl-C, SIGINT): the job ends with exit code 130"),
    "sigint_to_launcher": (signal.SIGINT, False, "was interrupted (Ctrl-C, SIGINT): the job ends with exit code 130"),
}


@pytest.mark.parametrize("script", ["trainer_llama.py", "fabric_llama.py"])
@pytest.mark.parametrize("case", list(HEALTHY_SIGNALS))
def test_a_signal_to_a_healthy_job_exits_with_128_plus_the_signal_and_says_so_with_no_rank_left(
    tmp_path, case, script
):
    """Ranks that are computing, not blocked: 128 + the signal all the same, and a line saying what happened."""
    send, to_group, line = HEALTHY_SIGNALS[case]
    log_path = tmp_path / "log.txt"
    command, env = script_command(script, "--out", str(tmp_path / "r.pt"), "--steps", "200", "--announce-steps")
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert _wait_for(lambda: "rank 0 training step 2" in log_path.read_text(), 120), log_path.read_text()[-3000:]
        (os.killpg if to_group else os.kill)(launcher.pid, send)
        returncode = launcher.wait(timeout=60)
        log = log_path.read_text()
        assert returncode == 128 + send, (returncode, log[-3000:])
        said = f"lightning_cp: rank 0 (data-parallel rank 0, context-parallel rank 0) {line}" in log
        if script == "trainer_llama.py" and send == signal.SIGTERM and not said:
            # Lightning stops each rank at the next batch that sees its own SIGTERM flag; a rank stopping a step
            # before the others blocks in Lightning's collectives, and the watchdog ends the job instead (5 s).
            said = (
                "rank 0 (data-parallel rank 0, context-parallel rank 0): SIGTERM received, but this rank is blocked"
                " (most likely in a collective): the job ends with exit code 143 (128 + SIGTERM)"
            ) in log
        assert said, log[-3000:]
        assert "failed: KeyboardInterrupt" not in log and "SIGTERMException" not in log
        assert "Traceback" not in log, log[-3000:]  # one line per rank says it all
        if script == "fabric_llama.py":  # the script's own cleanup ran before the excepthook ended the process
            assert "rank 0 finally block ran" in log and "rank 0 atexit handler ran" in log, log[-3000:]
        assert _wait_for(lambda: not _processes_left(launcher.pid), 10), "a rank outlived the job"
    finally:
        if _processes_left(launcher.pid):
            os.killpg(launcher.pid, signal.SIGKILL)
