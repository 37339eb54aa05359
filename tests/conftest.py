"""Shared fixtures of the test suite.

Helpers that scripts run in subprocesses also need live in ``tests/scripts/common.py`` and
``tests/models.py``; both directories are on the path (``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from model_zoo import zoo_model


def _same_training(run: dict, reference: dict, model_name: str = "llama", **model_overrides: object) -> None:
    torch.testing.assert_close(run["losses"], reference["losses"], rtol=1e-5, atol=0)
    assert run["weights"].keys() == reference["weights"].keys()
    for name, weight in reference["weights"].items():
        # Elements near 0 are compared at 1e-4 of the tensor's largest, not of their own size: after 5 steps the
        # rounding of a different summation order reaches 3e-4 of a few tiny embedding entries (Gemma 3, packed,
        # on an AMD EPYC), while a missing or doubled contribution moves whole rows by far more.
        atol = max(1e-6, 1e-4 * float(weight.abs().max()))
        torch.testing.assert_close(run["weights"][name], weight, rtol=1e-4, atol=atol, msg=name)
    initial = zoo_model(model_name, **model_overrides).state_dict()
    moved = max((run["weights"][k] - initial[k]).abs().max() for k in run["weights"])
    assert moved > 1e-3, "the weights must have changed, or the comparison proves nothing"


@pytest.fixture
def assert_same_training() -> Callable[..., None]:
    """Assert that a CP run's per-step losses and final weights equal a one-process reference run's.

    ``model_name`` and ``model_overrides`` name the :func:`~model_zoo.zoo_model` trained (default: the tiny Llama);
    its initial weights are what the run must have moved away from, or the comparison proves nothing.
    """
    return _same_training
