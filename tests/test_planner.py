"""The planner: its command line, its search, and its formula against what a step really uses."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_cp.__main__ import main
from lightning_cp.launch import run_on_local_ranks
from lightning_cp.memory import apply_memory_options
from lightning_cp.planner import ModelShape, fixed_bytes, layer_bytes, longest_sequence, plan, step_bytes
from lightning_cp.sharding.batch import next_token_labels

#: A small Llama whose step memory is dominated by its vocabulary, as long-context steps are.
SMALL_LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 16000,
}
#: How far the formula may be from a measured step (it is calibrated on benchmarks/memory_options.py).
TOLERANCE = 0.30


def _small_config() -> LlamaConfig:
    config = {key: value for key, value in SMALL_LLAMA.items() if key != "model_type"}
    return LlamaConfig(**config, max_position_embeddings=1 << 16, attn_implementation="sdpa")


def test_plan_command_prints_each_option_set(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_LLAMA))
    assert main(["plan", "--model", str(config), "--cp", "2", "--memory-gib", "1"]) == 0
    report = capsys.readouterr().out
    longest = [int(match) for match in re.findall(r"^  (?:plain|chunked_loss.*?)\s+(\d+)\s+[\d.]+$", report, re.M)]
    assert len(longest) == 3, report
    assert 0 < longest[0] <= longest[1] < longest[2], report  # each option lets a longer sequence fit
    assert all(tokens % 4 == 0 for tokens in longest)  # a multiple of 2·cp


def test_plan_takes_fsdp_sharding_into_account():
    shape = ModelShape.from_config(_small_config())
    assert fixed_bytes(shape, fsdp=4) * 4 == pytest.approx(fixed_bytes(shape), abs=4)
    replicated = plan(shape, cp=2, memory_gib=0.5)[1]
    sharded = plan(shape, cp=2, memory_gib=0.5, fsdp=4)[1]
    assert all(s.longest_sequence >= r.longest_sequence for s, r in zip(sharded, replicated, strict=True))


def test_plan_refuses_nonsense_sizes():
    with pytest.raises(ValueError, match="cp"):
        plan(ModelShape.from_config(_small_config()), cp=0, memory_gib=1)


@pytest.mark.parametrize("chunk_tokens, checkpointing", [(None, False), (256, False), (256, True)])
def test_longest_sequence_is_the_longest_that_fits(chunk_tokens, checkpointing):
    shape = ModelShape.from_config(_small_config())
    budget, cp = 2**30, 2
    longest = longest_sequence(shape, cp, budget, chunk_tokens, checkpointing)
    assert longest % (2 * cp) == 0
    for tokens, fits in ((longest, True), (longest + 2 * cp, False)):
        used = fixed_bytes(shape) + step_bytes(shape, tokens // cp, chunk_tokens, checkpointing)
        assert (used <= budget) == fits


def test_layer_constants_count_what_the_decoder_layers_save():
    """The per-layer constant against the bytes a Llama's decoder layers save for backward (another shape)."""
    config = LlamaConfig(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=64,
        attn_implementation="sdpa",
    )
    body = LlamaForCausalLM(config).model
    tokens = 512
    saved: dict[int, int] = {}  # by storage: a tensor saved twice (the residual stream) counts once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        body(input_ids=torch.randint(0, 64, (1, tokens)))
    predicted = layer_bytes(ModelShape.from_config(config), tokens) * config.num_hidden_layers
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.15)


def _load_benchmark_common():
    """``benchmarks/common.py`` (its peak-memory measurement), under a name that does not clash with tests'."""
    path = Path(__file__).parent.parent / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("benchmarks_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measured_steps(rank: int, world_size: int, tokens: int) -> dict[str, float]:
    """Peak memory of one plain step and of one with chunked loss + checkpointing (MiB, one process)."""
    measure_peak_mib = _load_benchmark_common().measure_peak_mib
    input_ids = torch.randint(0, SMALL_LLAMA["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    labels = next_token_labels(input_ids)
    peaks = {}
    for name, options in (("plain", {}), ("options", {"chunked_loss": 256, "activation_checkpointing": True})):
        torch.manual_seed(0)
        model = LlamaForCausalLM(_small_config())
        apply_memory_options(
            model,
            chunked_loss=options.get("chunked_loss", False),
            activation_checkpointing=options.get("activation_checkpointing", False),
        )

        def step(model: LlamaForCausalLM = model) -> None:
            model(input_ids=input_ids, labels=labels, shift_labels=labels).loss.backward()
            model.zero_grad(set_to_none=False)

        step()  # warm-up: gradient buffers are part of the baseline
        peaks[name] = measure_peak_mib(step, torch.device("cpu"))[0]
    return peaks


@pytest.mark.slow  # times real steps
def test_formula_predicts_a_measured_step(monkeypatch):
    """One small measured step per option set (peak RSS, as the benchmark measures it) against the formula."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 16))  # freed tensors leave RSS (benchmarks/common.py)
    tokens = 2048
    measured = run_on_local_ranks(_measured_steps, tokens, world_size=1, threads_per_rank=1, timeout=120)[0]
    shape = ModelShape.from_config(_small_config())
    predicted = {
        "plain": step_bytes(shape, tokens, None, False) / 2**20,
        "options": step_bytes(shape, tokens, 256, True) / 2**20,
    }
    for name, mib in measured.items():
        assert mib == pytest.approx(predicted[name], rel=TOLERANCE), (name, measured, predicted)
