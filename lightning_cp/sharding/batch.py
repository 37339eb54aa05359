"""Checking, padding and sharding a training batch for context parallelism.

Every check here runs on local data before any collective, so bad input fails on each rank with the
same clear message instead of hanging a ring. Each sequence field is padded with a value that keeps
its meaning (ignored labels, masked-out loss, padding flagged as padding) and then cut into this
rank's shard with the layout the ring attention expects.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_cp.sharding.sequence import ring_pad_multiple, shard_sequence
from lightning_cp.validation import ContextParallelBatchError

__all__ = ["ContextParallelBatchError"]

#: Label value that losses skip (Hugging Face and torch's cross-entropy default).
IGNORE_INDEX = -100
#: Keys of a batch that are laid out along the sequence and so are padded and sharded.
SEQUENCE_KEYS: tuple[str, ...] = (
    "input_ids",
    "inputs_embeds",
    "labels",
    "shift_labels",
    "position_ids",
    "loss_mask",
    "padding_mask",
)
_LABEL_KEYS = ("labels", "shift_labels")
#: Fewest positions one rank's shard may hold. Hugging Face's SDPA attention takes a single query for a
#: decoding step and turns causal masking off (``is_causal = q_length > 1 and ...``), so a one-token shard
#: would attend to later positions through the ring. Sequences that short get more padding instead.
MIN_SHARD_TOKENS = 2


def sequence_dim(key: str, tensor: torch.Tensor) -> int:
    """Sequence dimension of a batch field: 2 for 3-D ``position_ids`` (mRoPE, ``[3, B, S]``), else 1."""
    return 2 if key == "position_ids" and tensor.ndim == 3 else 1


def _sequence_fields(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in SEQUENCE_KEYS if isinstance(batch.get(key), torch.Tensor)}


def _check_trailing_padding(attention_mask: torch.Tensor, batch: dict[str, Any]) -> None:
    if attention_mask.ndim != 2:
        raise ContextParallelBatchError(
            f"Context parallelism cannot shard an explicit {attention_mask.ndim}-D `attention_mask`: attention"
            " runs causal over the whole sequence. Pass a 2-D padding mask `[batch, seq]` or none at all."
        )
    valid = attention_mask.bool()
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ContextParallelBatchError(
            "`attention_mask` has left padding or holes. Under context parallelism attention is plain causal,"
            " which only stands in for padding at the end of a row. Pad on the right (tokenizer"
            " `padding_side='right'`), or pack documents with position_ids restarting per document."
        )
    padded = ~valid
    for key in _LABEL_KEYS:
        labels = batch.get(key)
        if isinstance(labels, torch.Tensor) and (labels[padded] != IGNORE_INDEX).any():
            raise ContextParallelBatchError(
                f"`{key}` has values other than {IGNORE_INDEX} at padded positions (attention_mask == 0). Causal"
                " attention lets padding tokens attend to each other, so their labels must be ignored to keep the"
                f" loss exact: set them to {IGNORE_INDEX}."
            )
    loss_mask = batch.get("loss_mask")
    if isinstance(loss_mask, torch.Tensor) and loss_mask[padded].any():
        raise ContextParallelBatchError("`loss_mask` must be 0 at padded positions (attention_mask == 0).")


def primary_input_key(batch: dict[str, Any]) -> str:
    """``"input_ids"`` when the batch carries token ids, else ``"inputs_embeds"``."""
    return "input_ids" if isinstance(batch.get("input_ids"), torch.Tensor) else "inputs_embeds"


def require_one_input(batch: dict[str, Any]) -> str:
    """Return the batch's input key (``"input_ids"`` or ``"inputs_embeds"``); refuse a batch with neither or both.

    Raised as :class:`ContextParallelBatchError` on every rank alike, before anything reads the sequence length.
    """
    present = [key for key in ("input_ids", "inputs_embeds") if isinstance(batch.get(key), torch.Tensor)]
    if len(present) != 1:
        found = ", ".join(f"`{key}`" for key in present) if present else "neither"
        keys = ", ".join(f"`{key}`" for key in batch) or "none"
        raise ContextParallelBatchError(
            f"A CP batch needs exactly one of `input_ids` and `inputs_embeds` as a tensor; this one has {found}"
            f" (its keys: {keys}). The sequence to shard is read from it: pass the token ids as"
            " `batch['input_ids']`, or the embeddings as `batch['inputs_embeds']`, not both."
        )
    return present[0]


def validate_cp_batch(batch: dict[str, Any], *, require_labels: bool) -> int:
    """Check that ``batch`` can be sharded for CP and return its sequence length.

    Raises :class:`ContextParallelBatchError` for: neither or both of ``input_ids`` / ``inputs_embeds``,
    missing labels (when required), sequence fields whose lengths or batch sizes disagree, and an
    ``attention_mask`` that is not plain right padding with ignored labels.
    """
    require_one_input(batch)
    if require_labels and not any(isinstance(batch.get(key), torch.Tensor) for key in _LABEL_KEYS):
        raise ContextParallelBatchError(
            "A CP training batch needs `labels` (or `shift_labels`): they must be sharded together with the inputs."
        )
    fields = _sequence_fields(batch)
    primary = primary_input_key(batch)
    seq_len, batch_size = fields[primary].size(1), fields[primary].size(0)
    for key, tensor in fields.items():
        dim = sequence_dim(key, tensor)
        if tensor.ndim <= dim or tensor.size(dim) != seq_len:
            raise ContextParallelBatchError(
                f"Batch fields disagree on the sequence length: `{primary}` has {seq_len}, `{key}` has shape"
                f" {tuple(tensor.shape)} (sequence dimension {dim})."
            )
        if tensor.size(dim - 1) not in (1, batch_size):
            raise ContextParallelBatchError(
                f"Batch fields disagree on the batch size: `{primary}` has {batch_size}, `{key}` has shape"
                f" {tuple(tensor.shape)}."
            )
    if seq_len == 0:
        raise ContextParallelBatchError("Cannot shard an empty sequence (length 0).")
    if batch_size == 0:
        raise ContextParallelBatchError("Cannot shard an empty batch (0 rows).")
    attention_mask = batch.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.ndim == 2 and attention_mask.shape != (batch_size, seq_len):
            raise ContextParallelBatchError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)}, expected ({batch_size}, {seq_len})."
            )
        _check_trailing_padding(attention_mask, batch)
    return seq_len


def next_token_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels aligned with their positions (``out[:, i] = labels[:, i + 1]``, last ignored)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)


def default_position_ids(seq_len: int, device: torch.device) -> torch.Tensor:
    """``[1, seq_len]`` positions ``0 .. seq_len - 1``, broadcast over the batch by the model."""
    return torch.arange(seq_len, device=device).unsqueeze(0)


def padded_length(seq_len: int, cp_size: int, multiple: int) -> int:
    """The length a sequence of ``seq_len`` is right-padded to for ``cp_size`` ranks.

    A multiple of ``multiple`` (what the layout needs), and long enough to give every rank at least
    :data:`MIN_SHARD_TOKENS` positions.
    """
    return -(-max(seq_len, MIN_SHARD_TOKENS * cp_size) // multiple) * multiple


def position_ids_per_row(batch: dict[str, Any], seq_len: int) -> torch.Tensor:
    """The batch's ``position_ids`` with a row for every batch row, ``[batch, seq]``; made when missing.

    Positions made or given once for all rows (``[1, seq]``) are expanded to every row, as NeMo AutoModel
    returns them, so code that reads positions row by row keeps working (models take either shape).
    3-D mRoPE positions (``[3, batch, seq]``) are returned as they are.
    """
    primary = batch[primary_input_key(batch)]
    positions = batch.get("position_ids")
    if not isinstance(positions, torch.Tensor):
        positions = default_position_ids(seq_len, primary.device)
    if positions.ndim == 2 and positions.size(0) == 1:
        positions = positions.expand(primary.size(0), -1)
    return positions


def pad_value_for(key: str, padding_token_id: int) -> int | bool:
    """The value that pads batch field ``key`` without changing its meaning."""
    return {
        "input_ids": padding_token_id,
        "padding_mask": True,
        "labels": IGNORE_INDEX,
        "shift_labels": IGNORE_INDEX,
    }.get(key, 0)


def pad_sequence_field(key: str, tensor: torch.Tensor, pad_len: int, padding_token_id: int = 0) -> torch.Tensor:
    """Right-pad a batch field by ``pad_len`` positions with the value that keeps its meaning.

    ids get ``padding_token_id``, labels ``-100``, ``padding_mask`` ``True``, ``loss_mask`` and embeddings
    zeros, and ``position_ids`` keep counting up from the last position (padding sits at the end of a
    causal sequence, so it is never attended by a real token).
    """
    if pad_len == 0:
        return tensor
    dim = sequence_dim(key, tensor)
    if key == "position_ids":
        last = tensor.narrow(dim, tensor.size(dim) - 1, 1)
        steps = torch.arange(1, pad_len + 1, device=tensor.device, dtype=tensor.dtype)
        extra = last + steps.view([pad_len if d == dim else 1 for d in range(tensor.ndim)])
    else:
        shape = list(tensor.shape)
        shape[dim] = pad_len
        extra = tensor.new_full(shape, pad_value_for(key, padding_token_id))
    return torch.cat([tensor, extra], dim=dim)


def shard_cp_batch(
    batch: dict[str, Any],
    cp_size: int,
    cp_rank: int,
    *,
    load_balance: bool = True,
    padding_token_id: int = 0,
    require_labels: bool = True,
) -> tuple[dict[str, Any], int]:
    """Validate, pad and shard ``batch``; return this rank's batch and the padded global length.

    The sequence is right-padded to a multiple of ``2 * cp`` (``cp`` without load balancing), 32 times
    that on CUDA (:func:`~lightning_cp.sharding.sequence.ring_pad_multiple`).

    ``attention_mask`` is checked (right padding only) and dropped: CP attention is causal.
    ``position_ids`` are made when missing, so each shard keeps its tokens' true positions, and come back
    ``[batch, seq]`` (see :func:`position_ids_per_row`). Any length of at least one token is padded and
    runs exactly, also when a rank holds only padding (padding sits after every real token, so causal
    attention never lets a real token see it, and its labels are ignored). Fields
    that are not laid out along the sequence pass through unchanged. The input is not modified.
    """
    seq_len = validate_cp_batch(batch, require_labels=require_labels)
    multiple = ring_pad_multiple(cp_size, load_balance, batch[primary_input_key(batch)].device)
    padded_len = padded_length(seq_len, cp_size, multiple)
    out = {key: value for key, value in batch.items() if key != "attention_mask"}
    out["position_ids"] = position_ids_per_row(out, seq_len)
    for key, tensor in _sequence_fields(out).items():
        padded = pad_sequence_field(key, tensor, padded_len - seq_len, padding_token_id)
        out[key] = shard_sequence(padded, sequence_dim(key, padded), cp_size, cp_rank, load_balance)
    return out, padded_len
