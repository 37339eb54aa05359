"""``cp_mode`` through Lightning: real multi-process Trainer and Fabric runs against one-process training.

tests/test_ulysses.py proves every mechanism exact on the session; here the strategies pick or are told the
mechanism, print it, and train the zoo's attention variants (eager attention with logit softcapping, sliding
windows, attention sinks, MoE, packed documents) to the weights of plain SGD on one process.
"""

from __future__ import annotations

import re

import pytest
import torch
from common import reference_sgd_run, run_script
from test_trainer import LR, _failing_run, _train


def _fabric_train(tmp_path, *args: str) -> dict:
    """Run the Fabric script on 2 processes with ``args``; its results and its log."""
    out = tmp_path / "result.pt"
    result = run_script("fabric_llama.py", "--out", str(out), "--lr", str(LR), *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out, weights_only=False) | {"log": result.stdout + result.stderr}


#: What the start-up line says when "auto" picks Ulysses over the 2 CP ranks.
ULYSSES_OVER_2 = "attention by Ulysses over 2 ranks: auto: the heads split over the CP ranks"


@pytest.mark.parametrize(
    "model_name,init_std",
    [
        # eager attention, logit softcapping at 50, a 16-token window on layer 0 (130 tokens). At the zoo's
        # initializer_range (0.02) the attention scores are so small that softcapping them changes the final
        # weights by < 1e-4 (within tolerance); at 0.2 it changes them by ~2%, so the parity covers it.
        ("gemma2", 0.2),
        ("gpt_oss", None),  # attention sinks, sliding and full layers, 4 experts (top-2), eager
    ],
)
def test_trainer_auto_runs_ulysses_and_trains_like_one_process(tmp_path, model_name, init_std, assert_same_training):
    """cp=2, ``cp_mode="auto"``: eager attention with softcapping or sinks is trained exactly by Ulysses, as logged."""
    overrides = {} if init_std is None else {"initializer_range": init_std}
    run = _train(tmp_path, "--model", model_name, *([] if init_std is None else ["--init-std", str(init_std)]))
    assert ULYSSES_OVER_2 in run["log"]
    reference = reference_sgd_run(steps=5, accumulate=1, lr=LR, model_name=model_name, model_overrides=overrides)
    assert_same_training(run, reference, model_name, **overrides)


@pytest.mark.parametrize(
    "model_name,packed",
    [
        # packed documents under sliding and full layers: each document its own window (Mistral's window
        # alone runs on the session in tests/test_ulysses.py, the Trainer's path too)
        ("gemma3", True),
    ],
    ids=["gemma3-packed"],
)
def test_fabric_auto_runs_ulysses_and_trains_like_one_process(tmp_path, model_name, packed, assert_same_training):
    """cp=2 in a Fabric loop, ``cp_mode="auto"``: Ulysses, exact against one process (packed: HF's document mask)."""
    run = _fabric_train(tmp_path, "--model", model_name, *(["--packed"] if packed else []))
    assert ULYSSES_OVER_2 in run["log"]
    reference = reference_sgd_run(steps=5, accumulate=1, lr=LR, shuffled=False, model_name=model_name, packed=packed)
    assert_same_training(run, reference, model_name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode_args,mechanism",
    [
        (["--cp-mode", "hybrid", "--ulysses-size", "2"], "attention by hybrid (Ulysses 2 × ring 2): cp_mode='hybrid'"),
        (["--cp-mode", "ring"], "attention by ring over 4 ranks: cp_mode='ring'"),
    ],
    ids=["hybrid-2x2", "ring-4"],
)
def test_trainer_cp4_explicit_mode_trains_like_one_process(tmp_path, mode_args, mechanism, assert_same_training):
    """4 processes, cp=4 on the tiny Llama (4 query heads): the hybrid and the ring, as asked for, exact."""
    run = _train(tmp_path, "--devices", "4", "--cp", "4", *mode_args)
    assert mechanism in run["log"]
    assert "sequence 130 tokens (padded to 136) -> 34 per rank" in run["log"]
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR))


def test_trainer_ring_trains_eager_softcapped_windowed_attention_like_one_process(tmp_path, assert_same_training):
    """gemma2 (eager, softcapped, a 16-token window on layer 0) with ``cp_mode="ring"``: the masked ring (Note
    [windowed ring]) trains it exactly through the Trainer."""
    run = _train(tmp_path, "--model", "gemma2", "--init-std", "0.2", "--cp-mode", "ring")
    assert "attention by ring over 2 ranks: cp_mode='ring'" in run["log"]
    reference = reference_sgd_run(
        steps=5, accumulate=1, lr=LR, model_name="gemma2", model_overrides={"initializer_range": 0.2}
    )
    assert_same_training(run, reference, "gemma2", initializer_range=0.2)


@pytest.mark.slow  # a fresh launch
def test_trainer_ring_on_attention_cp_cannot_run_is_refused_on_every_rank(tmp_path):
    """Bloom's hand-written ALiBi attention on packed documents with ``cp_mode="ring"``: refused at the first step
    on every rank (without CP it attends across the packed row, which no per-document mechanism reproduces),
    saying what to do instead."""
    args = ("--model", "bloom", "--packed", "--cp-mode", "ring", "--timeout", "60")
    log = _failing_run(tmp_path, *args, fresh=True)  # the log of a user's launch
    refusal = "ContextParallelInputError: `BloomAttention` (hand-written ALiBi attention) got packed documents under"
    for rank in (0, 1):  # each rank refuses, before any collective, and says what to do
        failed = rf"lightning_cp: rank {rank} \(data-parallel rank 0, context-parallel rank {rank}\) failed: "
        assert re.search(failed + re.escape(refusal) + r".* Train it on unpacked rows", log), log[-6000:]
    # rank 0 shows the traceback, rank 1 one line, the whole failure in a few lines (lightning_cp.rank_errors);
    # refused at the first step, after the step's start-up line (a refusal at setup takes 20)
    assert log.count("Traceback (most recent call last)") == 1, log[-6000:]
    assert len(log.splitlines()) <= 21, log
    assert "pop from empty list" not in log  # the compile-safe SDPA hook's restore after a refusing pre-hook
    assert f"[rank0]: lightning_cp.validation.{refusal}" in log, log[-6000:]
    assert f"lightning_cp: rank 1: same error as rank 0 ({refusal}" in log, log[-6000:]


@pytest.mark.parametrize(
    ("layout", "mixer_mode", "mechanism"),
    [
        ("replicate", "auto", "state_passing"),
        ("fsdp", "auto", "state_passing"),
        ("replicate", "all_to_all", "all_to_all"),
    ],
)
def test_trainer_trains_a_gated_delta_net_hybrid_like_one_process(
    tmp_path, layout, mixer_mode, mechanism, assert_same_training
):
    """Qwen3-Next (a gated delta net layer, then attention) at cp=2 through the Trainer, replicated or sharded by
    FSDP2, by state passing (what "auto" picks) or the all-to-all: the start-up line names the mixer's mechanism,
    and 5 SGD steps give the weights of one process (every parameter compared)."""
    run = _train(tmp_path, "--model", "qwen3_next", "--layout", layout, "--mixer-mode", mixer_mode)
    assert f"sequence mixers over 2 ranks: 1 gated delta net by {mechanism}" in run["log"]
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR, model_name="qwen3_next"), "qwen3_next")


def test_fabric_trains_a_mamba2_hybrid_like_one_process(tmp_path, assert_same_training):
    """Bamba (a Mamba-2 layer of one group, then attention) at cp=2 in a Fabric loop, packed documents, by state
    passing (what "auto" picks): exact."""
    run = _fabric_train(tmp_path, "--model", "bamba", "--packed")
    assert "sequence mixers over 2 ranks: 1 Mamba-2 scan by state_passing (auto: " in run["log"]
    reference = reference_sgd_run(steps=5, accumulate=1, lr=LR, shuffled=False, model_name="bamba", packed=True)
    assert_same_training(run, reference, "bamba")
