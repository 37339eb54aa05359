"""``mixer_mode="state_passing"``: gated delta nets and Mamba-2 stitched across ranks by their states, exact.

Every gated delta net and Mamba-2 family of :mod:`mixer_zoo` (and LFM2's short convolution, carried by the
halo alone) runs on real gloo ranks against one plain process, plain and packed rows, loss and every gradient
(Note [state passing] in ``lightning_cp/mixers/state_passing.py``). The negative controls take one piece of
the mechanism away each — the incoming states, the convolution's halo, the order of the scan — and some
gradient must then be far off. Families state passing cannot run are refused on every rank.
"""

from __future__ import annotations

import pytest
import torch
from distributed_harness import new_process_groups_destroyed, run_on_ranks
from test_mixers import RTOL_GRAD, RTOL_LOSS, _case

from lightning_cp.mixers import state_passing

#: Families state passing runs: gated delta nets, Mamba-2 (SSD) and a short convolution alone.
GATED_DELTA = ("qwen3_next", "qwen3_5", "olmo_hybrid")
MAMBA2 = ("nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "mamba2")
FAMILIES = (*GATED_DELTA, *MAMBA2, "lfm2")
#: Families run on packed rows: granitemoehybrid's packed rows differ from the plain model's under every mechanism
#: (``mixer_mode="gather"`` and ``"all_to_all"`` alike: its NoPE attention, not its mixer).
PACKED = tuple(family for family in FAMILIES if family != "granitemoehybrid")
#: Families it refuses: Mamba-1, RG-LRU, Kimi delta attention, lightning attention.
REFUSED = ("jamba", "recurrent_gemma", "kimi_linear", "minimax")


def _zero_state(transitions: torch.Tensor, offsets: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.zeros_like(offsets[0])


def _rank_order(segments: state_passing.Segments) -> list[list[tuple[int, int]]]:
    ranks, rows = segments.starts.size(0), segments.starts.size(1)
    return [
        [
            (r, j)
            for r in range(ranks)
            for j in range(segments.count)
            if segments.ends[r, row, j] > segments.starts[r, row, j]
        ]
        for row in range(rows)
    ]


#: Negative controls: what each takes away from the mechanism.
CONTROLS = {
    "zero_state": ("incoming_states", _zero_state),
    "no_halo": (
        "conv_halo",
        lambda windows, segments, width, rank: torch.zeros_like(windows.narrow(2, 0, segments.count * width)),
    ),
    "rank_order": ("scan_order", _rank_order),
}


def _cases(rank: int, world_size: int, cases: list[tuple]) -> dict:
    results = {}
    for case in cases:
        control = CONTROLS.get(case[-1])
        saved = getattr(state_passing, control[0]) if control else None
        if control:
            setattr(state_passing, control[0], control[1])
        try:
            with new_process_groups_destroyed():
                results[case] = _case(rank, world_size, *case[:-1], "none" if control else case[-1])
        finally:
            if control:
                setattr(state_passing, control[0], saved)
    return results


#: (family, mixer_mode, seq_len, packed, bypass or control) at cp=2.
CP2_CASES = [
    *[(family, "state_passing", 64, False, "none") for family in FAMILIES],
    *[(family, "state_passing", 64, True, "none") for family in PACKED],
    ("mamba2", "state_passing", 61, False, "none"),
    ("qwen3_next", "state_passing", 64, False, "cache"),
    *[(family, "state_passing", 64, False, "none") for family in REFUSED],
    ("qwen3_next", "state_passing", 64, False, "zero_state"),
    ("nemotron_h", "state_passing", 64, False, "zero_state"),
    ("qwen3_next", "state_passing", 64, False, "no_halo"),
    ("bamba", "state_passing", 64, False, "no_halo"),
    ("qwen3_next", "state_passing", 64, False, "rank_order"),
    ("mamba2", "state_passing", 64, False, "rank_order"),
]


@pytest.fixture(scope="module")
def cp2_results() -> list[dict]:
    return run_on_ranks(_cases, CP2_CASES, world_size=2, timeout=600)


def _assert_parity(rank_results: list[dict], case: tuple) -> None:
    for results in rank_results:
        result = results[case]
        assert "refused" not in result, result.get("refused")
        assert result["loss"] <= RTOL_LOSS, (case, result)
        assert result["grad"] <= RTOL_GRAD, f"{case} {result['worst']}: {result['grad']:.1e}"
        assert not result["missing"]
    assert "by state_passing" in rank_results[0][case]["line"]


@pytest.mark.parametrize("case", [c for c in CP2_CASES if c[-1] in ("none", "cache") and c[0] not in REFUSED], ids=str)
def test_state_passing_parity_cp2(cp2_results: list[dict], case: tuple) -> None:
    _assert_parity(cp2_results, case)


@pytest.mark.parametrize("case", [c for c in CP2_CASES if c[-1] in CONTROLS], ids=str)
def test_state_passing_negative_controls_fail(cp2_results: list[dict], case: tuple) -> None:
    """Zero incoming states, no halo, or the segments scanned in rank order: some gradient is far off."""
    result = cp2_results[0][case]
    assert "refused" not in result, result.get("refused")
    assert result["grad"] > 1e-2, result


@pytest.mark.parametrize("family", REFUSED)
def test_state_passing_refuses_what_it_cannot_run_on_every_rank(cp2_results: list[dict], family: str) -> None:
    for results in cp2_results:
        message = results[(family, "state_passing", 64, False, "none")]["refused"]
        assert "mixer_mode='state_passing' cannot run this model exactly" in message, message
        assert "'all_to_all' or 'gather'" in message


@pytest.mark.slow
def test_state_passing_parity_cp4() -> None:
    """Four ranks (eight head/tail segments per row), plain and packed rows."""
    cases = [(family, "state_passing", 64, False, "none") for family in FAMILIES]
    cases += [(family, "state_passing", 64, True, "none") for family in PACKED]
    results = run_on_ranks(_cases, cases, world_size=4, timeout=600)
    for case in cases:
        _assert_parity(results, case)
