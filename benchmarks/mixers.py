"""Sequence mixers under CP: bytes each rank moves per mixer layer, and a GDN hybrid's memory and step time.

The three mechanisms of ``mixer_mode`` run side by side in the same processes, on the same weights and
batches: ``all_to_all`` (sequence shards traded for heads / channels, the model's own convolution and scan
run on whole sequences: Note [mixer all-to-all] in ``lightning_cp/mixers/heads.py``), ``gather`` (the
mixer's input all-gathered, the whole module run on the whole sequence on every rank) and ``state_passing``
(each rank runs its own positions; every segment's state pair and convolution window is all-gathered and
the segments are scanned in the row's order: Note [state passing] in ``lightning_cp/mixers/state_passing.py``).

Bytes. Two models made of mixer layers only (no softmax attention, dense MLPs): a gated delta net (GDN,
Qwen3-Next / Qwen3.5 proportions scaled down: hidden 256, 4 key and 8 value heads of 32, convolution
kernel 4) and a Mamba-2 (hidden 256, 16 heads of 32, one group of 64 states). During one forward and one
backward every ``all_to_all_single``, ``all_gather`` and ``all_reduce`` a rank issues is counted, as the bytes
it sends: an all-to-all of a local tensor of N bytes over cp ranks sends N·(cp−1)/cp (the rest stays), an
all-gather of N local bytes N·(cp−1), an all-reduce of N bytes 2·N·(cp−1)/cp (a bandwidth-optimal ring: the
convention of nccl-tests' bus bandwidth, whatever algorithm gloo or NCCL picks). Divided by the layers.
The forward counts only while a mixer module runs (its CP hooks included), so the step's other collectives
(the batch check, the label count, the loss: a few bytes) are left out; the backward has no others.

Theory per mixer layer and rank, fp32 (4 bytes), B rows of S tokens (padded to a multiple of 2·cp):

    all_to_all, each pass:  4 · B · S/cp · (cp−1)/cp · W
    GDN:      W = 2·(2·Hk·dk + Hv·dv)                 convolution channels, in and out
                + 2·Hk'·dk + Hv·dv + 2·Hv + Hv·dv     scan: q, k, v, g, beta in; output back
    Mamba-2:  W = 2·(H·P + 2·G·N)                     convolution channels (x, B, C), in and out
                + H·P + 2·G'·N + H + H·P              scan: x, B, C, dt in; output back

with Hk' = Hk (G' = G) when cp divides it, else cp (fewer key heads / groups than ranks are repeated before
the trade). The backward trades the gradients of the same tensors the other way: the same bytes again.

    gather:  forward 4 · B · S/cp · d · (cp−1)      all-gather of the mixer's input [B, S/cp, d]
                   + 8 · B · S/cp · (cp−1)          Mamba-2: and of the position_ids (int64) it is handed
             backward 4 · B · S · d · 2·(cp−1)/cp   all-reduce of the gradient of the whole input

    state_passing:  forward 4 · segments · (pair + C·(k−1)) · (cp−1)     all-gather of the pairs and windows
                    backward twice that                                   all-reduce of their gradients
    GDN:      pair = Hv·dk·(dk + dv)      (the transition A, dk×dk, and the state B, dk×dv, per value head)
    Mamba-2:  pair = H·(1 + P·N)          (a decay and a P×N state per head)

per row, with two segments per rank (head/tail), C the convolution's channels and k its kernel: flat in S
(``lightning_cp/mixers/traffic.py``, which ``mixer_mode="auto"`` decides by).

(transformers' Mamba-2 block passes the batch's keyword arguments, ``position_ids`` among them, on to its
mixer, which ignores them; gather gathers every per-token argument with the input, as a whole module may
read them. The GDN decoder layer keeps ``position_ids`` to itself.)

So all_to_all moves 2·(cp−1)/cp²·W per token and falls as 1/cp; gather moves 3·(cp−1)/cp·d and does not.
Where the projections widen the mixer (W ≫ d: here W = 1808 for d = 256; Qwen3-Next-80B, hidden 2048 with
16 key / 32 value heads of 128, has W = 28736), gather moves fewer bytes below cp = 2·W/(3·d), but holds
the mixer's activations and compute for the whole sequence on every rank, which all_to_all divides by cp.

Memory and step time. A GDN hybrid (Qwen3-Next-like: 3 gated delta net layers, then one gated full
attention layer of 8 query / 4 key-value heads, ``cp_mode="auto"``) trains one step (shard + forward +
backward; HF loss) at ``--memory-seq-len`` tokens: plain, without CP, on rank 0 while the other ranks wait
at a barrier, and at cp ranks by all_to_all and by gather. The plain run computes on what one rank has (its
GPU; on CPU its share of the cores, ``run_on_local_ranks``' threads per rank), as it would on one device, so
time / plain is what cp devices buy (ideally 1/cp). The modes take turns every step, in reversed order
every other step. Memory as in ``benchmarks/common.py`` (peak RSS delta on CPU, allocator peak on CUDA;
gradient buffers in the baseline), the maximum over the ranks and the measured steps; time the median over
``--steps`` steps after ``--warmup`` (the slowest rank per step).
The issue's goal: all_to_all memory ≤ 0.55 × plain at cp=2. Losses are compared with plain's.

    python benchmarks/mixers.py                          # CPU, gloo, cp=2: 2k-32k tokens, hybrid at 8k
    python benchmarks/mixers.py --cp 2 4                 # and cp=4
    python benchmarks/mixers.py --device cuda --cp 2 4   # GPUs (NCCL with one GPU per rank)
    python benchmarks/mixers.py --quick                  # tiny sizes: a check that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Mamba2Config, Mamba2ForCausalLM, PreTrainedModel, Qwen3NextConfig, Qwen3NextForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    VOCAB,
    backend_for,
    lm_batch,
    measure_peak_mib,
    print_table,
    rank_device,
    release_freed_memory_to_os,
    save_plot,
)

from lightning_cp.launch import run_on_local_ranks  # noqa: E402
from lightning_cp.mesh import ParallelLayout, build_device_mesh  # noqa: E402
from lightning_cp.mixers.detect import find_sequence_mixers, mixer_traits  # noqa: E402
from lightning_cp.mixers.traffic import MixerTraffic  # noqa: E402
from lightning_cp.session import ContextParallelSession  # noqa: E402
from lightning_cp.sharding.batch import padded_length  # noqa: E402
from lightning_cp.sharding.sequence import ring_pad_multiple  # noqa: E402

FP32_BYTES, INT64_BYTES = 4, 8
MIXER_MODES = ("all_to_all", "gather", "state_passing")
#: Sizes of a full run and of ``--quick``; a size given on the command line wins over both.
FULL = {"seq_lens": [2048, 4096, 8192, 16384, 32768], "memory_seq_len": 8192, "warmup": 1, "steps": 3}
QUICK = {"seq_lens": [256, 512], "memory_seq_len": 512, "warmup": 1, "steps": 2}

# Mixer geometry (see the module docstring). GDN: Qwen3.5-like, scaled down.
HIDDEN = 256
GDN_KEY_HEADS, GDN_VALUE_HEADS, GDN_HEAD_DIM, CONV_KERNEL = 4, 8, 32, 4
# Mamba-2: expand 2, one group (as the Mamba-2 reference models).
MAMBA_HEADS, MAMBA_HEAD_DIM, MAMBA_GROUPS, MAMBA_STATE = 16, 32, 1, 64
# The hybrid's full attention.
ATTENTION_HEADS, ATTENTION_KV_HEADS = 8, 4


def _spread(heads: int, cp: int) -> int:
    """Heads (or groups) traded per all-to-all: repeated up to ``cp`` when cp does not divide them."""
    return heads if heads % cp == 0 else cp


def gdn_width(cp: int) -> int:
    """W of a GDN layer: floats per token one all-to-all pass trades (convolution in, out; scan in, out)."""
    key, value = GDN_KEY_HEADS * GDN_HEAD_DIM, GDN_VALUE_HEADS * GDN_HEAD_DIM
    conv = 2 * key + value
    scan = 2 * _spread(GDN_KEY_HEADS, cp) * GDN_HEAD_DIM + value + 2 * GDN_VALUE_HEADS + value
    return 2 * conv + scan


def mamba2_width(cp: int) -> int:
    """W of a Mamba-2 layer: floats per token one all-to-all pass trades (convolution in, out; scan in, out)."""
    inner = MAMBA_HEADS * MAMBA_HEAD_DIM
    conv = inner + 2 * MAMBA_GROUPS * MAMBA_STATE
    scan = inner + 2 * _spread(MAMBA_GROUPS, cp) * MAMBA_STATE + MAMBA_HEADS + inner
    return 2 * conv + scan


def qwen3_next(device: torch.device, layer_types: list[str], seed: int = 0) -> PreTrainedModel:
    """A Qwen3-Next-shaped model (dense MLPs) with the GDN geometry above and ``layer_types``."""
    torch.manual_seed(seed)
    config = Qwen3NextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=ATTENTION_HEADS,
        num_key_value_heads=ATTENTION_KV_HEADS,
        head_dim=HIDDEN // ATTENTION_HEADS,
        linear_num_key_heads=GDN_KEY_HEADS,
        linear_num_value_heads=GDN_VALUE_HEADS,
        linear_key_head_dim=GDN_HEAD_DIM,
        linear_value_head_dim=GDN_HEAD_DIM,
        linear_conv_kernel_dim=CONV_KERNEL,
        mlp_only_layers=list(range(len(layer_types))),
        num_experts=0,
        max_position_embeddings=1 << 20,
        attention_dropout=0.0,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return Qwen3NextForCausalLM(config).float().to(device)


def mamba2(device: torch.device, layers: int, seed: int = 0) -> PreTrainedModel:
    """A Mamba-2 language model with the geometry above."""
    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_heads=MAMBA_HEADS,
        head_dim=MAMBA_HEAD_DIM,
        expand=MAMBA_HEADS * MAMBA_HEAD_DIM // HIDDEN,
        n_groups=MAMBA_GROUPS,
        state_size=MAMBA_STATE,
        conv_kernel=CONV_KERNEL,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    return Mamba2ForCausalLM(config).float().to(device)


@dataclass(frozen=True)
class Family:
    """A model of mixer layers only, and the theory of what its layers trade."""

    label: str
    build: Callable[[torch.device, int], PreTrainedModel]
    #: W: floats per token one all-to-all pass trades, for a CP size.
    width: Callable[[int], int]
    #: The mixer receives the batch's ``position_ids`` among its keyword arguments (gather gathers them too).
    takes_position_ids: bool


FAMILIES = (
    Family(
        "gated delta net", lambda device, layers: qwen3_next(device, ["linear_attention"] * layers), gdn_width, False
    ),
    Family("Mamba-2", mamba2, mamba2_width, True),
)


def all_to_all_theory(width: int, cp: int, tokens: int) -> float:
    """Bytes one all-to-all pass (forward or backward) sends per layer and rank."""
    return FP32_BYTES * tokens / cp * (cp - 1) / cp * width


def gather_theory(cp: int, tokens: int, position_ids: bool) -> tuple[float, float]:
    """Bytes gather sends per layer and rank: (forward all-gather(s), backward all-reduce)."""
    local, whole = FP32_BYTES * tokens / cp * HIDDEN, FP32_BYTES * tokens * HIDDEN
    ids = INT64_BYTES * tokens / cp if position_ids else 0
    return (local + ids) * (cp - 1), 2 * whole * (cp - 1) / cp


def state_passing_theory(traffic: MixerTraffic, cp: int, rows: int) -> tuple[float, float]:
    """Bytes state passing sends per layer and rank: (forward all-gathers, backward all-reduces)."""
    total = traffic.state_passing_bytes(cp) * rows
    return total / 3, 2 * total / 3


def traffic_of(model: torch.nn.Module) -> MixerTraffic:
    """The :class:`MixerTraffic` of the first sequence mixer of ``model``."""
    name, module = next(iter(find_sequence_mixers(model).items()))
    traffic = mixer_traits(name, module).traffic
    assert traffic is not None
    return traffic


class CollectiveCounter:
    """Counts the bytes this rank sends (conventions in the module docstring) and the calls, by phase and op."""

    def __init__(self) -> None:
        #: ``"forward"`` (inside a mixer), ``"backward"`` or ``"outside"``.
        self.phase = "outside"
        self.bytes: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def clear(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def _add(self, op: str, nbytes: float) -> None:
        self.bytes[self.phase, op] += nbytes
        self.calls[self.phase, op] += 1

    def install(self) -> None:
        """From now on in this process, count every ``all_to_all_single``, ``all_gather`` and ``all_reduce``."""
        all_to_all_single, all_gather, all_reduce = dist.all_to_all_single, dist.all_gather, dist.all_reduce

        def counting_all_to_all_single(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            size = dist.get_world_size(kwargs.get("group"))
            self._add("all_to_all", input.nbytes * (size - 1) / size)
            return all_to_all_single(output, input, *args, **kwargs)

        def counting_all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._add("all_gather", tensor.nbytes * (len(parts) - 1))
            return all_gather(parts, tensor, *args, **kwargs)

        def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            size = dist.get_world_size(kwargs.get("group"))
            self._add("all_reduce", 2 * tensor.nbytes * (size - 1) / size)
            return all_reduce(tensor, *args, **kwargs)

        dist.all_to_all_single = counting_all_to_all_single
        dist.all_gather = counting_all_gather
        dist.all_reduce = counting_all_reduce


def _session(mesh: Any, data_context: Any, model: torch.nn.Module, mixer_mode: str) -> ContextParallelSession:
    session = ContextParallelSession(mesh, data_context, mixer_mode=mixer_mode)
    session.prepare_model(model)
    return session


def count_inside_mixers(model: torch.nn.Module, counter: CollectiveCounter) -> None:
    """Count the forward's collectives only while a sequence mixer of ``model`` runs (its CP hooks included)."""

    def inside(*_: Any) -> None:
        counter.phase = "forward"

    def outside(*_: Any) -> None:
        counter.phase = "outside"

    for module in find_sequence_mixers(model).values():
        module.register_forward_pre_hook(inside, prepend=True)  # before the hook that gathers the input
        module.register_forward_hook(outside)  # after the one that keeps this rank's output


def cp_step(model: torch.nn.Module, session: ContextParallelSession, counter: CollectiveCounter, batch: dict) -> float:
    """Shard ``batch``, forward and backward under CP; return the loss.

    The collectives of sharding (the batch check, the label count), of the forward outside the mixers marked
    by :func:`count_inside_mixers` (the loss) and after the step go to ``counter``'s phase ``"outside"``.
    """
    local = dict(batch)
    counter.phase = "outside"
    with session.step(local):
        loss = model(**local).loss
        counter.phase = "backward"
        loss.backward()
        counter.phase = "outside"
    model.zero_grad(set_to_none=False)
    return loss.item()


def count_bytes(
    args: argparse.Namespace, device: torch.device, mesh: Any, data_context: Any, counter: CollectiveCounter
) -> tuple[dict[tuple[str, str, int], dict], dict[tuple[str, str], str]]:
    """Per family, mode and sequence length the bytes, calls and padded length of one training step; per family
    and mode the session's start-up line."""
    counts: dict[tuple[str, str, int], dict] = {}
    describe: dict[tuple[str, str], str] = {}
    for family in FAMILIES:
        for mode in MIXER_MODES:
            model = family.build(device, args.layers)
            session = _session(mesh, data_context, model, mode)
            count_inside_mixers(model, counter)
            describe[family.label, mode] = session.describe_attention()
            cp = session.cp_mesh.size()
            multiple = ring_pad_multiple(cp, session.load_balance, device)  # what the session pads to
            for seq_len in args.seq_lens:
                counter.clear()
                cp_step(model, session, counter, lm_batch(seq_len, args.batch_size, device))
                counts[family.label, mode, seq_len] = {
                    "bytes": dict(counter.bytes),
                    "calls": dict(counter.calls),
                    "padded_len": padded_length(seq_len, cp, multiple),
                    "traffic": traffic_of(model),
                }
    return counts, describe


def _wait_for_rank_zero() -> None:
    """A barrier that outlasts a long plain step on rank 0 (gloo's default timeout is the group's 120 s)."""
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timedelta(hours=2))
    else:
        dist.barrier()


def plain_step(model: torch.nn.Module, batch: dict) -> float:
    """One forward and backward of the whole batch in this process, no CP; return the loss."""
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=False)
    return loss.item()


def measure_step(step: Callable[[], float], device: torch.device) -> tuple[float, float, float]:
    """Run ``step`` once under :func:`common.measure_peak_mib`; return (peak MiB, seconds, the loss it returned)."""
    losses: list[float] = []
    mib, seconds = measure_peak_mib(lambda: losses.append(step()), device)
    return mib, seconds, losses[0]


def hybrid_steps(
    rank: int,
    args: argparse.Namespace,
    device: torch.device,
    mesh: Any,
    data_context: Any,
    counter: CollectiveCounter,
) -> dict[str, Any]:
    """The GDN hybrid: plain (rank 0), then every mode in turn; per mode this rank's memory, times, losses."""
    layer_types = ["linear_attention"] * 3 + ["full_attention"]
    steps: dict[str, Callable[[dict], float]] = {"plain": partial(plain_step, qwen3_next(device, layer_types))}
    describe = {}
    for mode in MIXER_MODES:
        model = qwen3_next(device, layer_types)
        session = _session(mesh, data_context, model, mode)
        steps[mode] = partial(cp_step, model, session, counter)
        describe[mode] = session.describe_attention()
    results: dict[str, Any] = {name: {"mib": [], "times": [], "losses": []} for name in steps}
    for step in range(args.warmup + args.steps):
        batch = lm_batch(args.memory_seq_len, args.batch_size, device, seed=step)
        for name in list(steps) if step % 2 == 0 else reversed(list(steps)):  # no mode always goes first
            plain = name == "plain"
            if plain and rank != 0:
                _wait_for_rank_zero()
                continue
            mib, seconds, loss = measure_step(partial(steps[name], batch), device)
            if plain:
                _wait_for_rank_zero()
            if step >= args.warmup:
                results[name]["mib"].append(mib)
                results[name]["times"].append(seconds)
            results[name]["losses"].append(loss)
    results["describe"] = describe
    return results


def _worker(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Both parts on this rank: the byte counts, then the hybrid's memory and times."""
    device = rank_device(args.device, rank)
    mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), device)
    counter = CollectiveCounter()
    counter.install()
    counts, describe = count_bytes(args, device, mesh, data_context, counter)
    hybrid = hybrid_steps(rank, args, device, mesh, data_context, counter)
    return {"bytes": counts, "describe": describe, "hybrid": hybrid}


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f}"


def _per_layer(counts: dict[tuple[str, str], float], phase: str, layers: int) -> float:
    return sum(value for (p, _), value in counts.items() if p == phase) / layers


def _calls(counts: dict[tuple[str, str], int], phase: str, layers: int) -> str:
    """E.g. ``8 a2a`` or ``1 gather``: collective calls per layer, by op."""
    short = {"all_to_all": "a2a", "all_gather": "gather", "all_reduce": "reduce"}
    parts = [f"{n / layers:g} {short[op]}" for (p, op), n in sorted(counts.items()) if p == phase]
    return " + ".join(parts) or "–"


def byte_rows(args: argparse.Namespace, cp: int, results: dict) -> list[list[object]]:
    """Per family, sequence length and mode: measured bytes per mixer layer and rank against theory."""
    rows = []
    for family in FAMILIES:
        for seq_len in args.seq_lens:
            for mode in MIXER_MODES:
                result = results[family.label, mode, seq_len]
                tokens = args.batch_size * result["padded_len"]
                if mode == "all_to_all":
                    theory_fwd = theory_bwd = all_to_all_theory(family.width(cp), cp, tokens)
                elif mode == "state_passing":
                    theory_fwd, theory_bwd = state_passing_theory(result["traffic"], cp, args.batch_size)
                else:
                    theory_fwd, theory_bwd = gather_theory(cp, tokens, family.takes_position_ids)
                fwd, bwd = (_per_layer(result["bytes"], phase, args.layers) for phase in ("forward", "backward"))
                rows.append(
                    [
                        family.label,
                        cp,
                        seq_len,
                        mode,
                        _mib(fwd),
                        _mib(bwd),
                        " / ".join(_calls(result["calls"], phase, args.layers) for phase in ("forward", "backward")),
                        _mib(theory_fwd + theory_bwd),
                        f"{(fwd + bwd) / (theory_fwd + theory_bwd):.4f}",
                    ]
                )
    return rows


def hybrid_rows(cp: int, results: list[dict]) -> list[list[object]]:
    """Per mode: memory (max over ranks and steps) and median step time (slowest rank per step) against plain."""
    plain = results[0]["hybrid"]["plain"]
    plain_mib, plain_time = max(plain["mib"]), statistics.median(plain["times"])
    rows = []
    for name in ("plain", *MIXER_MODES):
        ranks = [result["hybrid"][name] for result in (results[:1] if name == "plain" else results)]
        mib = max(m for rank in ranks for m in rank["mib"])
        per_step = [max(times) for times in zip(*(rank["times"] for rank in ranks), strict=True)]
        median = statistics.median(per_step)
        losses = results[0]["hybrid"][name]["losses"]
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, plain["losses"], strict=True))
        rows.append(
            [
                1 if name == "plain" else cp,
                name,
                f"{mib:.0f}",
                f"{mib / plain_mib:.3f}",
                f"{median:.2f}",
                f"{min(per_step):.2f}–{max(per_step):.2f}",
                f"{median / plain_time:.3f}",
                f"{loss_diff:.1e}",
            ]
        )
    return rows


def resolve_sizes(args: argparse.Namespace) -> None:
    """Fill the sizes not given on the command line from ``QUICK`` (``--quick``) or ``FULL``."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.plot is None:
        args.plot = "" if args.quick else str(Path(__file__).with_suffix(".png"))


def draw_plot(args: argparse.Namespace, bytes_table: list[list[object]], hybrid_table: list[list[object]]) -> None:
    """Left: MiB per mixer layer and rank vs sequence length, measured and theory. Right: the hybrid's ratios."""

    def draw(figure: Any) -> None:
        left, right = figure.subplots(1, 2)
        series: dict[tuple[object, ...], list[tuple[int, float, float]]] = defaultdict(list)
        for family, cp, seq_len, mode, fwd, bwd, _, theory, _ in bytes_table:
            series[family, cp, mode].append((seq_len, float(fwd) + float(bwd), float(theory)))
        for (family, cp, mode), points in series.items():
            xs, measured, theory = zip(*points, strict=True)
            marker = {"all_to_all": "o", "gather": "s", "state_passing": "^"}[mode]
            (line,) = left.plot(xs, measured, marker, label=f"{family}, cp={cp}, {mode}")
            left.plot(xs, theory, "-", color=line.get_color(), linewidth=0.8)
        left.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="MiB sent per rank per layer")
        left.set_xticks(args.seq_lens, [str(seq_len) for seq_len in args.seq_lens], fontsize=7)
        left.minorticks_off()
        left.set_title("mixer traffic, fwd+bwd (dots measured, lines theory)", fontsize=9)
        left.legend(fontsize=7)
        labels = [f"cp={row[0]}\n{row[1]}" for row in hybrid_table]
        positions = range(len(hybrid_table))
        left_bars = [p - 0.2 for p in positions]
        right.bar(left_bars, [float(row[3]) for row in hybrid_table], 0.4, label="memory / plain")
        right.bar([p + 0.2 for p in positions], [float(row[6]) for row in hybrid_table], 0.4, label="step time / plain")
        right.axhline(0.55, color="k", linestyle=":", linewidth=0.8, label="goal 0.55")
        right.set_xticks(list(positions), labels, fontsize=7)
        right.set_title(f"GDN hybrid at {args.memory_seq_len} tokens", fontsize=9)
        right.legend(fontsize=7)

    save_plot(args.plot, draw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per rank for NCCL")
    parser.add_argument("--cp", type=int, nargs="+", default=[2], choices=(2, 4))
    parser.add_argument("--seq-lens", type=int, nargs="+", help=f"bytes part (default {FULL['seq_lens']})")
    parser.add_argument("--memory-seq-len", type=int, help=f"the hybrid's tokens (default {FULL['memory_seq_len']})")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--layers", type=int, default=1, help="mixer layers of the bytes part's models")
    parser.add_argument("--warmup", type=int, help=f"hybrid steps left out (default {FULL['warmup']})")
    parser.add_argument("--steps", type=int, help=f"hybrid steps measured (default {FULL['steps']})")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes unless given: {QUICK}")
    parser.add_argument("--plot", help="PNG to write ('' to skip; default next to this script, none with --quick)")
    args = parser.parse_args()
    resolve_sizes(args)

    release_freed_memory_to_os()
    bytes_table, hybrid_table, described = [], [], []
    for cp in args.cp:
        results = run_on_local_ranks(_worker, args, world_size=cp, backend=backend_for(args.device, cp), timeout=7200)
        bytes_table += byte_rows(args, cp, results[0]["bytes"])
        hybrid_table += hybrid_rows(cp, results)
        described += [
            f"cp={cp}, {family} layers, {mode}: {line}" for (family, mode), line in results[0]["describe"].items()
        ]
        described += [f"cp={cp}, hybrid, {mode}: {results[0]['hybrid']['describe'][mode]}" for mode in MIXER_MODES]
    print("\n".join(described) + "\n", flush=True)
    print_table(
        f"Bytes each rank sends per mixer layer, forward / backward (fp32, batch {args.batch_size}, hidden {HIDDEN};"
        " all_to_all theory 4·B·S/cp·(cp−1)/cp·W per pass, W: GDN "
        + ", ".join(f"{gdn_width(cp)} / Mamba-2 {mamba2_width(cp)} at cp={cp}" for cp in args.cp)
        + "; gather theory 4·B·S·d·(cp−1)/cp·(1 + 2), Mamba-2 + 8·B·S·(cp−1)/cp of position ids;"
        " state_passing theory 3·4·B·2·(pair + C·(k−1))·(cp−1))",
        [
            "mixer",
            "cp",
            "sequence",
            "mode",
            "fwd MiB",
            "bwd MiB",
            "calls per layer fwd / bwd",
            "theory MiB",
            "measured / theory",
        ],
        bytes_table,
    )
    print_table(
        f"GDN hybrid (3 gated delta net + 1 full attention layers, hidden {HIDDEN}), one training step at"
        f" {args.memory_seq_len} tokens, {args.device}: peak memory per rank and step time (median of {args.steps}"
        f" after {args.warmup})",
        [
            "cp",
            "mode",
            "peak MiB / rank",
            "memory / plain",
            "median s",
            "min–max s",
            "time / plain",
            "loss vs plain (max rel.)",
        ],
        hybrid_table,
    )
    if args.plot:
        draw_plot(args, bytes_table, hybrid_table)


if __name__ == "__main__":
    main()
