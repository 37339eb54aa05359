"""Batch checks, padding and shard layouts: pure index maths, one process, no collectives."""

from __future__ import annotations

import pytest
import torch

from lightning_cp import ContextParallelBatchError, make_cp_batch_and_ctx
from lightning_cp.sharding.batch import pad_sequence_field, shard_cp_batch, validate_cp_batch
from lightning_cp.sharding.sequence import restore_order, shard_positions, shard_sequence


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("load_balance", [True, False])
def test_every_position_is_held_by_exactly_one_rank(cp_size, load_balance):
    seq_len = 8 * cp_size
    held = torch.cat([shard_positions(seq_len, cp_size, rank, load_balance) for rank in range(cp_size)])
    assert sorted(held.tolist()) == list(range(seq_len))


def test_head_tail_layout_for_cp2():
    # 8 positions in 4 chunks of 2: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2.
    assert shard_positions(8, 2, 0, True).tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 2, 1, True).tolist() == [2, 3, 4, 5]
    assert shard_positions(8, 2, 1, False).tolist() == [4, 5, 6, 7]


def test_head_tail_layout_balances_causal_work():
    seq_len, cp_size = 64, 4
    # causal work of a query at position p is p + 1 keys
    work = [int((shard_positions(seq_len, cp_size, r, True) + 1).sum()) for r in range(cp_size)]
    assert len(set(work)) == 1


@pytest.mark.parametrize("load_balance", [True, False])
def test_shards_concatenated_by_rank_restore_to_the_sequence(load_balance):
    x = torch.arange(2 * 3 * 16).view(2, 3, 16)
    shards = [shard_sequence(x, 2, 4, rank, load_balance) for rank in range(4)]
    assert torch.equal(restore_order(torch.cat(shards, dim=2), 2, 4, load_balance), x)


def test_each_field_is_padded_with_its_own_meaning():
    ids = torch.tensor([[5, 6, 7]])
    assert pad_sequence_field("input_ids", ids, 2, padding_token_id=9).tolist() == [[5, 6, 7, 9, 9]]
    assert pad_sequence_field("labels", ids, 1).tolist() == [[5, 6, 7, -100]]
    assert pad_sequence_field("shift_labels", ids, 1).tolist() == [[5, 6, 7, -100]]
    assert pad_sequence_field("loss_mask", torch.ones(1, 3), 1).tolist() == [[1, 1, 1, 0]]
    assert pad_sequence_field("padding_mask", torch.zeros(1, 3, dtype=torch.bool), 1).tolist() == [
        [False, False, False, True]
    ]
    assert pad_sequence_field("position_ids", torch.tensor([[0, 1, 2]]), 2).tolist() == [[0, 1, 2, 3, 4]]
    mrope = torch.arange(3).view(1, 1, 3).expand(3, 2, 3)
    assert pad_sequence_field("position_ids", mrope, 1)[:, :, -1].tolist() == [[3, 3]] * 3
    embeds = pad_sequence_field("inputs_embeds", torch.ones(1, 3, 4), 1)
    assert embeds.shape == (1, 4, 4) and embeds[0, -1].abs().sum() == 0


def test_shard_cp_batch_pads_makes_positions_and_shards_every_field():
    ids = torch.arange(2 * 10).view(2, 10)
    batch = {
        "input_ids": ids,
        "labels": ids + 100,
        "loss_mask": torch.ones(2, 10),
        "padding_mask": torch.zeros(2, 10, dtype=torch.bool),
        "pixel_values": torch.ones(2, 3),
        "attention_mask": torch.ones(2, 10),
    }
    local, padded_len = shard_cp_batch(batch, cp_size=2, cp_rank=0, load_balance=True)
    assert padded_len == 12 and "attention_mask" not in local
    assert local["pixel_values"] is batch["pixel_values"]
    assert local["position_ids"].tolist() == [[0, 1, 2, 9, 10, 11]] * 2
    assert local["input_ids"][0].tolist() == [0, 1, 2, 9, 0, 0]
    assert local["labels"][0].tolist() == [100, 101, 102, 109, -100, -100]
    assert local["loss_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert local["padding_mask"][0].tolist() == [False] * 4 + [True] * 2
    assert batch["input_ids"].shape == (2, 10), "the caller's batch is not modified"


def test_mrope_position_ids_are_sharded_on_their_sequence_dim():
    positions = torch.arange(8).view(1, 1, 8).expand(3, 2, 8)
    local, _ = shard_cp_batch({"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8)}, 2, 1)
    mrope_local, _ = shard_cp_batch(
        {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8), "position_ids": positions},
        2,
        1,
    )
    assert mrope_local["position_ids"].shape == (3, 2, 4)
    assert mrope_local["position_ids"][2, 1].tolist() == local["position_ids"][0].tolist() == [2, 3, 4, 5]


def test_inputs_embeds_are_sharded_out_of_place_and_keep_their_gradient():
    embeds = torch.randn(2, 8, 4, requires_grad=True)
    local, _ = shard_cp_batch({"inputs_embeds": embeds, "labels": torch.zeros(2, 8)}, 2, 0)
    local["inputs_embeds"].sum().backward()
    assert embeds.grad[:, [0, 1, 6, 7]].eq(1).all() and embeds.grad[:, 2:6].eq(0).all()


def test_no_mesh_or_no_cp_dimension_is_a_no_op():
    batch = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "labels": torch.zeros(1, 5)}
    train_ctx, same = make_cp_batch_and_ctx(None, batch)
    assert same is batch
    with train_ctx():
        pass


@pytest.mark.parametrize(
    "batch,message",
    [
        ({"labels": torch.zeros(1, 4)}, "exactly one of `input_ids` and `inputs_embeds`"),
        (
            {"input_ids": torch.zeros(1, 4), "inputs_embeds": torch.zeros(1, 4, 2), "labels": torch.zeros(1, 4)},
            "exactly one of",
        ),
        ({"input_ids": torch.zeros(1, 4)}, "needs `labels`"),
        ({"input_ids": torch.zeros(1, 4), "labels": torch.zeros(1, 5)}, "disagree on the sequence length"),
        ({"input_ids": torch.zeros(2, 4), "labels": torch.zeros(3, 4)}, "disagree on the batch size"),
        ({"input_ids": torch.zeros(1, 0), "labels": torch.zeros(1, 0)}, "empty sequence"),
        (
            {"input_ids": torch.zeros(1, 4), "labels": torch.zeros(1, 4), "attention_mask": torch.ones(1, 1, 4, 4)},
            "explicit 4-D `attention_mask`",
        ),
        (
            {
                "input_ids": torch.zeros(1, 4),
                "labels": torch.zeros(1, 4),
                "attention_mask": torch.tensor([[0, 1, 1, 1]]),
            },
            "left padding or holes",
        ),
        (
            {
                "input_ids": torch.zeros(1, 4),
                "labels": torch.zeros(1, 4),
                "attention_mask": torch.tensor([[1, 0, 1, 1]]),
            },
            "left padding or holes",
        ),
        (
            {
                "input_ids": torch.zeros(1, 4),
                "labels": torch.zeros(1, 4),
                "attention_mask": torch.tensor([[1, 1, 0, 0]]),
            },
            "at padded positions",
        ),
        (
            {
                "input_ids": torch.zeros(1, 4),
                "labels": torch.tensor([[1, 1, -100, -100]]),
                "loss_mask": torch.ones(1, 4),
                "attention_mask": torch.tensor([[1, 1, 0, 0]]),
            },
            "`loss_mask` must be 0 at padded positions",
        ),
        (
            {"input_ids": torch.zeros(1, 4), "labels": torch.zeros(1, 4), "attention_mask": torch.ones(1, 5)},
            "`attention_mask` has shape",
        ),
    ],
)
def test_bad_batches_are_refused_with_a_clear_error(batch, message):
    with pytest.raises(ContextParallelBatchError, match=message):
        validate_cp_batch(batch, require_labels=True)


def test_right_padding_with_ignored_labels_is_accepted():
    batch = {
        "input_ids": torch.zeros(1, 4),
        "labels": torch.tensor([[3, 4, -100, -100]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0]]),
    }
    assert validate_cp_batch(batch, require_labels=True) == 4


def test_a_length_that_does_not_fit_the_layout_is_refused():
    with pytest.raises(ValueError, match="Sequence length 6 is not a multiple of 4"):
        shard_positions(6, 2, 0, load_balance=True)
