"""An error that every rank raises alike shows one traceback; any other error keeps one per rank; all of them short.

By default a failure is a few lines (a traceback keeps the user's frame and the raising one); with
``LIGHTNING_CP_FULL_TRACEBACKS=1`` the tracebacks are whole.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import sys

import pytest
import torch
import torch.distributed as dist
from common import run_script
from distributed_harness import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh

from lightning_cp.rank_errors import FULL_TRACEBACKS_ENV, SameErrorHook, install_same_error_hook
from lightning_cp.validation import ContextParallelBatchError

EMPTY = "Cannot shard an empty sequence (length 0)"
#: The longest log of a failed two-rank Trainer run (11 of them Lightning's start-up lines).
MAX_FAILURE_LINES = 20


def _raised(error: BaseException) -> tuple:
    """``error`` as ``sys.excepthook`` receives it: type, exception and a real traceback."""
    try:
        raise error
    except BaseException as caught:
        return type(caught), caught, caught.__traceback__


def _refused_run(tmp_path) -> str:
    # what a user's launch prints: the whole log of a fresh launch
    args = ("--out", str(tmp_path / "r.pt"), "--seq-len", "0", "--steps", "1", "--timeout", "60")
    result = run_script("trainer_llama.py", *args, fresh=True)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    return log


@pytest.mark.slow  # a fresh launch
def test_a_batch_error_of_every_rank_shows_one_short_traceback_in_a_trainer_run(tmp_path, monkeypatch):
    monkeypatch.delenv(FULL_TRACEBACKS_ENV, raising=False)
    log = _refused_run(tmp_path)
    assert len(log.splitlines()) <= MAX_FAILURE_LINES, log
    for rank in (0, 1):  # the cause first: which rank, what error, what to do
        failed = f"lightning_cp: rank {rank} (data-parallel rank 0, context-parallel rank {rank}) failed: "
        assert f"{failed}ContextParallelBatchError: {EMPTY}" in log, log
    assert log.count("Traceback (most recent call last)") == 1, log
    # the traceback: the script's line that led to the error, not Lightning's or lightning_cp's frames
    assert re.search(r'\[rank0\]:   File ".*trainer_llama.py", line \d+, in main', log), log
    assert "site-packages" not in log and "lightning_cp/session.py" not in log, log
    assert f"[rank0]: lightning_cp.validation.ContextParallelBatchError: {EMPTY}" in log
    assert f"lightning_cp: rank 1: same error as rank 0 (ContextParallelBatchError: {EMPTY}.)" in log
    hidden = r"lightning_cp: rank 0: \d+ more frames \(Lightning's, torch's, outer calls\) not shown; "
    assert re.search(hidden + FULL_TRACEBACKS_ENV + "=1 shows full tracebacks", log), log


@pytest.mark.slow  # a fresh launch
def test_the_environment_variable_brings_the_full_traceback_back(tmp_path, monkeypatch):
    monkeypatch.setenv(FULL_TRACEBACKS_ENV, "1")
    log = _refused_run(tmp_path)
    assert log.count("Traceback (most recent call last)") == 1, log  # still once per CP group
    assert "lightning/pytorch/trainer/trainer.py" in log and "lightning_cp/session.py" in log, log
    assert len(log.splitlines()) > 2 * MAX_FAILURE_LINES, log
    assert "not shown" not in log
    assert f"[rank0]: lightning_cp.validation.ContextParallelBatchError: {EMPTY}" in log


def test_other_errors_keep_a_short_traceback_on_every_rank(capsys, monkeypatch):
    monkeypatch.delenv(FULL_TRACEBACKS_ENV, raising=False)
    SameErrorHook(rank=1, first_rank=0, previous=sys.__excepthook__)(*_raised(RuntimeError("injected failure")))
    error = capsys.readouterr().err
    assert "Traceback (most recent call last)" in error
    assert "RuntimeError: injected failure" in error and "raise error" in error
    assert "same error as rank" not in error


def _parse_json(text: str) -> object:
    return json.loads(text)


def test_a_short_traceback_keeps_the_innermost_user_frame_and_the_raising_frame(capsys, monkeypatch):
    monkeypatch.delenv(FULL_TRACEBACKS_ENV, raising=False)
    raised = _raised_by(lambda: _parse_json("{"))
    hook = SameErrorHook(rank=0, first_rank=0, previous=sys.__excepthook__)
    hook(*raised)
    short = capsys.readouterr().err.splitlines()
    assert short[0] == "Traceback (most recent call last):"
    files = [line for line in short if line.startswith("  File ")]
    # the user's innermost frame (_parse_json, not the lambda or this test) and json's raising frame
    assert len(files) == 2 and "in _parse_json" in files[0] and "json" in files[1] and "in raw_decode" in files[1]
    assert short[-1].startswith("lightning_cp: rank 0: ") and "more frames" in short[-1]
    assert raised[1].__traceback__ is raised[2]  # the exception is left as it was
    monkeypatch.setenv(FULL_TRACEBACKS_ENV, "1")
    hook(*raised)
    full = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  File ")]
    assert len(full) > len(files) and "not shown" not in "".join(full)


def test_a_rank_that_lost_a_peer_shows_its_error_without_a_traceback(capsys, monkeypatch):
    monkeypatch.delenv(FULL_TRACEBACKS_ENV, raising=False)
    lost = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:742.")
    SameErrorHook(rank=0, first_rank=0, previous=sys.__excepthook__)(*_raised(lost))
    assert capsys.readouterr().err == f"RuntimeError: {lost}\n"


LOST = "[pair.cc:553] Connection closed by peer [127.0.0.1]:742."


def _failure_lines(rank: int, world_size: int) -> dict:
    """The line each kind of failure gets, with and without a signal heard by this rank's watchdog."""
    from lightning_cp.mesh import ParallelLayout, build_device_mesh
    from lightning_cp.session import ContextParallelSession

    mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cpu"))
    session = ContextParallelSession(mesh, data_context)
    lines = {}
    for heard in (None, signal.SIGTERM, signal.SIGINT):
        session.received_signal = lambda heard=heard: heard
        for kind, error in (("lost", RuntimeError(LOST)), ("own", ValueError("bad value"))):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                session.report_failure(error)
            lines[f"{kind}, heard {heard and signal.Signals(heard).name}"] = err.getvalue()
    return lines


def test_a_rank_that_lost_its_peers_after_a_signal_says_it_was_the_signal():
    """Blocked in a collective when SIGTERM / Ctrl-C came, a rank loses the peers that stopped at it: the signal
    (heard by its watchdog) is what ended it, so it says so and not "lost a peer"; its own errors stay its own."""
    place = "lightning_cp: rank 1 (data-parallel rank 0, context-parallel rank 1)"
    lines = run_on_ranks(_failure_lines)[1]
    assert lines == {
        "lost, heard None": f"{place} lost a peer in a collective: another rank failed or died"
        " (its error, if it wrote one, is in the log)\n",
        "own, heard None": f"{place} failed: ValueError: bad value\n",
        "lost, heard SIGTERM": f"{place} received SIGTERM: training stops, and the job ends with exit code 143"
        " (128 + SIGTERM)\n",
        "own, heard SIGTERM": f"{place} failed: ValueError: bad value\n",
        "lost, heard SIGINT": f"{place} was interrupted (Ctrl-C, SIGINT): the job ends with exit code 130"
        " (128 + SIGINT)\n",
        "own, heard SIGINT": f"{place} failed: ValueError: bad value\n",
    }


def _raised_by(call) -> tuple:
    try:
        call()
    except BaseException as caught:
        return type(caught), caught, caught.__traceback__
    raise AssertionError("did not raise")


def test_the_first_rank_of_the_cp_group_shows_the_traceback_the_others_one_line(capsys):
    raised = _raised(ContextParallelBatchError(f"{EMPTY}.\nsecond line"))
    SameErrorHook(rank=2, first_rank=2, previous=sys.__excepthook__)(*raised)
    first = capsys.readouterr().err
    assert "Traceback (most recent call last)" in first and "second line" in first
    SameErrorHook(rank=3, first_rank=2, previous=sys.__excepthook__)(*raised)
    other = capsys.readouterr().err
    assert other == f"lightning_cp: rank 3: same error as rank 2 (ContextParallelBatchError: {EMPTY}.)\n"


def test_installing_again_replaces_the_hook_instead_of_stacking_it(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch_hook = sys.excepthook  # init_process_group installs one that prefixes "[rank0]: "
        cp_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("context_parallel",))
        install_same_error_hook(cp_mesh)
        install_same_error_hook(cp_mesh)
    finally:
        dist.destroy_process_group()
    assert sys.excepthook == SameErrorHook(rank=0, first_rank=0, previous=torch_hook)
