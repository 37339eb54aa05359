"""An error that every rank raises alike shows one traceback; any other error keeps one per rank."""

from __future__ import annotations

import sys

import torch.distributed as dist
from common import run_script
from torch.distributed.device_mesh import init_device_mesh

from lightning_cp.rank_errors import SameErrorHook, install_same_error_hook
from lightning_cp.validation import ContextParallelBatchError

EMPTY = "Cannot shard an empty sequence (length 0)"


def _raised(error: BaseException) -> tuple:
    """``error`` as ``sys.excepthook`` receives it: type, exception and a real traceback."""
    try:
        raise error
    except BaseException as caught:
        return type(caught), caught, caught.__traceback__


def test_a_batch_error_of_every_rank_shows_one_traceback_in_a_trainer_run(tmp_path):
    result = run_script(
        "trainer_llama.py", "--out", str(tmp_path / "r.pt"), "--seq-len", "0", "--steps", "1", "--timeout", "60"
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    assert log.count("Traceback (most recent call last)") == 1, log
    assert f"[rank0]: lightning_cp.validation.ContextParallelBatchError: {EMPTY}" in log
    assert f"lightning_cp: rank 1: same error as rank 0 (ContextParallelBatchError: {EMPTY}.)" in log


def test_other_errors_keep_their_full_traceback_on_every_rank(capsys):
    SameErrorHook(rank=1, first_rank=0, previous=sys.__excepthook__)(*_raised(RuntimeError("injected failure")))
    error = capsys.readouterr().err
    assert "Traceback (most recent call last)" in error
    assert "RuntimeError: injected failure" in error
    assert "same error as rank" not in error


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
