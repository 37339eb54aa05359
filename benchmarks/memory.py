"""Peak memory per rank vs sequence length at cp=1 and cp=2, and the longest sequence under a budget.

Both runs train the same Llama-shaped model on the same global sequences (one forward + backward,
token-correct loss); cp=2 runs on two processes, each holding half of every sequence. Memory is
measured as described in ``benchmarks/common.py`` (peak RSS delta on CPU, allocator peak on CUDA),
as the maximum over the ranks.

    python benchmarks/memory.py                      # CPU, gloo
    python benchmarks/memory.py --device cuda        # GPUs (NCCL with one GPU per rank)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    backend_for,
    functional_training_step,
    llama,
    lm_batch,
    measure_peak_mib,
    print_table,
    rank_device,
    release_freed_memory_to_os,
    save_plot,
)

import lightning_cp as lcp  # noqa: E402
from lightning_cp.launch import run_on_local_ranks  # noqa: E402
from lightning_cp.sharding.batch import next_token_labels  # noqa: E402


def _worker(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    device = rank_device(args.device, rank)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("context_parallel",))
    cp_mesh = mesh["context_parallel"]
    model = llama(device, layers=args.layers, hidden=args.hidden)
    lcp.attach_context_parallel_hooks(model)

    def train_step(seq_len: int) -> None:
        batch = lm_batch(seq_len, args.batch_size, device)
        batch["labels"] = next_token_labels(batch["labels"])
        functional_training_step(model, mesh, cp_mesh, batch)

    def peak_over_ranks(seq_len: int) -> tuple[float, float]:
        mib, seconds = measure_peak_mib(lambda: train_step(seq_len), device)
        result = torch.tensor([mib, seconds], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
        return float(result[0]), float(result[1])

    train_step(args.granularity)  # warm-up: kernels, gradient buffers, communication buffers
    sweep = {seq: peak_over_ranks(seq) for seq in args.seq_lens}

    fits = {seq: mib <= args.budget_mib for seq, (mib, _) in sweep.items()}
    low = max([seq for seq, ok in fits.items() if ok], default=args.granularity)
    high = min([seq for seq, ok in fits.items() if not ok], default=None)
    while high is None and low < args.max_seq:  # grow until over budget
        probe = min(2 * low, args.max_seq)
        if peak_over_ranks(probe)[0] <= args.budget_mib:
            low = probe
        else:
            high = probe
    while high is not None and high - low > args.granularity:
        probe = (low + high) // 2 // args.granularity * args.granularity
        if peak_over_ranks(probe)[0] <= args.budget_mib:
            low = probe
        else:
            high = probe
    return {"sweep": sweep, "longest": low}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--budget-mib", type=float, default=600.0, help="per-rank budget for the bisection")
    parser.add_argument("--granularity", type=int, default=1024, help="bisection step, in tokens")
    parser.add_argument("--max-seq", type=int, default=131072)
    parser.add_argument("--plot", default="benchmarks/memory.png", help="PNG to write ('' to skip)")
    args = parser.parse_args()

    release_freed_memory_to_os()
    runs = {}
    for cp in (1, 2):
        results = run_on_local_ranks(_worker, args, world_size=cp, backend=backend_for(args.device, cp), timeout=3600)
        runs[cp] = results[0]
    rows = []
    for seq in args.seq_lens:
        (mib1, sec1), (mib2, sec2) = runs[1]["sweep"][seq], runs[2]["sweep"][seq]
        rows.append([seq, f"{mib1:.0f}", f"{mib2:.0f}", f"{mib2 / mib1:.2f}", f"{sec1:.1f}", f"{sec2:.1f}"])
    print_table(
        f"Peak memory per rank, one training step ({args.device}, batch {args.batch_size})",
        ["sequence", "cp=1 MiB", "cp=2 MiB/rank", "cp=2 / cp=1", "cp=1 s", "cp=2 s"],
        rows,
    )
    longest1, longest2 = runs[1]["longest"], runs[2]["longest"]
    print_table(
        f"Longest trainable sequence within {args.budget_mib:.0f} MiB per rank (±{args.granularity} tokens)",
        ["cp=1", "cp=2", "cp=2 / cp=1"],
        [[longest1, longest2, f"{longest2 / longest1:.2f}"]],
    )
    if args.plot:

        def draw(figure: object) -> None:
            left, right = figure.subplots(1, 2)
            for cp in (1, 2):
                left.plot(args.seq_lens, [runs[cp]["sweep"][s][0] for s in args.seq_lens], "o-", label=f"cp={cp}")
            left.set(xlabel="sequence length", ylabel="peak MiB per rank", xscale="log", title="memory per rank")
            left.legend()
            right.bar(["cp=1", "cp=2"], [longest1, longest2])
            right.set(ylabel="tokens", title=f"longest sequence in {args.budget_mib:.0f} MiB/rank")

        save_plot(args.plot, draw)


if __name__ == "__main__":
    main()
