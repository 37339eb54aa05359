"""Checkpoints of CP training (real 2-process Trainer launches): resume bit-exactly, or with another layout.

A run trains 3 epochs of 2 SGD steps with cp=2 and saves a checkpoint after every epoch; the resumed
runs start from the first one and must reproduce the uninterrupted run's remaining 4 losses and its
final weights: bit for bit with the same layout, within fp32 tolerance with another one.

Mid-epoch: a run with a stateful loader (torchdata's ``StatefulDataLoader``, shuffled by Lightning's
DistributedSampler, a new order every epoch) trains 3 epochs of 3 steps and saves a checkpoint every 4
steps. The checkpoint after step 4 — what a run stopped there leaves — is in epoch 1, one batch in; the
resumed run must draw the remaining batches of that epoch and the next, and end where the uninterrupted one did.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from common import run_script

# momentum: the optimizer has state that must come back too
EPOCHS = ("--epochs", "3", "--steps", "2", "--lr", "0.5", "--momentum", "0.9")
# how the model is laid out over the data × context ranks, and whether checkpoints are one file
SAVED = {"replicate": ("--layout", "replicate"), "fsdp": ("--layout", "fsdp"), "replicate-file": ("--consolidated",)}
_runs: dict[str, tuple[dict, Path]] = {}

MID_EPOCH = ("--epochs", "3", "--steps", "3", "--lr", "0.5", "--stateful-loader")
STOP_AFTER = 4  # steps: epoch 1, after its first batch
# plain SGD in a single file of an FSDP2 model: the optimizer has no state at all (Lightning's loader fails on it)
MID_EPOCH_SAVED = {
    "replicate": ("--layout", "replicate", "--momentum", "0.9"),
    "fsdp": ("--layout", "fsdp", "--momentum", "0.9"),
    "fsdp-file-plain-sgd": ("--layout", "fsdp", "--consolidated", "--momentum", "0"),
}
_mid_epoch_runs: dict[str, tuple[dict, Path]] = {}


def _train(out: Path, *args: str, run: tuple[str, ...] = EPOCHS) -> dict:
    result = run_script("trainer_llama.py", "--out", str(out), *run, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out, weights_only=False)


def _uninterrupted(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The uninterrupted cp=2 run of a saved configuration, and its first checkpoint (after 2 steps)."""
    if name not in _runs:
        directory = tmp_path_factory.mktemp(name)
        run = _train(directory / "full.pt", *SAVED[name], "--save-dir", str(directory / "checkpoints"))
        checkpoint = directory / "checkpoints" / "epoch=0.ckpt"
        assert checkpoint.is_dir() == (name != "replicate-file"), "sharded directory, or one file on request"
        _runs[name] = run, checkpoint
    return _runs[name]


@pytest.mark.parametrize("name", list(SAVED))
def test_resume_with_the_same_layout_is_bit_exact(tmp_path, tmp_path_factory, name):
    full, checkpoint = _uninterrupted(name, tmp_path_factory)
    resumed = _train(tmp_path / "resumed.pt", *SAVED[name], "--resume", str(checkpoint))
    assert torch.equal(resumed["losses"], full["losses"][2:])
    for key, weight in full["weights"].items():
        assert torch.equal(resumed["weights"][key], weight), key


@pytest.mark.parametrize(
    "name,devices,cp,layout",
    [
        ("fsdp", 1, 1, "fsdp"),  # sharded over 2 ranks -> one process without CP
        pytest.param("fsdp", 4, 4, "fsdp", marks=pytest.mark.slow),  # resharded from 2 to 4 ranks, cp=4
        ("replicate", 1, 1, "replicate"),
        # one file from a replicated model -> FSDP2 over 4 ranks
        pytest.param("replicate-file", 4, 4, "fsdp", marks=pytest.mark.slow),
    ],
)
def test_resume_with_another_layout(tmp_path, tmp_path_factory, name, devices, cp, layout):
    full, checkpoint = _uninterrupted(name, tmp_path_factory)
    resumed = _train(
        tmp_path / "resumed.pt",
        "--devices",
        str(devices),
        "--cp",
        str(cp),
        "--layout",
        layout,
        "--resume",
        str(checkpoint),
    )
    torch.testing.assert_close(resumed["losses"], full["losses"][2:], rtol=1e-5, atol=0)
    for key, weight in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], weight, rtol=1e-4, atol=1e-6, msg=key)


def _uninterrupted_mid_epoch(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The uninterrupted cp=2 run of a mid-epoch configuration, and its checkpoint after step ``STOP_AFTER``."""
    if name not in _mid_epoch_runs:
        directory = tmp_path_factory.mktemp(f"mid-epoch-{name}")
        saving = ("--save-dir", str(directory / "checkpoints"), "--save-every-n-steps", str(STOP_AFTER))
        run = _train(directory / "full.pt", *MID_EPOCH_SAVED[name], *saving, run=MID_EPOCH)
        _mid_epoch_runs[name] = run, directory / "checkpoints" / f"step={STOP_AFTER}.ckpt"
    return _mid_epoch_runs[name]


@pytest.mark.parametrize(
    "name",
    # the fast set (-m "not slow") keeps one mid-epoch resume: FSDP2, a single file, plain SGD
    [pytest.param(name, marks=[] if name == "fsdp-file-plain-sgd" else pytest.mark.slow) for name in MID_EPOCH_SAVED],
)
def test_mid_epoch_resume_with_the_same_layout_is_bit_exact(tmp_path, tmp_path_factory, name):
    full, checkpoint = _uninterrupted_mid_epoch(name, tmp_path_factory)
    resumed = _train(tmp_path / "resumed.pt", *MID_EPOCH_SAVED[name], "--resume", str(checkpoint), run=MID_EPOCH)
    assert torch.equal(resumed["losses"], full["losses"][STOP_AFTER:])
    for key, weight in full["weights"].items():
        assert torch.equal(resumed["weights"][key], weight), key


@pytest.mark.slow
def test_mid_epoch_resume_with_another_cp_size(tmp_path, tmp_path_factory):
    """FSDP2 shards over 2 ranks, mid-epoch -> one process without CP, model replicated."""
    full, checkpoint = _uninterrupted_mid_epoch("fsdp", tmp_path_factory)
    resumed = _train(
        tmp_path / "resumed.pt",
        *("--devices", "1", "--cp", "1", "--layout", "replicate", "--momentum", "0.9", "--resume", str(checkpoint)),
        run=MID_EPOCH,
    )
    torch.testing.assert_close(resumed["losses"], full["losses"][STOP_AFTER:], rtol=1e-5, atol=0)
    for key, weight in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], weight, rtol=1e-4, atol=1e-6, msg=key)
