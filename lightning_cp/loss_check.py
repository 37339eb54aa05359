"""Recognise a training loss that is wrong under CP, and say what is wrong with it and what to use instead.

Under CP a training step holds one shard of every sequence, and ``batch["labels"]`` are already aligned
with positions (shifted before sharding). The right loss has the whole batch's token mean as its value
and this rank's share as its gradient; a Hugging Face model's own loss and
``strategy.token_correct_loss`` are such losses. Common hand-written losses are wrong in ways that can
be recognised: each is recomputed here from the step's logits and labels and compared with the value
the user returned. Nothing here communicates with other ranks, so every rank judges its own step and
no rank can wait on another.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_cp.sharding.batch import IGNORE_INDEX

Candidates = list[tuple[str, float]]

#: The right loss, in the candidates :meth:`LossWatch.check` compares against.
TOKEN_CORRECT = "token_correct"
#: Logits upcast to fp32 at a time while the candidates are computed (bounds the extra memory).
_TOKENS_PER_CHUNK = 1024


def _log_partition(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the vocabulary in fp32, a chunk of positions at a time."""
    flat = logits.reshape(-1, logits.size(-1))
    parts = [torch.logsumexp(chunk.float(), dim=-1) for chunk in flat.split(_TOKENS_PER_CHUNK)]
    return torch.cat(parts).view(logits.shape[:-1])


def _cross_entropy_sum(
    logits: torch.Tensor, log_partition: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy over the targets that are not ignored, and their number."""
    valid = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    return torch.where(valid, log_partition - picked, 0.0).sum(), valid.sum()


@torch.no_grad()
def wrong_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    label_count: torch.Tensor | None = None,
) -> Candidates:
    """The values this shard's logits give under losses that are wrong under CP, to recognise one among them.

    ``labels`` are the shard's position-aligned labels. The losses: ``shard_mean``, the token mean over
    the shard; ``labels_shifted_in_shard``, that mean after shifting the (already aligned) labels once
    more inside the shard; ``input_ids_shifted_in_shard``, targets taken from ``input_ids`` shifted inside
    the shard; and, given ``label_count`` (valid labels over the data × context ranks), ``rank_share``:
    the local sum over that count, returned as it is. The doctor and the strategies' first-step check use them.
    """
    log_partition = _log_partition(logits)
    total, count = _cross_entropy_sum(logits, log_partition, labels)
    shifted_logits, shifted_partition = logits[..., :-1, :], log_partition[..., :-1]
    candidates = [("shard_mean", float(total / count))]
    shifted_total, shifted_count = _cross_entropy_sum(shifted_logits, shifted_partition, labels[..., 1:])
    candidates.append(("labels_shifted_in_shard", float(shifted_total / shifted_count)))
    if input_ids is not None and input_ids.shape == labels.shape:
        ids_total, ids_count = _cross_entropy_sum(shifted_logits, shifted_partition, input_ids[..., 1:])
        candidates.append(("input_ids_shifted_in_shard", float(ids_total / ids_count)))
    if label_count is not None:
        candidates.append(("rank_share", float(total / label_count.clamp(min=1))))
    return candidates


def closest_loss(value: float, candidates: Iterable[tuple[str, float]], rtol: float = 1e-5) -> str | None:
    """The name of the candidate that ``value`` equals within ``rtol``, the closest if several; else ``None``.

    A candidate divided by a whole number up to 64 matches too: gradient accumulation divides the loss
    (Lightning's automatic optimization does it before handing the loss to callbacks).
    """
    best, best_error = None, rtol
    for name, candidate in candidates:
        if not (math.isfinite(value) and math.isfinite(candidate)) or candidate == 0:
            continue
        divisor = min(max(round(candidate / value), 1), 64) if value else 1
        error = abs(value * divisor - candidate) / abs(candidate)
        if error < best_error:  # ties go to the earlier candidate: list the right loss first
            best, best_error = name, error
    return best


class LossWatch:
    """One training step's evidence about its loss: the logits the model produced, and the right loss's value.

    Forward hooks on ``modules`` keep (detached) the last output shaped like the labels plus a vocabulary
    dimension: a tensor, or the ``logits`` of a mapping such as a Hugging Face model output. DTensor
    logits (tensor parallelism) are not kept: reading them would communicate.

    Args:
        modules: the modules whose outputs may be the logits (the model, Hugging Face models inside it).
        labels: this rank's position-aligned labels; input_ids: this rank's input ids, if any.
        label_count: valid labels of the micro-batch over the data × context ranks.
        ranks: the number of data × context ranks (gradients are averaged over them).
    """

    def __init__(
        self,
        modules: Iterable[nn.Module],
        labels: torch.Tensor,
        input_ids: torch.Tensor | None,
        label_count: torch.Tensor | None,
        ranks: int,
    ) -> None:
        self.labels = labels
        self.input_ids = input_ids
        self.label_count = label_count
        self.ranks = ranks
        self.logits: torch.Tensor | None = None
        self.token_correct: list[float] = []
        self._handles = [module.register_forward_hook(self._keep_logits) for module in modules]

    def _keep_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = output.get("logits") if isinstance(output, Mapping) else output
        if (
            isinstance(logits, torch.Tensor)
            and not isinstance(logits, DTensor)
            and logits.shape[:-1] == self.labels.shape
        ):
            self.logits = logits.detach()

    def record_token_correct(self, loss: torch.Tensor) -> None:
        """Note the value of a right loss computed in this step (the model's own, or ``token_correct_loss``)."""
        self.token_correct.append(float(loss))

    def close(self) -> None:
        """Remove the forward hooks; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def check(self, loss: torch.Tensor, *, model_loss: str, helper: str) -> str | None:
        """A warning naming what is wrong with ``loss`` and what to use instead; ``None`` when it is right.

        ``model_loss`` and ``helper`` are how the user's code reaches the model's own loss and
        ``token_correct_loss`` (they differ between the Trainer and Fabric). A DTensor loss (tensor
        parallelism) is not judged: reading its value may communicate.
        """
        if isinstance(loss, DTensor):
            return None
        value = float(loss.detach())
        if self.label_count is not None and int(self.label_count) == 0:
            return self._no_targets_warning(value)
        candidates: Candidates = [(TOKEN_CORRECT, right) for right in self.token_correct]
        if self.logits is not None:
            candidates += wrong_losses(self.logits, self.labels, self.input_ids, self.label_count)
        rtol = max(1e-5, 4 * torch.finfo(loss.dtype).eps) if loss.is_floating_point() else 1e-5
        match = closest_loss(value, candidates, rtol)
        return None if match == TOKEN_CORRECT else self._warning(match, value, model_loss, helper)

    def _no_targets_warning(self, value: float) -> str:
        """The micro-batch has no target token at all: no loss is right or wrong, the batch is what to look at."""
        return (
            f"lightning_cp: this training step's micro-batch has no target tokens: all its labels are"
            f" {IGNORE_INDEX} (ignored) on every one of the {self.ranks} data × context ranks, e.g. sequences of"
            " one token, whose only label is dropped by the shift to next-token targets. Its loss is"
            f" {value:.6g} (0 / 0 when it is a mean over targets), as it would be without context parallelism,"
            " and its gradients carry no signal. Give every micro-batch at least one label that is not"
            f" {IGNORE_INDEX} (sequences of two tokens or more), or leave such batches out."
        )

    def _warning(self, match: str | None, value: float, model_loss: str, helper: str) -> str:
        """What is wrong with a loss recognised as ``match`` (``None``: not recognised), and what to use instead."""
        use = f"Use {model_loss}, or {helper}(logits, batch['labels'])."
        start = f"lightning_cp: this training step's loss ({value:.6g})"
        if match == "labels_shifted_in_shard":
            return (
                f"{start} shifts the labels inside the shard: it is the cross-entropy of logits[:, :-1] against"
                " batch['labels'][:, 1:]. Under CP, batch['labels'] are already aligned with positions"
                " (lightning_cp shifted them before sharding: labels[:, i] is the token after position i), so"
                f" shifting again trains every position on the token two ahead. Do not shift. {use}"
            )
        if match == "input_ids_shifted_in_shard":
            return (
                f"{start} takes its targets from batch['input_ids'] shifted inside the shard (logits[:, :-1]"
                " against input_ids[:, 1:]). Under CP a shard is not a stretch of the sequence: the token after"
                " a position may sit on another rank (with load balancing each rank holds two distant chunks),"
                " and ignored labels (-100) and padding are counted. Use batch['labels'], which are already"
                f" aligned with positions, without shifting. {use}"
            )
        if match == "shard_mean":
            local = int((self.labels != IGNORE_INDEX).sum())
            total = int(self.label_count) if self.label_count is not None else 0
            weight = f"{total / (self.ranks * local):.3g}×" if local else "an undefined multiple of"
            return (
                f"{start} is the mean cross-entropy over this rank's shard, which holds {local} of the {total}"
                f" valid labels of the micro-batch across {self.ranks} data × context ranks. Gradients are"
                f" averaged over those ranks, so each of this shard's tokens weighs {weight} what it should"
                f" (1× only when every shard holds {total / self.ranks:.4g} labels), and the value is this"
                f" shard's, not the batch's loss. {use}"
            )
        if match == "rank_share":
            return (
                f"{start} is this rank's share of the token-correct loss (its token-loss sum over the"
                f" micro-batch's valid-label count, as the functional lightning_cp.token_correct_loss returns)."
                f" The strategy averages gradients over the {self.ranks} data × context ranks, so this"
                f" gradient is {self.ranks}× too small, and the value is a share, not the batch's loss. {use}"
            )
        known = f"; the token-correct loss of this step is {self.token_correct[-1]:.6g}" if self.token_correct else ""
        return (
            f"{start} is not one lightning_cp recognises{known}. Under CP, batch holds this rank's shard of"
            " every sequence and batch['labels'] are already aligned with positions (do not shift them); a loss"
            " is right when its value is the whole batch's token mean and its gradient this rank's share, as"
            f" with {model_loss} or {helper}(logits, batch['labels']). If your loss adds other terms or"
            " scales it, this warning may be moot; lightning_cp.doctor.check(model_factory, loss_fn=...)"
            " compares a loss with and without CP."
        )
