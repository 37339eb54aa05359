"""The input rules of lightning_cp.validation, one test each (single process: they run before any collective).

The rules enforced elsewhere have their tests beside their code's: batches in test_batch_sharding.py,
ring inputs and model hooks on real ranks in test_cp_errors.py, packed documents in
test_packed_training.py and test_te_batch.py, layouts in test_layout.py, mismatched batches across a CP
group in test_trainer.py.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_causal_lm

from lightning_cp.sharding.batch import shard_cp_batch
from lightning_cp.sharding.packing import plan_packed_layout
from lightning_cp.validation import (
    ContextParallelBatchError,
    check_qkv,
    check_ring_supported,
    check_tensor_parallel_heads,
)


def _batch(batch_size: int, seq_len: int) -> dict:
    ids = torch.ones(batch_size, seq_len, dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize(
    "seq_len,cp_size,load_balance,padded_len",
    [(1, 2, True, 4), (3, 2, True, 4), (7, 4, True, 8), (1, 2, False, 4), (5, 8, False, 16), (4, 2, True, 4)],
)
def test_short_sequences_are_padded_to_at_least_two_positions_per_rank(seq_len, cp_size, load_balance, padded_len):
    # not refused: they run exactly (tests/test_nemo_dropin.py). Never one position per rank: Hugging Face's SDPA
    # attention drops causal masking for a single query (MIN_SHARD_TOKENS in lightning_cp.sharding.batch).
    for rank in range(cp_size):
        local, padded = shard_cp_batch(_batch(2, seq_len), cp_size, rank, load_balance=load_balance)
        assert padded == padded_len and local["input_ids"].shape == (2, padded_len // cp_size)


def test_packed_row_shorter_than_the_chunks_is_padded_per_document():
    assert plan_packed_layout([[1, 2]], cp_size=2, load_balance=True).padded_len == 8
    assert plan_packed_layout([[1, 2]], cp_size=2, load_balance=False).padded_len == 4


def test_empty_batch_is_refused():
    with pytest.raises(ContextParallelBatchError, match="empty batch"):
        shard_cp_batch(_batch(0, 8), 2, 0)


def test_query_key_value_of_different_dtypes_are_refused():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="one dtype; got torch.float32, torch.bfloat16 and torch.float32"):
        check_qkv(q, q.bfloat16(), q)
    check_qkv(q, q, q)


def test_tensor_parallel_size_that_does_not_divide_the_heads_is_refused():
    model = tiny_causal_lm("llama")  # 4 attention heads, 2 key/value heads
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide the model's num_key_value_heads"):
        check_tensor_parallel_heads(model, 4)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's num_attention_heads"):
        check_tensor_parallel_heads(model, 3)
    check_tensor_parallel_heads(model, 2)


@pytest.mark.parametrize(
    "mask,dropout,causal,load_balance,message",
    [
        (torch.ones(1, 1), 0.0, True, True, "explicit `attn_mask`"),
        (None, 0.1, True, True, "dropout"),
        (None, 0.0, False, True, "needs causal attention"),
    ],
)
def test_what_the_ring_cannot_compute_is_refused(mask, dropout, causal, load_balance, message):
    with pytest.raises(ValueError, match=message):
        check_ring_supported(mask, dropout, causal, load_balance)
