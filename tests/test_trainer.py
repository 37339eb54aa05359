"""End-to-end Trainer runs (2 CPU processes, gloo, Lightning's own launcher) against one-process training."""

from __future__ import annotations

import gc
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from common import BATCH_SIZE, hf_style_samples, reference_sgd_run, run_script, script_command, tiny_causal_lm
from distributed_harness import run_on_ranks

from lightning_cp import ContextParallelStrategy
from lightning_cp.callbacks import ContextParallelCallback

LR = 1.0


def _train(tmp_path: Path, *args: str, fresh: bool = False) -> dict:
    out = tmp_path / "result.pt"
    result = run_script("trainer_llama.py", "--out", str(out), "--lr", str(LR), *args, fresh=fresh)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out, weights_only=False) | {"log": result.stdout + result.stderr}


@pytest.mark.parametrize(
    "layout,accumulate,cp_mode",
    # replicate / 1 / auto: in test_one_launch_validates_predicts_and_trains_like_one_process
    [("fsdp", 1, "ring"), ("replicate", 2, "ring"), ("fsdp", 2, "auto")],
)
def test_cp2_training_equals_one_process_training(tmp_path, layout, accumulate, cp_mode, assert_same_training):
    run = _train(tmp_path, "--layout", layout, "--accumulate", str(accumulate), "--cp-mode", cp_mode)
    _check_training(run, accumulate, cp_mode, assert_same_training)


def _check_training(run: dict, accumulate: int, cp_mode: str, assert_same_training) -> None:
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=accumulate, lr=LR))
    # the logged train_loss is the loss of the whole sequence, not a shard's share
    torch.testing.assert_close(run["logged_train_loss"], run["losses"][-1], rtol=1e-6, atol=0)
    assert run["tokens_per_sec_logged"]
    assert "data_parallel=1 × context_parallel=2 × tensor_parallel=1" in run["log"]
    assert "sequence 130 tokens (padded to 132) -> 66 per rank" in run["log"]
    mechanism = "Ulysses over 2 ranks: auto" if cp_mode == "auto" else "ring over 2 ranks: cp_mode='ring'"
    assert f"attention by {mechanism}" in run["log"]


def _lightning_modules_alive(rank: int, world_size: int) -> list[str]:
    gc.collect()
    return [type(obj).__name__ for obj in gc.get_objects() if isinstance(obj, L.LightningModule)]


def test_a_finished_fit_leaves_nothing_holding_the_model(tmp_path):
    """After ``fit``, nothing of lightning_cp keeps the strategy, and through it the model and data, alive: a process
    that goes on (a notebook, the next fit) holds no memory of it, and no stale model of it is hooked."""
    _train(tmp_path, "--steps", "1")
    assert run_on_ranks(_lightning_modules_alive) == [[], []]


@pytest.mark.slow  # a fresh launch
def test_one_launch_validates_predicts_and_trains_like_one_process(tmp_path, assert_same_training):
    """One Trainer launch (replicated, no accumulation, cp_mode="auto"): validation and prediction on the initial
    weights, then training; each checked against one process. Launched as a user launches it: the other rank
    started by Lightning's launcher (the other Trainer runs take the live ranks of tests/rank_pool.py)."""
    run = _train(tmp_path, "--validate", "--predict", "--fit", fresh=True)
    _check_training(run, 1, "auto", assert_same_training)
    _check_validation_losses(run)
    _check_predictions(run)


def test_bf16_mixed_training_with_cp2_is_as_close_to_fp32_as_bf16_mixed_without_cp(tmp_path):
    """bf16 cannot match bit for bit: CP's error against fp32 truth must be that of bf16-mixed without CP."""
    run = _train(tmp_path, "--precision", "bf16-mixed", "--steps", "3")
    truth = reference_sgd_run(steps=3, accumulate=1, lr=LR)
    plain_bf16 = reference_sgd_run(steps=3, accumulate=1, lr=LR, autocast_dtype=torch.bfloat16)
    pairs = [("losses", run["losses"], plain_bf16["losses"], truth["losses"])]
    pairs += [(name, run["weights"][name], plain_bf16["weights"][name], w) for name, w in truth["weights"].items()]
    for name, cp, plain, exact in pairs:
        cp_error = (cp.float() - exact).abs().max().item()
        plain_error = (plain.float() - exact).abs().max().item()
        assert cp_error <= 2 * plain_error + 1e-2 * exact.abs().max().item(), f"{name}: {cp_error} vs {plain_error}"
    assert (plain_bf16["losses"] - truth["losses"]).abs().max() > 0, "bf16-mixed must differ from fp32"


def test_chunked_loss_and_activation_checkpointing_with_cp2_equal_one_process_training(tmp_path, assert_same_training):
    """The memory options on, FSDP2 (chunks of 16 tokens, layers recomputed with the ring running again): exact.

    Replicated models with the options are covered by the Fabric runs (test_fabric.py).
    """
    run = _train(
        tmp_path, "--layout", "fsdp", "--chunked-loss", "16", "--activation-checkpointing", "--offload-activations"
    )
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR))
    assert "`offload_activations=True` does nothing on CPU" in run["log"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the Trainer puts one rank on each GPU: needs 2 GPUs")
def test_cp2_training_on_gpus_equals_one_process_training(tmp_path, assert_same_training):
    """The same parity on CUDA (NCCL, the CUDA ring kernels) against the CPU reference, fp32."""
    run = _train(tmp_path, "--accelerator", "gpu")
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR))


def test_manual_optimization_with_cp2_equals_one_process_training(tmp_path, assert_same_training):
    run = _train(tmp_path, "--manual")
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR))


@pytest.mark.slow
def test_dp2_by_cp2_training_equals_one_process_training_on_the_global_batch(tmp_path, assert_same_training):
    """4 processes: the sampler is keyed on the data-parallel rank and the loss is token-correct across dp."""
    run = _train(tmp_path, "--devices", "4", "--dp", "2", "--layout", "fsdp")
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR, data_parallel=2))
    assert "data_parallel=2 × context_parallel=2 × tensor_parallel=1" in run["log"]


@pytest.mark.slow
def test_hsdp_replicate2_by_cp2_training_equals_one_process_training_on_the_global_batch(
    tmp_path, assert_same_training
):
    """4 processes: 2 replicas of the model (HSDP), each sharded over its 2 context-parallel ranks."""
    run = _train(tmp_path, "--devices", "4", "--dp", "2", "--replicate", "2", "--layout", "hsdp")
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR, data_parallel=2))
    assert run["hsdp_placements"] == "(Replicate(), Shard(dim=0))"


@pytest.mark.slow
def test_tp2_by_cp2_training_equals_one_process_training(tmp_path, assert_same_training):
    """4 processes: a Llama TP plan over tensor_parallel × the ring over context_parallel, plain SGD."""
    run = _train(tmp_path, "--devices", "4", "--tp", "2")
    assert "data_parallel=1 × context_parallel=2 × tensor_parallel=2" in run["log"]
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR))


@pytest.mark.slow  # a fresh launch
def test_two_nodes_train_as_one_node_with_the_same_ranks(tmp_path, assert_same_training):
    """Two "nodes" on this machine (Lightning's num_nodes=2, one process each, NODE_RANK 0 and 1)."""
    out = tmp_path / "result.pt"
    command, env = script_command("trainer_llama.py", "--out", str(out), "--devices", "1", "--num-nodes", "2")
    nodes = [
        subprocess.Popen(command, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(2)
    ]
    logs = [node.communicate(timeout=300)[0].decode() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    run = torch.load(out, weights_only=False)
    assert_same_training(run, reference_sgd_run(steps=5, accumulate=1, lr=LR))
    assert "data_parallel=1 × context_parallel=2 × tensor_parallel=1 on 2 processes" in logs[0]


def _check_validation_losses(run: dict) -> None:
    """The validation losses under CP are those of the initial model without CP."""
    model = tiny_causal_lm("llama")
    samples = hf_style_samples(2 * BATCH_SIZE)
    with torch.no_grad():
        expected = [
            model(**{k: torch.stack([s[k] for s in samples[i : i + BATCH_SIZE]]) for k in samples[0]}).loss
            for i in range(0, len(samples), BATCH_SIZE)
        ]
    torch.testing.assert_close(run["val_losses"], torch.stack(expected), rtol=1e-5, atol=0)


def _check_predictions(run: dict) -> None:
    """Predictions come back gathered to the full length, equal to the initial model's logits without CP."""
    samples = hf_style_samples(BATCH_SIZE)
    with torch.no_grad():
        expected = tiny_causal_lm("llama")(input_ids=torch.stack([s["input_ids"] for s in samples])).logits
    (logits,) = run["predictions"]
    assert logits.shape == expected.shape == (BATCH_SIZE, 130, 256)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def _failing_run(tmp_path: Path, *args: str, fresh: bool = False) -> str:
    out = str(tmp_path / "never.pt")
    result = run_script("trainer_llama.py", "--out", out, "--steps", "2", *args, timeout=300, fresh=fresh)
    assert result.returncode != 0
    assert not (tmp_path / "never.pt").exists()
    return result.stdout + result.stderr


def test_ranks_of_a_cp_group_with_different_batches_are_detected(tmp_path):
    log = _failing_run(tmp_path, "--global-rank-sampler")
    assert "The ranks of a context-parallel group received different batches" in log


def test_batches_that_diverge_after_the_first_steps_are_stopped_at_the_step_they_diverge(tmp_path):
    """A per-rank augmentation that starts at batch 3: steps 0-2 train, batch 3 is refused on every rank."""
    log = _failing_run(tmp_path, "--diverge-at", "3", "--steps", "5")
    assert "received different batches at batch 3" in log
    assert "context-parallel rank(s) [1] differ from rank 0" in log


def test_strategy_without_the_callback_is_refused_at_setup(tmp_path):
    assert "add `callbacks=[ContextParallelCallback()]`" in _failing_run(tmp_path, "--no-callback")


def test_model_without_attention_modules_is_refused(tmp_path):
    assert "Found no self-attention modules" in _failing_run(tmp_path, "--no-attention")


@pytest.mark.slow  # a fresh launch
def test_cp_size_that_does_not_divide_the_world_is_refused(tmp_path):
    """Refused when the Trainer is built, before the launch: one traceback ending in the one-line cause (issue 26)."""
    log = _failing_run(tmp_path, "--cp", "3", fresh=True)  # what a user's launch prints
    assert (
        "ValueError: lightning_cp: cp_size=3 does not divide the world size (2 processes: devices=2 × num_nodes=1)"
        in log
    )
    assert log.count("Traceback") == 1, log


def test_callback_without_the_strategy_is_refused_at_setup():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class Tiny(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[ContextParallelCallback()], logger=False, max_steps=1)
    with pytest.raises(MisconfigurationException, match="needs `ContextParallelStrategy`"):
        trainer.fit(Tiny(), train_dataloaders=[{"input_ids": torch.zeros(1, 4)}])


def test_strategy_is_registered_under_a_string():
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="context_parallel", logger=False)
    assert isinstance(trainer.strategy, ContextParallelStrategy)


def test_deterministic_switch_gives_identical_runs(tmp_path):
    first = _train(tmp_path, "--layout", "fsdp", "--deterministic")
    second = _train(tmp_path, "--layout", "fsdp", "--deterministic")
    assert first["deterministic_algorithms"] and second["deterministic_algorithms"]
    assert torch.equal(first["losses"], second["losses"])
    for name, weight in first["weights"].items():
        assert torch.equal(second["weights"][name], weight), name
