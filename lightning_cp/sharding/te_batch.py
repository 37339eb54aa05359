"""Packed batches for Transformer Engine's context-parallel attention (THD format).

Transformer Engine runs its own ring inside ``DotProductAttention`` when given a CP group and
packed sequences in THD layout (all tokens in one row, delimited by ``cu_seqlens``). What it needs
from the batch: every sequence padded to a multiple of ``2 * cp``, each rank's tokens picked with
TE's per-sequence head/tail partitioning (:mod:`lightning_cp.sharding.thd`), and the *global* cumulative
lengths of the padded sequences (``cu_seqlens``, as NeMo AutoModel gives them, and ``cu_seqlens_padded``). TE is
never imported here; its CUDA partitioning kernel is used when it is installed and the batch is on
a GPU, and the same partitioning in plain torch otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.mesh import mesh_size
from lightning_cp.sharding.batch import ContextParallelBatchError, primary_input_key
from lightning_cp.sharding.packing import PACKING_KEYS, SEQ_LENS_PADDING_VALUE, PackedLayout, padded_rows
from lightning_cp.sharding.thd import partitioned_indices

#: Per-token fields of a THD batch; they are partitioned across the CP ranks.
THD_TOKEN_KEYS: tuple[str, ...] = ("input_ids", "labels", "position_ids", "padding_mask")


def _valid(lengths: torch.Tensor, padding_value: int) -> torch.Tensor:
    flat = lengths.reshape(-1)
    return flat[flat != padding_value].long()


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)


def _to_thd(batch: dict[str, Any], padding_value: int, padding_token_id: int) -> dict[str, Any]:
    """One chunk of rows, flattened into a single THD row with its cumulative lengths."""
    for key in ("seq_lens", "seq_lens_padded"):
        if not isinstance(batch.get(key), torch.Tensor):
            raise KeyError(f"A THD batch for Transformer Engine needs `{key}` ([batch, num_packs], -1000 for unused).")
    input_ids = batch["input_ids"]
    total = input_ids.size(0) * input_ids.size(1)
    seq_lens = _valid(batch["seq_lens"], padding_value)
    seq_lens_padded = _valid(batch["seq_lens_padded"], padding_value)
    if seq_lens.numel() != seq_lens_padded.numel() or (seq_lens > seq_lens_padded).any() or (seq_lens < 0).any():
        raise ContextParallelBatchError(
            f"`seq_lens` {seq_lens.tolist()} and `seq_lens_padded` {seq_lens_padded.tolist()} must pair up, with every"
            " real length between 0 and its padded length."
        )
    if int(seq_lens_padded.sum()) != total:
        raise ContextParallelBatchError(
            f"`seq_lens_padded` add up to {int(seq_lens_padded.sum())} tokens but the batch holds {total}."
        )
    thd = {key: value for key, value in batch.items() if not isinstance(value, torch.Tensor)}
    for key in ("input_ids", "labels", "position_ids"):
        if isinstance(batch.get(key), torch.Tensor):
            thd[key] = batch[key].reshape(total, *batch[key].shape[2:])
    if "position_ids" not in thd:
        starts = torch.repeat_interleave(_cumulative(seq_lens_padded)[:-1].long(), seq_lens_padded)
        thd["position_ids"] = (torch.arange(total, device=starts.device) - starts).to(input_ids.device)
    thd["padding_mask"] = thd["input_ids"] == padding_token_id
    thd["cu_seqlens"] = _cumulative(seq_lens).to(input_ids.device)
    thd["cu_seqlens_padded"] = _cumulative(seq_lens_padded).to(input_ids.device)
    thd["max_seqlen"] = seq_lens_padded.max().to(torch.int32).to(input_ids.device)
    return thd


def _partition(thd: dict[str, Any], cp_size: int, cp_rank: int) -> dict[str, Any]:
    total = thd["input_ids"].size(0)
    index = partitioned_indices(thd["cu_seqlens_padded"], total, cp_size, cp_rank)
    for key in THD_TOKEN_KEYS:
        if isinstance(thd.get(key), torch.Tensor):
            thd[key] = thd[key].index_select(0, index.to(thd[key].device)).contiguous()
    # NeMo's meaning under CP: each sequence spans its padded length (padding sits at its end, after every
    # real token, so causal attention of the real tokens is unchanged), and TE's CP needs sequences of 2 * cp.
    thd["cu_seqlens"] = thd["cu_seqlens_padded"]
    return thd


def _stack_chunks(chunks: list[dict[str, Any]], padding_value: int) -> dict[str, Any]:
    stacked = dict(chunks[0])
    for key in (*THD_TOKEN_KEYS, "max_seqlen"):
        if isinstance(chunks[0].get(key), torch.Tensor):
            stacked[key] = torch.stack([chunk[key] for chunk in chunks])
    for key in ("cu_seqlens", "cu_seqlens_padded"):
        width = max(chunk[key].numel() for chunk in chunks)
        stacked[key] = torch.stack(
            [
                torch.cat([chunk[key], chunk[key].new_full((width - chunk[key].numel(),), padding_value)])
                for chunk in chunks
            ]
        )
    return stacked


def check_qkv_format(qkv_format: str) -> None:
    """Refuse any layout but THD with NeMo's meaning and opening words (a ``ValueError``), before any other work."""
    if qkv_format != "thd":
        raise ValueError(
            f"Currently only 'thd' format is supported, got: {qkv_format}. Transformer Engine's context-parallel"
            " attention is given packed sequences (all tokens in one row, delimited by `cu_seqlens`). Pass"
            " qkv_format='thd' (the default), or shard a [batch, seq] batch with make_cp_batch_and_ctx(use_te=False)."
        )


def thd_batch_for_rank(
    batch: dict[str, Any],
    cp_size: int,
    cp_rank: int,
    *,
    qkv_format: str = "thd",
    padding_token_id: int = 0,
    num_chunks: int = 1,
    seq_lens_padding_value: int = SEQ_LENS_PADDING_VALUE,
) -> dict[str, Any]:
    """Rank ``cp_rank`` of ``cp_size``'s THD batch; :func:`make_cp_batch_for_te` with the rank given."""
    check_qkv_format(qkv_format)
    rows = batch["input_ids"].size(0)
    if num_chunks < 1 or rows % num_chunks:
        raise ValueError(f"`num_chunks` ({num_chunks}) must be a positive divisor of the batch size ({rows}).")
    per_chunk = rows // num_chunks
    chunks = []
    for chunk in range(num_chunks):
        part = {
            key: value[chunk * per_chunk : (chunk + 1) * per_chunk] if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }
        thd = _to_thd(part, seq_lens_padding_value, padding_token_id)
        if cp_size > 1:
            thd = _partition(thd, cp_size, cp_rank)
        chunks.append(thd)
    result = chunks[0] if num_chunks == 1 else _stack_chunks(chunks, seq_lens_padding_value)
    result.update(qkv_format=qkv_format, cp_size=cp_size, cp_rank=cp_rank)
    return result


def make_cp_batch_for_te(
    cp_mesh: DeviceMesh | None,
    batch: dict[str, Any],
    qkv_format: str = "thd",
    padding_token_id: int = 0,
    num_chunks: int = 1,
    seq_lens_padding_value: int = SEQ_LENS_PADDING_VALUE,
) -> dict[str, Any]:
    """Turn a packed ``[batch, seq]`` batch into this rank's THD batch for Transformer Engine.

    ``batch`` holds ``input_ids`` and ``labels`` (``[batch, seq]``), optionally ``position_ids``, and
    ``seq_lens`` / ``seq_lens_padded`` (``[batch, num_packs]``, unused entries ``seq_lens_padding_value``)
    giving each packed sequence's real and padded length; with CP every padded length must be a
    multiple of ``2 * cp``. The rows are split into ``num_chunks`` chunks along the batch dimension;
    each chunk is flattened and cut into this rank's tokens (TE's per-sequence head/tail partitioning).

    Returns ``input_ids``, ``labels``, ``position_ids``, ``padding_mask`` (``input_ids ==
    padding_token_id``) for this rank's tokens; the global cumulative lengths ``cu_seqlens`` and
    ``cu_seqlens_padded`` (int32), ``max_seqlen`` (the longest padded sequence, an int32 tensor, as NeMo
    gives it; TE's ``max_seqlen_q`` wants ``int(...)``), ``qkv_format``, ``cp_size`` and ``cp_rank``. As in
    NeMo AutoModel, with ``cp > 1`` ``cu_seqlens`` holds the *padded* lengths (equal to ``cu_seqlens_padded``:
    the boundaries of the token layout TE partitions); with ``cp == 1`` it holds the real lengths.
    With ``num_chunks > 1`` every tensor gets a leading chunk dimension and
    the cumulative lengths are right-padded with ``seq_lens_padding_value``. Without a CP mesh (or
    ``cp == 1``) the batch is converted but not partitioned. Position ids missing from ``batch``
    restart at 0 in every sequence.
    """
    check_qkv_format(qkv_format)  # before the process group is asked for anything, as NeMo does
    cp_size = mesh_size(cp_mesh) or 1
    cp_rank = dist.get_rank(cp_mesh.get_group()) if cp_mesh is not None and cp_size > 1 else 0
    return thd_batch_for_rank(
        batch,
        cp_size,
        cp_rank,
        qkv_format=qkv_format,
        padding_token_id=padding_token_id,
        num_chunks=num_chunks,
        seq_lens_padding_value=seq_lens_padding_value,
    )


def padded_packed_batch(batch: dict[str, Any], layout: PackedLayout, padding_token_id: int = 0) -> dict[str, Any]:
    """The rows of a packed ``batch`` with every document padded as ``layout`` says, plus their lengths.

    The result has ``seq_lens`` / ``seq_lens_padded`` (trailing row filler joins the last document's
    padding), the input :func:`make_cp_batch_for_te` expects; packing keys of ``batch`` are replaced.
    """
    if not layout.load_balance or layout.whole_documents:
        raise ValueError(
            "Transformer Engine's THD partitioning needs a load-balanced layout with every document split head/tail"
            f" (load_balance=True, whole_documents=False); got load_balance={layout.load_balance},"
            f" whole_documents={layout.whole_documents}. Plan it with `plan_packed_layout(lengths, cp, True)`."
        )
    out = {key: value for key, value in batch.items() if key not in PACKING_KEYS and key != "attention_mask"}
    out.update(padded_rows(out, layout, padding_token_id))
    seq_lens = [list(row) for row in layout.lengths]
    seq_lens_padded = layout.padded_lengths()
    for padded in seq_lens_padded:
        padded[-1] += layout.padded_len - sum(padded)
    width = max(len(row) for row in seq_lens)
    for key, values in (("seq_lens", seq_lens), ("seq_lens_padded", seq_lens_padded)):
        rows = [row + [SEQ_LENS_PADDING_VALUE] * (width - len(row)) for row in values]
        out[key] = torch.tensor(rows, device=out["input_ids"].device)
    if not all(isinstance(out.get(key), torch.Tensor) for key in ("input_ids", "labels")):
        raise ContextParallelBatchError("The Transformer Engine THD path needs `input_ids` and `labels`.")
    return out


def one_document_per_row(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with ``seq_lens`` saying that each row is one document (right padding included).

    Transformer Engine attention runs under CP only on THD batches, so a plain ``[batch, seq]`` batch
    of a TE model goes the packed way, one document per row. Right padding (``attention_mask`` zeros)
    stays at the end of its row's document, where causal attention keeps it from every real token.
    """
    primary = batch[primary_input_key(batch)]
    rows, seq_len = primary.size(0), primary.size(1)
    return {**batch, "seq_lens": torch.full((rows, 1), seq_len, dtype=torch.long, device=primary.device)}
