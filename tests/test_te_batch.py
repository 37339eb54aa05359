"""THD batches for Transformer Engine: hand-worked partitions for cp=2 and cp=4, chunks, padding, errors."""

from __future__ import annotations

import pytest
import torch
from models import DEVICES

from lightning_cp import ContextParallelBatchError
from lightning_cp.sharding.packing import plan_packed_layout
from lightning_cp.sharding.te_batch import padded_packed_batch, thd_batch_for_rank

SENTINEL = -1000


def _two_rows() -> dict:
    """Row 0 packs two sequences of 3 (each padded to 4); row 1 one of 6 (padded to 8)."""
    return {
        "input_ids": torch.tensor([[11, 12, 13, 0, 21, 22, 23, 0], [31, 32, 33, 34, 35, 36, 0, 0]]),
        "labels": torch.tensor([[12, 13, -100, -100, 22, 23, -100, -100], [32, 33, 34, 35, 36, -100, -100, -100]]),
        "seq_lens": torch.tensor([[3, 3], [6, SENTINEL]]),
        "seq_lens_padded": torch.tensor([[4, 4], [8, SENTINEL]]),
    }


def test_cp2_partition_by_hand_with_padding_and_sentinels():
    # flattened: sequences [0, 4), [4, 8), [8, 16); 4 chunks each; rank 0 keeps chunks 0 and 3.
    rank0 = thd_batch_for_rank(_two_rows(), cp_size=2, cp_rank=0)
    rank1 = thd_batch_for_rank(_two_rows(), cp_size=2, cp_rank=1)
    assert rank0["input_ids"].tolist() == [11, 0, 21, 0, 31, 32, 0, 0]
    assert rank1["input_ids"].tolist() == [12, 13, 22, 23, 33, 34, 35, 36]
    assert rank0["labels"].tolist() == [12, -100, 22, -100, 32, 33, -100, -100]
    assert rank0["padding_mask"].tolist() == [False, True, False, True, False, False, True, True]
    assert rank0["position_ids"].tolist() == [0, 3, 0, 3, 0, 1, 6, 7]
    assert rank1["position_ids"].tolist() == [1, 2, 1, 2, 2, 3, 4, 5]
    for out in (rank0, rank1):
        # NeMo's meaning under CP: `cu_seqlens` delimits the padded sequences, the layout the tokens have
        assert out["cu_seqlens"].tolist() == out["cu_seqlens_padded"].tolist() == [0, 4, 8, 16]
        assert out["cu_seqlens"].dtype == out["cu_seqlens_padded"].dtype == torch.int32
        assert int(out["max_seqlen"]) == 8 and out["max_seqlen"].dtype == torch.int32
        assert out["qkv_format"] == "thd" and out["cp_size"] == 2
    assert (rank0["cp_rank"], rank1["cp_rank"]) == (0, 1)


def test_cp4_partition_by_hand():
    batch = {
        "input_ids": torch.arange(100, 116).view(1, 16),
        "labels": torch.arange(16).view(1, 16),
        "seq_lens": torch.tensor([[16]]),
        "seq_lens_padded": torch.tensor([[16]]),
    }
    # 8 chunks of 2 tokens; rank r keeps chunks r and 7 - r
    expected = {0: [0, 1, 14, 15], 1: [2, 3, 12, 13], 2: [4, 5, 10, 11], 3: [6, 7, 8, 9]}
    for rank, indices in expected.items():
        out = thd_batch_for_rank(batch, cp_size=4, cp_rank=rank)
        assert out["labels"].tolist() == indices
        assert out["position_ids"].tolist() == indices


def test_num_chunks_splits_rows_and_pads_cumulative_lengths_with_the_sentinel():
    out = thd_batch_for_rank(_two_rows(), cp_size=2, cp_rank=1, num_chunks=2)
    assert out["input_ids"].tolist() == [[12, 13, 22, 23], [33, 34, 35, 36]]
    assert out["cu_seqlens"].tolist() == out["cu_seqlens_padded"].tolist() == [[0, 4, 8], [0, 8, SENTINEL]]
    assert out["max_seqlen"].tolist() == [4, 8]


def test_without_cp_the_batch_is_flattened_not_partitioned():
    out = thd_batch_for_rank(_two_rows(), cp_size=1, cp_rank=0)
    assert out["input_ids"].tolist() == _two_rows()["input_ids"].flatten().tolist()
    assert out["cu_seqlens"].tolist() == [0, 3, 6, 12]  # without CP: the real lengths, as NeMo gives them
    assert out["cu_seqlens_padded"].tolist() == [0, 4, 8, 16]


@pytest.mark.parametrize("device", DEVICES)
def test_every_tensor_made_stays_on_the_batch_device(device):
    # No `position_ids` in the batch: they are made from the padded lengths, on the batch's device.
    batch = {key: value.to(device) for key, value in _two_rows().items()}
    out = thd_batch_for_rank(batch, cp_size=2, cp_rank=0)
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            assert value.device.type == device, key
    assert out["position_ids"].tolist() == [0, 3, 0, 3, 0, 1, 6, 7]


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({"seq_lens_padded": torch.tensor([[3, 5], [8, SENTINEL]])}, ValueError, "multiple of 2 \\* cp = 4"),
        ({"seq_lens_padded": torch.tensor([[4, 4], [12, SENTINEL]])}, ContextParallelBatchError, "add up to 20"),
        ({"seq_lens": torch.tensor([[5, 3], [6, SENTINEL]])}, ContextParallelBatchError, "must pair up"),
        ({"seq_lens": None}, KeyError, "needs `seq_lens`"),
    ],
)
def test_inconsistent_thd_batches_are_refused(change, error, message):
    batch = {**_two_rows(), **change}
    with pytest.raises(error, match=message):
        thd_batch_for_rank(batch, cp_size=2, cp_rank=0)


def test_qkv_format_and_num_chunks_are_checked():
    with pytest.raises(ValueError, match="Currently only 'thd' format is supported"):
        thd_batch_for_rank(_two_rows(), 2, 0, qkv_format="bshd")
    with pytest.raises(ValueError, match="positive divisor of the batch size"):
        thd_batch_for_rank(_two_rows(), 2, 0, num_chunks=3)


def test_position_id_packing_becomes_te_input_with_every_document_padded():
    # documents of 3 and 5 tokens (position_ids restart); cp=2 pads them to 4 and 8
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]),
        "labels": torch.tensor([[2, 3, -100, 5, 6, 7, 8, -100]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]),
    }
    layout = plan_packed_layout([[3, 5]], cp_size=2, load_balance=True)
    padded = padded_packed_batch(batch, layout)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 0, 0]]
    assert padded["labels"].tolist() == [[2, 3, -100, -100, 5, 6, 7, 8, -100, -100, -100, -100]]
    assert padded["seq_lens"].tolist() == [[3, 5]] and padded["seq_lens_padded"].tolist() == [[4, 8]]
    rank1 = thd_batch_for_rank(padded, cp_size=2, cp_rank=1)
    assert rank1["input_ids"].tolist() == [2, 3, 6, 7, 8, 0]
