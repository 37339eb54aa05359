"""Token-correct loss under context (and data) parallelism.

Each rank holds a shard of the sequence with its own number of valid labels. A per-rank mean is wrong
whenever those numbers differ; the right loss is the sum of token losses over the whole sequence (and
the whole data-parallel batch) divided by the global number of valid label tokens. Each rank's share
is its local sum divided by that global count, so the shares add up to the loss, and the gradients,
summed over the ranks, to the gradient without CP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.chunked_loss import HiddenStatesForLoss, chunked_token_loss_sum
from lightning_cp.sharding.batch import IGNORE_INDEX

Group = DeviceMesh | dist.ProcessGroup | None


def _process_group(group: Group) -> dist.ProcessGroup | None:
    return group.get_group() if isinstance(group, DeviceMesh) else group


def count_label_tokens(labels: torch.Tensor, group: Group = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of labels that are not ``ignore_index``, summed over ``group`` (a mesh or process group).

    Count on sharded labels over the CP group (plus the data-parallel ranks when they share the loss);
    padding added by the sharding carries ``ignore_index`` and so is never counted.
    """
    count = (labels != ignore_index).sum()
    if group is not None:
        dist.all_reduce(count, group=_process_group(group))
    return count


def token_loss_sum(
    logits: torch.Tensor | HiddenStatesForLoss, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Sum of cross-entropy over the valid labels of this shard, computed in fp32.

    ``labels`` are aligned with ``logits`` position by position (already shifted for causal LM).
    ``logits`` may be :func:`~lightning_cp.chunked_loss.chunked_logits`: the full logits then never exist.
    """
    if isinstance(logits, HiddenStatesForLoss):
        if ignore_index != IGNORE_INDEX:
            raise ValueError(f"The chunked loss ignores labels equal to {IGNORE_INDEX}, got {ignore_index}.")
        return chunked_token_loss_sum(logits, labels)
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=ignore_index, reduction="sum")


def token_correct_loss(
    logits: torch.Tensor | HiddenStatesForLoss, labels: torch.Tensor, group: Group, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """This rank's share of the global token-mean cross-entropy: local sum / global valid-label count.

    Summing the shares over ``group`` (see :func:`reduce_loss`) gives the loss of the whole sequence.
    """
    count = count_label_tokens(labels, group, ignore_index)
    return token_loss_sum(logits, labels, ignore_index) / count.clamp(min=1)


def reduce_loss(loss: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of every rank's loss share over ``group``, detached: the value to log."""
    total = loss.detach().clone()
    if group is not None:
        dist.all_reduce(total, group=_process_group(group))
    return total
