"""The first training step's loss under CP: a wrong loss is named with what to use instead; right ones run quietly.

One 2-process launch per framework fits once per loss (one step each) and reports each fit's warnings.
"""

from __future__ import annotations

import re

import pytest
import torch
from common import run_script

from lightning_cp.loss_check import closest_loss

#: Hugging Face's warning when its `loss_function` property is read on a model without a loss type.
HF_LOSS_TYPE_WARNING = "`loss_type=None` was set in the config but it is unrecognized"
TRAINER_FIX = "Use self.model(**batch).loss, or self.trainer.strategy.token_correct_loss(logits, batch['labels'])."
FABRIC_FIX = "Use model(**batch).loss, or strategy.token_correct_loss(logits, batch['labels'])."


def _launch(script: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[str]], str]:
    out = tmp_path_factory.mktemp(script.removesuffix(".py")) / "warnings.pt"
    result = run_script(script, "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out, weights_only=False), result.stdout + result.stderr


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    return _launch("trainer_loss_guidance.py", tmp_path_factory)


@pytest.fixture(scope="module")
def fabric_run(tmp_path_factory):
    return _launch("fabric_loss_guidance.py", tmp_path_factory)


def _only_warning(warnings: list[str]) -> str:
    assert len(warnings) == 1, warnings
    return warnings[0]


def test_trainer_loss_that_shifts_aligned_labels_again_is_named(trainer_run):
    warning = _only_warning(trainer_run[0]["shifted"])
    assert "shifts the labels inside the shard" in warning
    assert "batch['labels'] are already aligned with positions" in warning
    assert "Do not shift." in warning and warning.endswith(TRAINER_FIX)


def test_trainer_plain_mean_after_the_models_own_loss_is_named_with_its_label_counts(trainer_run):
    warning = _only_warning(trainer_run[0]["plain_mean"])
    counts = re.search(r"holds (\d+) of the (\d+) valid labels of the micro-batch across 2 data × context", warning)
    assert counts, warning
    local, total = map(int, counts.groups())
    assert 0 < local < total
    assert f"weighs {total / (2 * local):.3g}× what it should" in warning
    assert warning.endswith(TRAINER_FIX)


def test_trainer_rank_share_of_the_functional_api_is_named(trainer_run):
    warning = _only_warning(trainer_run[0]["rank_share"])
    assert "this rank's share of the token-correct loss" in warning
    assert "this gradient is 2× too small" in warning and warning.endswith(TRAINER_FIX)


def test_trainer_unrecognised_loss_gets_a_generic_warning_without_claims_about_its_error(trainer_run):
    warning = _only_warning(trainer_run[0]["unrecognised"])
    assert "is not one lightning_cp recognises; the token-correct loss of this step is" in warning
    assert "off by" not in warning and "too small" not in warning


def test_trainer_batch_without_target_tokens_is_named_instead_of_the_loss(trainer_run):
    """One-token sequences have no next-token target: the loss is nan as without CP, and the batch is to blame."""
    warning = _only_warning(trainer_run[0]["one_token"])
    assert "micro-batch has no target tokens: all its labels are -100 (ignored)" in warning
    assert "on every one of the 2 data × context ranks" in warning and "Its loss is nan" in warning
    assert "not one lightning_cp recognises" not in warning and "Use self.model(**batch).loss" not in warning


def test_trainer_right_losses_run_quietly(trainer_run):
    """The model's own loss and token_correct_loss (with gradient accumulation dividing them): no warning at all."""
    warnings, log = trainer_run
    assert warnings["model"] == [] and warnings["token_correct"] == []
    assert HF_LOSS_TYPE_WARNING not in log


def test_fabric_loss_that_shifts_aligned_labels_again_is_named(fabric_run):
    warning = _only_warning(fabric_run[0]["shifted"])
    assert "shifts the labels inside the shard" in warning and warning.endswith(FABRIC_FIX)


def test_fabric_right_losses_run_quietly(fabric_run):
    """The model's own loss divided by 2 (as for gradient accumulation) and token_correct_loss: no warning."""
    warnings, log = fabric_run
    assert warnings["model"] == [] and warnings["token_correct"] == []
    assert HF_LOSS_TYPE_WARNING not in log


def test_closest_loss_prefers_the_right_loss_and_matches_divided_losses():
    candidates = [("token_correct", 2.0), ("shard_mean", 2.0), ("labels_shifted_in_shard", 3.0)]
    assert closest_loss(2.0, candidates) == "token_correct"
    assert closest_loss(1.5, candidates) == "labels_shifted_in_shard"  # divided by 2
    assert closest_loss(2.5, candidates) is None
    assert closest_loss(float("nan"), candidates) is None
