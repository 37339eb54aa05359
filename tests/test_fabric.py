"""End-to-end Fabric runs with a user-written loop (2 CPU processes, gloo) against one-process training."""

from __future__ import annotations

import pytest
import torch
from common import reference_sgd_run, run_script


@pytest.mark.parametrize(
    "layout,loss",
    [
        pytest.param("replicate", "hf", marks=pytest.mark.slow),  # a fresh launch
        ("fsdp", "hf"),
        ("replicate", "custom"),
        ("replicate", "chunked"),
        ("replicate", "custom-chunked"),
    ],
)
def test_fabric_cp2_loop_equals_one_process_training(tmp_path, layout, loss, assert_same_training):
    out = tmp_path / "result.pt"
    memory_options = ["--chunked-loss", "16", "--activation-checkpointing"]
    extra = {
        "hf": [],
        "custom": ["--custom-loss"],
        "chunked": memory_options,
        "custom-chunked": ["--custom-loss", *memory_options],
    }[loss]
    # one of them launched as a user launches it (the others take the live ranks of tests/rank_pool.py)
    fresh = (layout, loss) == ("replicate", "hf")
    result = run_script("fabric_llama.py", "--out", str(out), "--layout", layout, "--lr", "1.0", *extra, fresh=fresh)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    run = torch.load(out, weights_only=False)
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=1.0, shuffled=False))


@pytest.mark.slow
def test_fabric_tp2_by_cp2_loop_equals_one_process_training(tmp_path, assert_same_training):
    """4 processes: the Llama TP plan applied in ``parallelize_fn``, the ring over context_parallel."""
    out = tmp_path / "result.pt"
    result = run_script("fabric_llama.py", "--out", str(out), "--tp", "2", "--lr", "1.0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    run = torch.load(out, weights_only=False)
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=1.0, shuffled=False))
