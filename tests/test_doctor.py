"""The doctor: 'exact' on healthy models, and each known cause named on a setup broken that way."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mixer_zoo import build_mixer_model
from models import (
    llama_with_hand_written_mixer,
    llama_with_sdpa_imported_by_name,
    lm_batch,
    mistral_with_short_window,
    next_token_labels,
    tiny_causal_lm,
)
from plain_lm import plain_lm_loss, plain_lm_with_sdpa_imported_by_name
from rank_pool import run_in_pool

from lightning_cp.doctor import check


@pytest.fixture(autouse=True)
def _ranks_from_the_pool(request, monkeypatch):
    """The doctor's ranks come from the suite's live group (tests/rank_pool.py) instead of fresh processes:
    the same real gloo ranks, started once. A test whose model factory changes its process for good (registers
    an attention function) is marked ``fresh_processes``; one command-line test launches the doctor on its own."""
    if request.node.get_closest_marker("fresh_processes") is None:
        monkeypatch.setattr("lightning_cp.doctor.run_on_local_ranks", run_in_pool)
    else:
        # the doctor also runs the factory in this process (it reads the model's config): what the factory registers
        # with transformers must not outlive the test, or later tests here attend with it
        from transformers import AttentionInterface

        monkeypatch.setattr(AttentionInterface, "_global_mapping", dict(AttentionInterface._global_mapping))


def _loss_shifting_inside_the_shard(model, batch):
    """A hand-written LM loss that shifts the batch it is given: under CP, that is a shard."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def _mean_over_the_given_labels(model, batch):
    """A loss that averages over the labels it is given: under CP, one shard's."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_healthy_models_are_exact(family):
    report = check(functools.partial(tiny_causal_lm, family), lm_batch(seq_len=128))
    assert report.exact, report.render()
    assert report.causes == []
    assert report.mechanism_calls == report.attention_calls == 2
    assert "attention by Ulysses over 2 ranks: auto" in report.render()
    assert len(report.attention_modules) == 2


@pytest.mark.fresh_processes  # the factory registers its own "sdpa" attention function in the ranks' processes
def test_attention_that_bypasses_the_ring_is_named():
    # Ulysses runs this attention function on whole sequences whatever SDPA it calls; the ring cannot
    report = check(llama_with_sdpa_imported_by_name, lm_batch(seq_len=128), cp_mode="ring")
    assert not report.exact
    assert "local_attention" in report.causes
    assert report.mechanism_calls == 0 and report.attention_calls >= 1
    assert "without any attention call going through it" in report.error
    # not the ring that just failed: only Ulysses, which calls the attention function on whole sequences
    assert report.runnable_modes == ["ulysses"] and report.no_mode_reason is None
    assert "modes that would run this model at cp=2: cp_mode='ulysses'" in report.render()


def test_attention_no_mode_reaches_is_refused_without_listing_modes():
    """Hand-called SDPA outside transformers' attention interface: neither the ring nor Ulysses runs it (issue 26)."""
    report = check(plain_lm_with_sdpa_imported_by_name, seq_len=64, loss_fn=plain_lm_loss, vocab_size=64)
    assert not report.exact and report.causes == ["local_attention"], report.render()
    assert report.runnable_modes == []
    rendered = report.render()
    assert "modes that would run this model" not in rendered
    assert "no CP mode can run this model at cp=2: its attention does not go through" in rendered


def test_sliding_window_shorter_than_the_sequence_runs_exactly_under_the_ring():
    # the masked ring (Note [windowed ring]); on packed documents as well (tests/test_ulysses.py)
    report = check(mistral_with_short_window, lm_batch(seq_len=128), cp_mode="ring")
    assert report.exact, report.render()
    assert "attention by ring over 2 ranks" in report.mechanism


def test_auto_runs_a_sliding_window_exactly_through_ulysses():
    report = check(mistral_with_short_window, lm_batch(seq_len=128))
    assert report.exact, report.render()
    assert "attention by Ulysses" in report.mechanism


def test_labels_shifted_after_sharding_are_named():
    report = check(
        functools.partial(tiny_causal_lm, "llama"), lm_batch(seq_len=128), loss_fn=_loss_shifting_inside_the_shard
    )
    assert not report.exact
    assert report.causes == ["labels_shifted_after_sharding"], report.render()


def test_loss_that_is_not_token_correct_is_named():
    batch = lm_batch(seq_len=128)  # aligned labels, a third ignored: the shards hold unequal counts
    report = check(
        functools.partial(tiny_causal_lm, "llama"), batch, loss_fn=_mean_over_the_given_labels, labels="aligned"
    )
    assert not report.exact
    assert report.causes == ["loss_not_token_correct"], report.render()


def test_sequence_length_the_balancer_would_pad_is_named():
    report = check(functools.partial(tiny_causal_lm, "llama"), lm_batch(seq_len=130))
    assert report.exact, report.render()
    assert report.causes == ["padded_sequence"]


@pytest.mark.slow  # a fresh launch of the doctor's command line
def test_command_line_reports_exact_on_a_config(tmp_path):
    config = {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128}
    config |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "lightning_cp", "doctor", "--model", str(tmp_path / "config.json"), "--seq-len", "128"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: EXACT within tolerance" in result.stdout
    assert "attention calls under CP: 2, through the CP mechanism: 2" in result.stdout
    assert "attention by Ulysses over 2 ranks" in result.stdout


def test_hf_labels_helper_matches_models_shift():
    ids = torch.tensor([[1, 2, 3]])
    assert next_token_labels(ids).tolist() == [[2, 3, -100]]


def _doctor_command_line(capsys, *args: str) -> tuple[int, str]:
    """The doctor's command line run in this process (its ranks from the pool): exit code and what it printed.
    ``test_command_line_reports_exact_on_a_config`` launches ``python -m lightning_cp`` itself."""
    from lightning_cp.__main__ import main

    code = main(["doctor", *args])
    return code, capsys.readouterr().out


@pytest.mark.fresh_processes  # the factory registers an attention function that calls an SDPA imported by name
def test_command_line_names_the_cause_for_a_factory_module(capsys):
    code, out = _doctor_command_line(capsys, "--module", "models:llama_with_sdpa_imported_by_name", "--cp-mode", "ring")
    assert code == 1, out
    assert "verdict: NOT EXACT" in out
    assert "likely cause [local_attention]" in out


def test_bad_arguments_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="`labels` must be 'hf' or 'aligned'"):
        check(functools.partial(tiny_causal_lm, "llama"), lm_batch(seq_len=128), labels="shifted")
    from lightning_cp.__main__ import main

    with pytest.raises(SystemExit, match="--module expects 'package.module:factory'"):
        main(["doctor", "--module", "models"])


def test_command_line_checks_a_model_that_is_not_from_hugging_face_with_its_own_loss(capsys):
    model = ("--module", "plain_lm:plain_causal_lm", "--loss", "plain_lm:plain_lm_loss", "--vocab-size", "64")
    code, out = _doctor_command_line(capsys, *model, "--seq-len", "64")
    assert code == 0, out
    assert "verdict: EXACT within tolerance" in out
    assert "attention calls under CP: 2, through the CP mechanism: 2" in out
    assert "attention by ring over 2 ranks: auto" in out  # its heads are not declared: the ring
    assert "layers.0.self_attn" in out


def test_command_line_asks_for_the_loss_of_a_model_that_is_not_from_hugging_face(capsys):
    from lightning_cp.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--module", "plain_lm:plain_causal_lm", "--vocab-size", "64"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "`PlainCausalLM.forward` takes no `labels`" in error
    assert "`check(factory, loss_fn=my_loss)`, or `--loss package.module:my_loss`" in error


def test_command_line_asks_for_the_vocabulary_size_of_a_model_without_config(capsys):
    from lightning_cp.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--module", "plain_lm:plain_causal_lm", "--loss", "plain_lm:plain_lm_loss"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "`PlainCausalLM` has no `config.vocab_size`" in error
    assert "(its embeddings: `tokens` (64 rows), `positions` (256 rows))" in error
    assert "`--vocab-size N`" in error


def test_a_hybrid_model_reports_its_mixers_and_is_exact():
    report = check(functools.partial(build_mixer_model, "qwen3_next", vocab_size=256), lm_batch(seq_len=64))
    assert report.exact, report.render()
    assert report.mixers == ["model.layers.0.linear_attn"]
    assert report.mixer_calls == report.mixer_calls_through_cp == 1
    assert "sequence mixers over 2 ranks: 1 gated delta net by state_passing (auto: " in report.render()


def test_a_hand_written_mixer_is_named_as_the_cause():
    """Negative control: a module that mixes positions by hand (a running mean) shows no structural sign; the doctor
    finds it as the first module whose output differs from the plain run, and says why."""
    report = check(llama_with_hand_written_mixer, lm_batch(seq_len=64))
    assert not report.exact
    assert report.causes == ["unhooked_mixing"], report.render()
    assert report.first_divergence is not None
    assert report.first_divergence.startswith("`model.layers.0.mlp.1` (RunningMeanMixer)")
