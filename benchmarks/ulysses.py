"""Ulysses and the hybrid next to torch's ring: bytes each rank sends per attention layer, and step time.

Every mode trains the same Llama-shaped model (same weights, same batches) through
``ContextParallelSession`` in the same processes, step by step in turn: at cp=2 the ring and Ulysses,
at cp=4 the ring, Ulysses and the hybrid (Ulysses groups of 2 ranks, the ring across the 2 groups).

Bytes. Every ``torch.distributed.all_to_all_single`` call (Ulysses' trades) is counted during one
training step: an all-to-all of a tensor of N bytes over u ranks sends N·(u−1)/u to the others (the
rest stays on the rank). Theory per attention layer and rank, forward: q, k, v in and the output back,

    B · (2·Hq + 2·Hkv') · D · S/cp · bytes · (u−1)/u,    Hkv' = max(Hkv, u)

(key/value heads fewer than the Ulysses ranks are repeated before the trade); the backward trades the
gradients of the same four tensors, the same bytes again. The ring's traffic (the hybrid's ring across
the groups included) is counted inside torch's rotaters (``common.count_ring_rotations``, as in
``ring_bytes.py``): K/V received, against 2·(r−1)/r·|K,V| for r ring ranks and the K/V of the heads a
rank holds, and the K/V gradients passed back round the ring. A run of Ulysses over 4 ranks with 2
key/value heads (bytes only) checks the repeated heads. fp32 (on CUDA, fp32 grouped-query attention
makes the ring move K/V repeated to the query heads: see the README).

Step time: shard + forward + backward of one training step (gradient averaging and the optimizer, the
same for every mode, are left out), median of ``--steps`` steps after ``--warmup``, and its ratio to
the ring's at the same cp; the modes take turns every step, in reversed order every other step. Also
the CPU time rank 0's process spent on the step (all its threads), which other jobs on a shared machine
disturb less than the wall clock. The losses of all modes are compared with the ring's (parity check).

    python benchmarks/ulysses.py --seq-len 8192
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    backend_for,
    count_ring_rotations,
    llama,
    lm_batch,
    print_table,
    rank_device,
    save_plot,
    synchronized_time,
)

from lightning_cp.launch import run_on_local_ranks  # noqa: E402
from lightning_cp.mesh import ParallelLayout, build_device_mesh  # noqa: E402
from lightning_cp.session import ContextParallelSession  # noqa: E402

FP32_BYTES = 4


@dataclass(frozen=True)
class Mode:
    """One way of running attention in a benchmark run."""

    label: str
    cp_mode: str
    ulysses_size: int | None = None
    #: Key/value heads of this mode's model (``None``: ``--kv-heads``).
    kv_heads: int | None = None
    #: Timed over every step; otherwise one step, for its bytes only.
    timed: bool = True


def modes_for(cp: int) -> list[Mode]:
    """The modes measured side by side at ``cp`` ranks."""
    modes = [Mode("ring", "ring"), Mode("ulysses", "ulysses")]
    if cp == 4:
        modes += [
            Mode("hybrid 2×2", "hybrid", ulysses_size=2),
            Mode("ulysses, 2 kv heads", "ulysses", kv_heads=2, timed=False),
        ]
    return modes


def _count_all_to_alls(counts: dict[str, int], phase: dict[str, str]) -> None:
    """From now on in this process, add what each ``all_to_all_single`` sends to other ranks to ``counts[phase]``."""
    all_to_all_single = dist.all_to_all_single

    def counting_all_to_all_single(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        size = dist.get_world_size(kwargs.get("group"))
        counts[phase["name"]] += input.nbytes * (size - 1) // size
        return all_to_all_single(output, input, *args, **kwargs)

    dist.all_to_all_single = counting_all_to_all_single


def _worker(rank: int, world_size: int, args: argparse.Namespace, modes: list[Mode]) -> dict[str, dict]:
    """Train every mode in turn on the same batches; return per mode its step times, losses and step-0 bytes."""
    device = rank_device(args.device, rank)
    mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), device)
    phase = {"name": "forward"}
    all_to_all: dict[str, int] = defaultdict(int)
    ring: dict[str, int] = defaultdict(int)
    _count_all_to_alls(all_to_all, phase)
    count_ring_rotations(ring)
    runs = []
    for mode in modes:
        model = llama(device, args.layers, args.hidden, args.heads, kv_heads=mode.kv_heads or args.kv_heads)
        session = ContextParallelSession(mesh, data_context, cp_mode=mode.cp_mode, ulysses_size=mode.ulysses_size)
        session.prepare_model(model)
        runs.append((mode, model, session))
    results: dict[str, dict] = {mode.label: {"times": [], "cpu_times": [], "losses": []} for mode in modes}
    for step in range(args.warmup + args.steps):
        batch = lm_batch(args.seq_len, args.batch_size, device, seed=step)
        for mode, model, session in runs if step % 2 == 0 else reversed(runs):  # neither mode always goes first
            if step and not mode.timed:
                continue
            all_to_all.clear()
            ring.clear()
            local = dict(batch)
            start, cpu_start = synchronized_time(device), time.process_time()
            with session.step(local):
                phase["name"] = "forward"
                loss = model(**local).loss
                phase["name"] = "backward"
                loss.backward()
            elapsed, cpu_elapsed = synchronized_time(device) - start, time.process_time() - cpu_start
            model.zero_grad(set_to_none=True)
            result = results[mode.label]
            result["times"].append(elapsed)
            result["cpu_times"].append(cpu_elapsed)
            result["losses"].append(loss.item())
            if step == 0:
                result.update(
                    all_to_all=dict(all_to_all),
                    ring=dict(ring),
                    padded_len=local["input_ids"].size(1) * world_size,
                    ulysses_size=session.mechanism.ulysses_size,
                    describe=session.describe_attention(),
                )
    return results


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def byte_rows(args: argparse.Namespace, cp: int, modes: list[Mode], results: dict[str, dict]) -> list[list[object]]:
    """One row per mode: measured bytes per attention layer and rank against theory."""
    rows = []
    head_dim = args.hidden // args.heads
    for mode in modes:
        result = results[mode.label]
        u, kv_heads = result["ulysses_size"], mode.kv_heads or args.kv_heads
        spread = max(kv_heads, u)
        tokens = args.batch_size * result["padded_len"]
        traded = (2 * args.heads + 2 * spread) * head_dim * tokens // cp * FP32_BYTES * (u - 1) / u
        fwd, bwd = (result["all_to_all"].get(key, 0) / args.layers for key in ("forward", "backward"))
        r = cp // u
        kv_held = 2 * (spread // u) * head_dim * tokens * FP32_BYTES
        ring_theory = 2 * (r - 1) / r * kv_held
        ring_kv = (result["ring"].get("forward_kv", 0) + result["ring"].get("backward_kv", 0)) / args.layers
        dkv = result["ring"].get("dkv", 0) / args.layers
        rows.append(
            [
                cp,
                mode.label,
                f"{args.heads} / {kv_heads}" + (f" → {spread}" if spread != kv_heads else ""),
                _mib(fwd),
                _mib(bwd),
                _mib(traded),
                f"{(fwd + bwd) / (2 * traded):.3f}" if traded else "–",
                _mib(ring_kv),
                _mib(ring_theory),
                f"{ring_kv / ring_theory:.3f}" if ring_theory else "–",
                _mib(dkv),
                _mib(fwd + bwd + ring_kv + dkv),
            ]
        )
    return rows


def time_rows(args: argparse.Namespace, cp: int, modes: list[Mode], results: dict[str, dict]) -> list[list[object]]:
    """One row per timed mode: step time (median, range) and CPU time against the ring's, and the loss difference."""
    ring = results["ring"]
    ring_median, ring_cpu = (statistics.median(ring[key][args.warmup :]) for key in ("times", "cpu_times"))
    rows = []
    for mode in modes:
        if not mode.timed:
            continue
        result = results[mode.label]
        measured = result["times"][args.warmup :]
        median = statistics.median(measured)
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], ring["losses"], strict=True))
        cpu = statistics.median(result["cpu_times"][args.warmup :])
        rows.append(
            [
                cp,
                mode.label,
                f"{median:.2f}",
                f"{min(measured):.2f}–{max(measured):.2f}",
                f"{median / ring_median:.3f}",
                f"{cpu:.2f}",
                f"{cpu / ring_cpu:.3f}",
                f"{loss_diff:.1e}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per rank for NCCL")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4], choices=(2, 4))
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="measured steps (median reported)")
    parser.add_argument("--plot", default="benchmarks/ulysses.png", help="PNG to write ('' to skip)")
    args = parser.parse_args()

    bytes_table, times_table, described = [], [], []
    for cp in args.cp:
        modes = modes_for(cp)
        results = run_on_local_ranks(
            _worker, args, modes, world_size=cp, backend=backend_for(args.device, cp), timeout=1800
        )[0]
        bytes_table += byte_rows(args, cp, modes, results)
        times_table += time_rows(args, cp, modes, results)
        described += [f"cp={cp}, {mode.label}: {results[mode.label]['describe']}" for mode in modes]
    print("\n".join(described) + "\n", flush=True)
    print_table(
        f"Bytes each rank sends per attention layer (sequence {args.seq_len}, batch {args.batch_size}, fp32,"
        f" head dim {args.hidden // args.heads}); all-to-all theory B·(2Hq+2Hkv')·D·S/cp·4·(u−1)/u per pass",
        [
            "cp",
            "mode",
            "q / kv heads",
            "all-to-all fwd MiB",
            "all-to-all bwd MiB",
            "theory per pass MiB",
            "measured / theory",
            "ring K,V fwd+bwd MiB",
            "ring theory MiB",
            "ring measured / theory",
            "ring dK,dV MiB",
            "total MiB",
        ],
        bytes_table,
    )
    print_table(
        f"Step time (shard + forward + backward), sequence {args.seq_len}, median of {args.steps} steps after"
        f" {args.warmup}",
        ["cp", "mode", "median s", "min–max s", "/ ring", "CPU s (rank 0)", "CPU / ring", "loss vs ring (max rel.)"],
        times_table,
    )
    if args.plot:

        def draw(figure: Any) -> None:
            left, right = figure.subplots(1, 2)
            labels = [f"cp={row[0]}\n{row[1]}" for row in bytes_table]
            positions = range(len(bytes_table))
            measured = [float(row[3]) + float(row[4]) for row in bytes_table]
            ring = [float(row[7]) + float(row[10]) for row in bytes_table]
            left.bar(positions, measured, 0.6, label="all-to-all (fwd+bwd)")
            left.bar(positions, ring, 0.6, bottom=measured, label="ring K,V + dK,dV")
            left.plot(positions, [2 * float(row[5]) for row in bytes_table], "k_", markersize=20, label="a2a theory")
            left.set_xticks(list(positions), labels, fontsize=7, rotation=30)
            left.set(ylabel="MiB sent per rank per layer", title="traffic per attention layer")
            left.legend(fontsize=8)
            right.bar(range(len(times_table)), [float(row[2]) for row in times_table], 0.6)
            right.set_xticks(
                range(len(times_table)), [f"cp={row[0]}\n{row[1]}" for row in times_table], fontsize=7, rotation=30
            )
            right.set(ylabel="seconds (median)", title=f"step time, sequence {args.seq_len}")

        save_plot(args.plot, draw)


if __name__ == "__main__":
    main()
