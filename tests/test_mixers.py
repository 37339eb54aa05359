"""Sequence mixers that are not attention under CP: exact (loss and every gradient) or refused on every rank.

Every family of :mod:`mixer_zoo` (gated delta nets, Mamba-2, Mamba-1, short convolutions, RG-LRU, Kimi delta
and lightning attention) runs on real gloo ranks against one plain process, each mixer by the mechanism
``mixer_mode`` picks for it; the cases of one world size share one set of processes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import new_process_groups_destroyed, run_on_ranks, summed_gradients
from mixer_zoo import MIXER_NAMES, build_mixer_model

from lightning_cp.attention.switch import active_context_parallel
from lightning_cp.mesh import build_device_mesh, resolve_layout
from lightning_cp.mixers import heads
from lightning_cp.mixers.detect import find_sequence_mixers, mixer_traits
from lightning_cp.mixers.mode import MixerPlan, choose_mixer_mechanisms
from lightning_cp.session import ContextParallelSession
from lightning_cp.strategies.gradients import average_replicated_gradients
from lightning_cp.validation import ContextParallelInputError

#: Loss and gradient tolerances of the parity cases (fp32).
RTOL_LOSS, RTOL_GRAD = 1e-5, 1e-4


def _batch(seq_len: int, packed: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 128, (2, seq_len), generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if packed:  # three documents per row, positions restarting at each
        lengths = [seq_len // 2, seq_len // 4, seq_len - seq_len // 2 - seq_len // 4]
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).expand(2, -1).contiguous()
        # no target across a document boundary (CP drops it; the plain model's shift would keep it)
        batch["labels"][:, batch["position_ids"][0] == 0] = -100
    return batch


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _case(
    rank: int,
    world_size: int,
    family: str,
    mixer_mode: str,
    seq_len: int,
    packed: bool,
    bypass: str,
    device: str = "cpu",
) -> dict:
    """One family on the ranks: the plain run, the CP run, the worst relative gradient difference."""
    torch.manual_seed(0)
    # "cache": the config's default use_cache=True (a training forward that builds a fresh cache)
    model = build_mixer_model(family, **({"use_cache": True} if bypass == "cache" else {})).to(device)
    reference = copy.deepcopy(model)
    batch = {key: value.to(device) for key, value in _batch(seq_len, packed).items()}
    if bypass == "embeds":  # inputs_embeds instead of input_ids (a vision tower's, say)
        batch["inputs_embeds"] = model.get_input_embeddings()(batch.pop("input_ids")).detach()
    plain = reference(**batch)
    plain.loss.backward()
    mesh, data_context = build_device_mesh(resolve_layout(world_size, world_size, 1, 1), torch.device(device))
    session = ContextParallelSession(mesh, data_context, mixer_mode=mixer_mode)
    try:
        session.prepare_model(model)
    except ContextParallelInputError as error:
        return {"refused": str(error)}
    line = session.describe_attention()
    if bypass == "mechanism":  # negative control: the mixers run on their own shards, the safety net off too
        session.mixer_plan = MixerPlan({}, {}, {})
        heads.active_context_parallel = lambda: None
    local = dict(batch)
    try:
        with session.step(local):
            loss = model(**local).loss
            loss.backward()
    except ContextParallelInputError as error:
        return {"refused": str(error)}
    average_replicated_gradients(model, data_context)
    grads = {
        name: _relative(parameter.grad, reference.get_parameter(name).grad)
        for name, parameter in model.named_parameters()
        if parameter.grad is not None and reference.get_parameter(name).grad is not None
    }
    worst = max(grads, key=grads.get)
    missing = [n for n, p in reference.named_parameters() if p.grad is not None and n not in grads]
    return {
        "loss": _relative(loss.detach(), plain.loss.detach()),
        "grad": grads[worst],
        "worst": worst,
        "missing": missing,
        "line": line,
    }


def _cases(rank: int, world_size: int, cases: list[tuple]) -> dict:
    results = {}
    for case in cases:
        if case[-1] == "no_reorder":  # negative control: all-to-all output taken in rank order, not sequence order
            saved = heads.ordered_from_rank_order, heads.rank_order_from_ordered
            heads.ordered_from_rank_order = lambda t, ex, seq_dim=1: t.narrow(seq_dim, 0, ex.length)
            heads.rank_order_from_ordered = lambda t, ex, seq_dim=1: torch.nn.functional.pad(
                t.movedim(seq_dim, -1), (0, ex.order.size(-1) - t.size(seq_dim))
            ).movedim(-1, seq_dim)
            try:
                with new_process_groups_destroyed():
                    results[case] = _case(rank, world_size, *case[:-1], "none")
            finally:
                heads.ordered_from_rank_order, heads.rank_order_from_ordered = saved
        else:
            try:
                with new_process_groups_destroyed():
                    results[case] = _case(rank, world_size, *case)
            finally:
                heads.active_context_parallel = active_context_parallel
    return results


#: Families whose every mixer state passing runs, and "auto" picks it for (tests/test_state_passing.py).
STATE_PASSING = {
    "qwen3_next",
    "qwen3_5",
    "olmo_hybrid",
    "nemotron_h",
    "bamba",
    "granitemoehybrid",
    "falcon_h1",
    "mamba2",
    "lfm2",
}

#: (family, mixer_mode, seq_len, packed, bypass) at cp=2: every family by "auto", the state-passing families also
#: by "all_to_all", the all-to-all families also by "gather", packed rows, a sequence that is padded, and the
#: negative controls.
CP2_CASES = [
    *[(family, "auto", 64, False, "none") for family in MIXER_NAMES],
    *[(family, "all_to_all", 64, False, "none") for family in MIXER_NAMES if family in STATE_PASSING],
    *[(family, "all_to_all", 64, True, "none") for family in ("qwen3_5", "bamba", "lfm2")],
    *[
        (family, "gather", 64, False, "none")
        for family in ("qwen3_next", "nemotron_h", "lfm2", "jamba", "recurrent_gemma")
    ],
    *[(family, "auto", 64, True, "none") for family in ("qwen3_5", "bamba", "lfm2", "jamba", "recurrent_gemma")],
    ("mamba2", "auto", 61, False, "none"),
    ("qwen3_next", "auto", 64, False, "cache"),
    ("nemotron_h", "auto", 64, False, "cache"),
    ("qwen3_5", "auto", 64, False, "embeds"),
    ("granitemoehybrid", "auto", 64, False, "embeds"),
    ("qwen3_next", "auto", 64, False, "mechanism"),
    ("mamba2", "auto", 64, False, "mechanism"),
    ("recurrent_gemma", "auto", 64, False, "mechanism"),
    ("qwen3_next", "all_to_all", 64, False, "no_reorder"),
    ("minimax", "all_to_all", 64, False, "none"),
]
#: Families whose every mixer the all-to-all runs (the rest are gathered under "auto").
ALL_TO_ALL = {
    "qwen3_next",
    "qwen3_5",
    "olmo_hybrid",
    "nemotron_h",
    "bamba",
    "granitemoehybrid",
    "falcon_h1",
    "mamba2",
    "lfm2",
    "jamba",
    "kimi_linear",
    "recurrent_gemma",
}


@pytest.fixture(scope="module")
def cp2_results() -> dict:
    return run_on_ranks(_cases, CP2_CASES, world_size=2, timeout=600)


def _expected_mechanism(family: str, mixer_mode: str) -> str:
    if mixer_mode != "auto":
        return mixer_mode
    return "state_passing" if family in STATE_PASSING else "all_to_all" if family in ALL_TO_ALL else "gather"


@pytest.mark.parametrize(
    "case",
    [c for c in CP2_CASES if c[-1] in ("none", "cache", "embeds") and (c[0], c[1]) != ("minimax", "all_to_all")],
    ids=str,
)
def test_mixer_parity_cp2(cp2_results: list[dict], case: tuple) -> None:
    for rank_results in cp2_results:
        result = rank_results[case]
        assert "refused" not in result, result.get("refused")
        assert result["loss"] <= RTOL_LOSS
        assert result["grad"] <= RTOL_GRAD, f"{result['worst']}: {result['grad']:.1e}"
        assert not result["missing"]
    family, mode = case[0], case[1]
    assert f"by {_expected_mechanism(family, mode)}" in cp2_results[0][case]["line"]
    if family == "mamba2":  # no attention at all: the line says so instead of naming an attention mechanism
        assert cp2_results[0][case]["line"].startswith("no attention modules; sequence mixers over 2 ranks")


@pytest.mark.parametrize("case", [c for c in CP2_CASES if c[-1] in ("mechanism", "no_reorder")], ids=str)
def test_mixer_negative_controls_fail(cp2_results: list[dict], case: tuple) -> None:
    """With the mechanism bypassed, or the all-to-all's output in rank order, some gradient is far off."""
    result = cp2_results[0][case]
    assert "refused" not in result
    assert result["grad"] > 1e-2


def test_all_to_all_refuses_a_mixer_it_cannot_run_on_every_rank(cp2_results: list[dict]) -> None:
    for rank_results in cp2_results:
        message = rank_results[("minimax", "all_to_all", 64, False, "none")]["refused"]
        assert "`model.layers.0.self_attn` (lightning attention) mixes positions in its own code" in message, message
        assert "gather" in message


@pytest.mark.slow
def test_mixer_parity_cp4() -> None:
    """Four ranks, every family: key heads and groups split (nemotron_h: four groups) or spread (bamba: one),
    channels (lfm2, Mamba-1's jamba), the gathered ones; packed rows for five of them."""
    cases = [(family, "auto", 64, False, "none") for family in MIXER_NAMES]
    cases += [(family, "auto", 64, True, "none") for family in ("qwen3_next", "nemotron_h", "bamba", "lfm2", "jamba")]
    for rank_results in run_on_ranks(_cases, cases, world_size=4, timeout=600):
        for case in cases:
            result = rank_results[case]
            assert "refused" not in result, (case, result.get("refused"))
            assert result["loss"] <= RTOL_LOSS and result["grad"] <= RTOL_GRAD, (case, result)


@pytest.mark.parametrize("family", MIXER_NAMES)
def test_every_mixer_is_found_and_attention_leaves_it_alone(family: str) -> None:
    from lightning_cp.hooks import attention_like_modules, find_attention_modules

    model = build_mixer_model(family)
    mixers = find_sequence_mixers(model)
    assert mixers, family
    attention = find_attention_modules(model)
    assert not set(mixers) & set(attention)
    assert not attention_like_modules(model, attention)  # linear attention is not refused as unreachable


def test_models_without_mixers_have_none() -> None:
    from models import tiny_causal_lm

    assert find_sequence_mixers(tiny_causal_lm("llama")) == {}


def test_heads_that_do_not_split_are_state_passed_by_auto_and_refused_by_all_to_all() -> None:
    model = build_mixer_model("qwen3_next", linear_num_value_heads=6, linear_num_key_heads=3)
    traits = [mixer_traits(name, module) for name, module in find_sequence_mixers(model).items()]
    plan = choose_mixer_mechanisms(traits, cp_size=4, mixer_mode="auto")
    assert set(plan.mechanisms.values()) == {"state_passing"}
    assert "by state_passing (auto: the all-to-all cannot run it: 6 value heads do not split over 4 ranks" in (
        plan.describe(4)
    )
    kimi = build_mixer_model("kimi_linear", linear_num_heads=6)  # state passing cannot run it: gathered
    kimi_traits = [mixer_traits(name, module) for name, module in find_sequence_mixers(kimi).items()]
    assert set(choose_mixer_mechanisms(kimi_traits, cp_size=4).mechanisms.values()) == {"gather"}
    with pytest.raises(ContextParallelInputError, match=r"sizes that split them: \[1, 3, 6\]"):
        choose_mixer_mechanisms(traits, cp_size=4, mixer_mode="all_to_all")
    assert set(choose_mixer_mechanisms(traits, cp_size=3, mixer_mode="all_to_all").mechanisms.values()) == {
        "all_to_all"
    }


def test_auto_picks_by_the_bytes_each_mechanism_moves() -> None:
    """State passing from the row length where it sends fewer bytes than the all-to-all (within the rows auto plans
    for: AUTO_SHARD_TOKENS per rank); a state too large for that leaves the all-to-all."""
    from dataclasses import replace

    from lightning_cp.mixers.mode import AUTO_SHARD_TOKENS
    from lightning_cp.mixers.traffic import MixerTraffic

    ((name, module),) = find_sequence_mixers(build_mixer_model("qwen3_next")).items()
    trait = mixer_traits(name, module)
    # 8 value heads of 16 / 4 key heads of 16, conv 256 x 3: W = 2*256 + 8*34 + 32*4 = 912 numbers per token
    assert trait.traffic.all_to_all_width(2) == 912
    break_even = trait.traffic.break_even_tokens(2)  # 3 * 2 * (8*16*32 + 256*3) / (2 * 912 / 4) = 64
    assert trait.traffic.state_passing_bytes(2) <= trait.traffic.all_to_all_bytes(2, break_even)
    assert trait.traffic.state_passing_bytes(2) > trait.traffic.all_to_all_bytes(2, break_even - 1)
    plan = choose_mixer_mechanisms([trait], cp_size=2)
    assert plan.describe(2) == (
        f"sequence mixers over 2 ranks: 1 gated delta net by state_passing (auto: fewer bytes than the all-to-all"
        f" from {break_even} tokens per row)"
    )
    huge = replace(trait, traffic=MixerTraffic(0, 0, 1, 0, 1, pair=AUTO_SHARD_TOKENS * 10))
    plan = choose_mixer_mechanisms([huge], cp_size=2)
    assert plan.mechanisms == {huge.name: "all_to_all"}
    # 3 * 2 * 40960 numbers against 2 * (1/2) * (1/2) numbers per token
    assert "(auto: fewer bytes than state passing below 491520 tokens per row)" in plan.describe(2)


def test_unknown_mixer_mode_is_refused() -> None:
    from lightning_cp.mixers.mode import validate_mixer_mode

    with pytest.raises(ValueError, match="must be one of"):
        validate_mixer_mode("ring")


def _unhooked_functional(rank: int, world_size: int) -> str:
    """A gated delta net hybrid given to the functional API without hooks: its mixer must not run on one shard."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_cp import make_cp_batch_and_ctx

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    model = build_mixer_model("qwen3_next")  # no attach_context_parallel_hooks
    train_ctx, local = make_cp_batch_and_ctx(mesh, _batch(64, packed=False))
    try:
        with train_ctx():
            model(**local).loss.backward()
    except ContextParallelInputError as error:
        return str(error)
    return "ran"


def test_an_unhooked_mixer_stops_under_the_functional_api_on_every_rank() -> None:
    for message in run_on_ranks(_unhooked_functional, world_size=2):
        assert "`causal_conv1d_forward` ran under context parallelism outside any sequence mixer" in message


def _functional_parity(rank: int, world_size: int) -> float:
    """Qwen3-Next through the functional API (hooked, ``make_cp_batch_and_ctx``): worst relative gradient difference
    against one plain process, gradients summed over the CP ranks (each holds its share of the token-correct loss)."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_cp import attach_context_parallel_hooks, make_cp_batch_and_ctx, token_correct_loss

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    model = build_mixer_model("qwen3_next")
    reference = copy.deepcopy(model)
    batch = _batch(64, packed=False)
    labels = torch.cat([batch["input_ids"][:, 1:], torch.full((2, 1), -100)], dim=1)
    logits = reference(input_ids=batch["input_ids"]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    attach_context_parallel_hooks(model)
    train_ctx, local = make_cp_batch_and_ctx(mesh, {"input_ids": batch["input_ids"], "labels": labels})
    local_labels = local.pop("labels")
    with train_ctx():
        token_correct_loss(model(**local).logits, local_labels, mesh).backward()
    grads = summed_gradients(model)
    return max(_relative(grad, reference.get_parameter(name).grad) for name, grad in grads.items())


def test_functional_api_runs_a_hooked_gated_delta_net_exactly() -> None:
    for worst in run_on_ranks(_functional_parity, world_size=2):
        assert worst <= RTOL_GRAD
