"""A rank that raises or dies ends the whole CP job quickly, and the log says which rank it was."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from common import run_script  # noqa: E402

BOUND_S = 120  # the collective timeout is 60 s; peers notice a dead rank much sooner


def _fail(tmp_path: Path, *args: str) -> tuple[str, int, float]:
    started = time.monotonic()
    result = run_script("trainer_llama.py", "--out", str(tmp_path / "r.pt"), "--timeout", "60", *args, timeout=BOUND_S)
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
