"""Packed rows at the cost of one sequence: memory and time of packed against unpacked training under CP.

One training step (forward + backward, token-correct loss) of the Llama-shaped model on 2 ranks, for
the same tokens given two ways: a packed row of 4 documents (``position_ids`` restarting, Hugging
Face's padding-free convention: lightning_cp's document ring), and one plain sequence (torch's ring).
Memory is measured as ``benchmarks/common.py`` describes, the maximum over the ranks; time is the
fastest of ``--repeats`` steps. Then, without processes, the planner's side on rows of mixed lengths:
attended pairs per rank (max / mean) and the K/V tokens the ring moves with whole-document placement
against per-document head/tail splitting (Note [whole-document placement]).

    python benchmarks/packed.py
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    functional_training_step,
    llama,
    lm_batch,
    measure_peak_mib,
    print_table,
    release_freed_memory_to_os,
    save_plot,
)

import lightning_cp as lcp  # noqa: E402
from lightning_cp.attention.document_ring import plan_document_ring  # noqa: E402
from lightning_cp.launch import run_on_local_ranks  # noqa: E402
from lightning_cp.sharding.batch import next_token_labels  # noqa: E402
from lightning_cp.sharding.packing import (  # noqa: E402
    document_ids,
    next_token_labels_within_documents,
    plan_packed_layout,
)

#: Relative lengths of the 4 documents of a packed row.
DOCUMENT_SHARES = (7, 5, 3, 1)


def document_lengths(seq_len: int) -> list[int]:
    """4 documents of different lengths filling ``seq_len`` tokens."""
    lengths = [seq_len * share // sum(DOCUMENT_SHARES) for share in DOCUMENT_SHARES]
    lengths[0] += seq_len - sum(lengths)
    return lengths


def _batch(seq_len: int, packed: bool) -> dict[str, torch.Tensor]:
    """The same tokens as one packed row of 4 documents, or as one sequence; labels shifted accordingly."""
    batch = lm_batch(seq_len, 1, torch.device("cpu"))
    if not packed:
        return {**batch, "labels": next_token_labels(batch["labels"])}
    lengths = document_lengths(seq_len)
    position_ids = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)
    labels = next_token_labels_within_documents(batch["labels"], document_ids([lengths]))
    return {**batch, "labels": labels, "position_ids": position_ids}


def _worker(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("context_parallel",))
    cp_mesh = mesh["context_parallel"]
    model = llama(torch.device("cpu"), layers=args.layers, hidden=args.hidden, heads=args.heads)
    lcp.attach_context_parallel_hooks(model)

    def train_step(seq_len: int, packed: bool) -> None:
        functional_training_step(model, mesh, cp_mesh, _batch(seq_len, packed))

    def measure(seq_len: int, packed: bool) -> tuple[float, float]:
        runs = [measure_peak_mib(lambda: train_step(seq_len, packed), torch.device("cpu")) for _ in range(args.repeats)]
        result = torch.tensor([max(mib for mib, _ in runs), min(sec for _, sec in runs)], dtype=torch.float64)
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
        return float(result[0]), float(result[1])

    for packed in (False, True):  # warm-up: kernels, gradient buffers, communication buffers
        train_step(args.seq_lens[0], packed)
    return {seq: {packed: measure(seq, packed) for packed in (False, True)} for seq in args.seq_lens}


def mixed_lengths(rng: random.Random, total: int) -> list[int]:
    """A row of ``total`` tokens of long-tailed document lengths: mostly short, a few long."""
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(rng.choice([rng.randint(8, 200)] * 6 + [rng.randint(200, 1500)] * 3 + [rng.randint(1500, 6000)]))
    lengths[-1] -= sum(lengths) - total
    return [length for length in lengths if length]


def placement_rows(args: argparse.Namespace) -> list[list[object]]:
    """Work balance and K/V bytes moved per attention call, whole-document placement against head/tail."""
    kv_bytes_per_token = 2 * max(1, args.heads // 2) * (args.hidden // args.heads) * 4  # K and V, fp32
    rows = []
    for name, make_rows in (
        ("4 documents", lambda seq: [document_lengths(seq)]),
        ("mixed lengths (16 rows)", lambda seq: [mixed_lengths(random.Random(s), seq) for s in range(16)]),
    ):
        for cp in (2, 4):
            lengths = make_rows(8192)
            whole = plan_packed_layout(lengths, cp, True, whole_documents=True)
            head_tail = plan_packed_layout(lengths, cp, True)
            for is_causal in (True, False):
                plans = [plan_document_ring(whole, rank, is_causal) for rank in range(cp)]
                pairs = [plan.attended_pairs for plan in plans]
                moved = sum(plan.received_tokens for plan in plans) * kv_bytes_per_token / 2**20
                uniform = sum(plan_document_ring(head_tail, r, is_causal).received_tokens for r in range(cp))
                uniform_mib = uniform * kv_bytes_per_token / 2**20
                rows.append(
                    [
                        name,
                        cp,
                        "causal" if is_causal else "bidirectional",
                        f"{max(pairs) / (sum(pairs) / cp):.3f}",
                        f"{whole.padded_len / head_tail.padded_len:.3f}",
                        f"{moved:.2f}",
                        f"{uniform_mib:.2f}",
                        f"{moved / uniform_mib:.2f}" if uniform_mib else "-",
                    ]
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="steps measured per point (fastest time, peak memory)")
    parser.add_argument("--plot", default="benchmarks/packed.png", help="PNG to write ('' to skip)")
    args = parser.parse_args()

    release_freed_memory_to_os()
    sweep = run_on_local_ranks(_worker, args, world_size=2, timeout=7200)[0]
    rows = []
    for seq in args.seq_lens:
        (mib_u, sec_u), (mib_p, sec_p) = sweep[seq][False], sweep[seq][True]
        memory = [f"{mib_u:.0f}", f"{mib_p:.0f}", f"{mib_p / mib_u:.2f}"]
        rows.append([seq, *memory, f"{sec_u:.2f}", f"{sec_p:.2f}", f"{sec_p / sec_u:.2f}"])
    print_table(
        "Packed (4 documents) against unpacked, one training step, cp=2 (cpu, gloo, per rank)",
        ["tokens", "unpacked MiB", "packed MiB", "packed / unpacked", "unpacked s", "packed s", "packed / unpacked"],
        rows,
    )
    print_table(
        "Whole-document placement against per-document head/tail, 8192 tokens per row, K/V per attention call",
        ["rows", "cp", "attention", "pairs max/mean", "tokens / head-tail", "K,V MiB moved", "head/tail MiB", "ratio"],
        placement_rows(args),
    )
    if args.plot:

        def draw(figure: object) -> None:
            left, right = figure.subplots(1, 2)
            for index, label in ((0, "memory"), (1, "time")):
                ratios = [sweep[s][True][index] / sweep[s][False][index] for s in args.seq_lens]
                left.plot(args.seq_lens, ratios, "o-", label=label)
            left.axhline(1.0, color="grey", lw=0.5)
            left.set(xlabel="tokens", ylabel="packed / unpacked", title="packed / unpacked, cp=2")
            left.legend()
            for packed, label in ((False, "unpacked"), (True, "packed")):
                right.plot(args.seq_lens, [sweep[s][packed][0] for s in args.seq_lens], "o-", label=label)
            right.set(xlabel="tokens", ylabel="peak MiB per rank", yscale="log", title="memory per rank")
            right.legend()
            for axes in (left, right):
                axes.set_xscale("log")
                axes.set_xticks(args.seq_lens, [f"{seq // 1024}k" for seq in args.seq_lens])
                axes.minorticks_off()

        save_plot(args.plot, draw)


if __name__ == "__main__":
    main()
