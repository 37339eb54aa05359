"""Peak step memory with the long-context memory options (issue 15), against one plain process.

A Llama-shaped model with a realistic vocabulary (4 layers, hidden 256, 4 heads / 2 KV heads, vocab
32000), one row of tokens, one training step (forward + backward, token-correct loss, the functional
API as in ``benchmarks/memory.py``). Memory is measured as described in ``benchmarks/common.py`` (peak
RSS delta on CPU, allocator peak on CUDA), the maximum over the ranks, and printed next to the planner's
prediction (:mod:`lightning_cp.planner`). Three measurements, same data:

- one step at ``--seq-len`` tokens: plain one process (no CP), cp=2, cp=2 + chunked loss, cp=2 + chunked
  loss + activation checkpointing; the losses must agree (fp32);
- the loss stage alone in one process, from given hidden states: full ``lm_head`` + cross-entropy against
  the chunked loss (forward and backward of both);
- the longest sequence whose step fits ``--budget-mib`` per rank (bisection), plain one process against
  cp=2 with both options.

    python benchmarks/memory_options.py                  # CPU, gloo
    python benchmarks/memory_options.py --device cuda    # GPUs (NCCL with one GPU per rank)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
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
from lightning_cp.chunked_loss import DEFAULT_CHUNK_TOKENS, chunked_causal_lm_loss  # noqa: E402
from lightning_cp.launch import run_on_local_ranks  # noqa: E402
from lightning_cp.planner import ModelShape, fixed_bytes, longest_sequence, step_bytes  # noqa: E402
from lightning_cp.sharding.batch import next_token_labels  # noqa: E402

PLAIN = "plain, one process"


def _cp_runs(args: argparse.Namespace) -> list[tuple[str, int | None, bool]]:
    """The cp=2 runs, (name, tokens per chunk or None, activation checkpointing): the options added one by one."""
    runs: list[tuple[str, int | None, bool]] = [("cp=2", None, False)]
    for chunk in args.chunk_tokens:
        runs.append((f"cp=2 + chunked_loss ({chunk})", chunk, False))
        runs.append((f"cp=2 + chunked_loss ({chunk}) + activation_checkpointing", chunk, True))
    return runs


def _model(device: torch.device, args: argparse.Namespace, chunk: int | None, checkpointing: bool) -> nn.Module:
    """The benchmark's model (same weights every time) with the memory options applied."""
    model = llama(device, layers=args.layers, hidden=args.hidden, vocab=args.vocab)
    lcp.apply_memory_options(model, chunked_loss=chunk or False, activation_checkpointing=checkpointing)
    return model


def _labelled_batch(seq_len: int, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """One row of random tokens with next-token labels (shifted before any sharding)."""
    batch = lm_batch(seq_len, 1, device, vocab=args.vocab)
    batch["labels"] = next_token_labels(batch["labels"])
    return batch


def _measure(step: Callable[[], float], device: torch.device) -> tuple[float, float, float]:
    """(peak MiB, seconds, loss) of one ``step``, the memory and time as the maximum over the ranks."""
    losses = []
    mib, seconds = measure_peak_mib(lambda: losses.append(step()), device)
    result = torch.tensor([mib, seconds], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return float(result[0]), float(result[1]), losses[0]


def _longest(
    step: Callable[[int], float], device: torch.device, start: int, granularity: int, args: argparse.Namespace
) -> int:
    """The longest sequence (a multiple of ``granularity``) whose step fits the budget, by doubling then bisection."""

    def fits(seq_len: int) -> bool:
        return _measure(lambda: step(seq_len), device)[0] <= args.budget_mib

    low, high = 0, start
    while high <= args.max_seq and fits(high):  # grow until over budget
        low, high = high, 2 * high
    while high - low > granularity:
        probe = (low + high) // 2 // granularity * granularity
        low, high = (probe, high) if fits(probe) else (low, probe)
    return low


def _loss_stage(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_tokens: int | None) -> float:
    """Logits + causal-LM loss (Hugging Face's) + backward from given hidden states: full ``lm_head``, or chunked.

    No reference to the full logits is kept past the loss, as in a model's forward.
    """
    if chunk_tokens is None:
        loss = chunked_causal_lm_loss(head(hidden), labels, head.out_features, shift_labels=labels)
    else:
        logits = lcp.chunked_logits(hidden, head, chunk_tokens)
        loss = chunked_causal_lm_loss(logits, labels, head.out_features, shift_labels=labels)
    loss.backward()
    return loss.item()


def _plain_worker(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    """One process, no CP: the plain step, the loss stage alone, and the longest plain sequence."""
    device = rank_device(args.device, rank)
    model = _model(device, args, chunk=None, checkpointing=False)

    def train_step(seq_len: int) -> float:
        batch = _labelled_batch(seq_len, args, device)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"]).loss
        loss.backward()
        model.zero_grad(set_to_none=False)  # gradient buffers stay allocated: part of the baseline
        return loss.item()

    train_step(args.granularity)  # warm-up: kernels, gradient buffers
    results = {PLAIN: _measure(lambda: train_step(args.seq_len), device)}

    torch.manual_seed(1)
    head = nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    hidden = torch.randn(args.seq_len, args.hidden, device=device, requires_grad=True)
    labels = _labelled_batch(args.seq_len, args, device)["labels"][0]
    stage = {}
    for name, chunk in [("full", None)] + [(f"chunked ({chunk})", chunk) for chunk in args.chunk_tokens]:
        _loss_stage(hidden[: args.granularity], head, labels[: args.granularity], chunk)  # warm-up, .grad buffers
        stage[name] = _measure(lambda chunk=chunk: _loss_stage(hidden, head, labels, chunk), device)
    longest = _longest(train_step, device, args.plain_granularity, args.plain_granularity, args)
    return {"steps": results, "loss_stage": stage, "longest": longest}


def _cp_worker(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    """cp ranks: the step with each option set, and the longest sequence with both options."""
    device = rank_device(args.device, rank)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("context_parallel",))
    cp_mesh = mesh["context_parallel"]
    results = {}
    for name, chunk, checkpointing in _cp_runs(args):
        model = _model(device, args, chunk, checkpointing)
        lcp.attach_context_parallel_hooks(model)

        def train_step(seq_len: int, model: nn.Module = model) -> float:
            loss = functional_training_step(model, mesh, cp_mesh, _labelled_batch(seq_len, args, device))
            return lcp.reduce_loss(loss, cp_mesh).item()

        train_step(args.granularity)  # warm-up
        results[name] = _measure(lambda train_step=train_step: train_step(args.seq_len), device)
    longest = _longest(train_step, device, args.seq_len, args.granularity, args)  # the last run: both options
    return {"steps": results, "longest": longest}


def _predictions(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, int]]:
    """The planner's step MiB per run at ``--seq-len`` and its longest sequences within ``--budget-mib``."""
    shape = ModelShape.from_config(llama(torch.device("meta"), args.layers, args.hidden, vocab=args.vocab).config)
    budget = int(args.budget_mib * 2**20) + fixed_bytes(shape)  # the benchmark's budget is for the step alone
    options = {PLAIN: (1, None, False)}  # name: (cp, tokens per chunk or None, activation checkpointing)
    options.update({name: (2, chunk, ckpt) for name, chunk, ckpt in _cp_runs(args)})
    mib = {
        name: step_bytes(shape, math.ceil(args.seq_len / cp), chunk, ckpt) / 2**20
        for name, (cp, chunk, ckpt) in options.items()
    }
    longest = {}
    for name in (PLAIN, _cp_runs(args)[-1][0]):
        cp, chunk, ckpt = options[name]
        longest[name] = longest_sequence(shape, cp, budget, chunk, ckpt)
    return mib, longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        nargs="+",
        default=[DEFAULT_CHUNK_TOKENS, 256],
        help="tokens per chunk of the chunked loss, one set of runs each (the last one is bisected)",
    )
    parser.add_argument("--budget-mib", type=float, default=768.0, help="per-rank step budget for the bisection")
    parser.add_argument("--granularity", type=int, default=1024, help="bisection step of the cp=2 run, in tokens")
    parser.add_argument("--plain-granularity", type=int, default=256, help="bisection step of the plain run")
    parser.add_argument("--max-seq", type=int, default=65536)
    parser.add_argument("--plot", default="benchmarks/memory_options.png", help="PNG to write ('' to skip)")
    args = parser.parse_args()

    release_freed_memory_to_os()
    plain = run_on_local_ranks(_plain_worker, args, world_size=1, backend=backend_for(args.device, 1), timeout=3600)
    cp = run_on_local_ranks(_cp_worker, args, world_size=2, backend=backend_for(args.device, 2), timeout=3600)
    steps = {**plain[0]["steps"], **cp[0]["steps"]}
    predicted, predicted_longest = _predictions(args)
    base = steps[PLAIN][0]
    print_table(
        f"Peak memory of one training step, {args.seq_len} tokens, vocab {args.vocab} ({args.device}, max over ranks)",
        ["run", "MiB/rank", "/ plain", "planner MiB", "measured / planner", "loss", "s"],
        [
            [
                name,
                f"{mib:.0f}",
                f"{mib / base:.3f}",
                f"{predicted[name]:.0f}",
                f"{mib / predicted[name]:.2f}",
                f"{loss:.6f}",
                f"{seconds:.1f}",
            ]
            for name, (mib, seconds, loss) in steps.items()
        ],
    )
    stage = plain[0]["loss_stage"]
    full = stage["full"][0]
    print_table(
        f"Loss stage alone (logits + loss + backward from hidden states), {args.seq_len} tokens, one process",
        ["loss stage", "MiB", "/ full", "loss"],
        [[name, f"{mib:.0f}", f"{mib / full:.3f}", f"{loss:.6f}"] for name, (mib, _, loss) in stage.items()],
    )
    longest_plain, longest_cp = plain[0]["longest"], cp[0]["longest"]
    last = _cp_runs(args)[-1][0]
    ratio = f"{longest_cp / longest_plain:.2f}" if longest_plain else "n/a"
    print_table(
        f"Longest trainable sequence, step within {args.budget_mib:.0f} MiB per rank"
        f" (bisection: plain ±{args.plain_granularity}, cp=2 ±{args.granularity} tokens)",
        ["run", "measured", "planner"],
        [
            [PLAIN, longest_plain, predicted_longest[PLAIN]],
            [last, longest_cp, predicted_longest[last]],
            ["ratio", ratio, f"{predicted_longest[last] / max(predicted_longest[PLAIN], 1):.2f}"],
        ],
    )
    if args.plot:

        def draw(figure: object) -> None:
            left, right = figure.subplots(1, 2)
            names = list(steps)
            left.barh(names, [steps[name][0] for name in names], label="measured")
            left.plot([predicted[name] for name in names], names, "kx", label="planner")
            left.set(xlabel=f"peak step MiB per rank at {args.seq_len} tokens", title="memory per rank")
            left.invert_yaxis()
            left.legend()
            right.bar(["plain", "cp=2 + both options"], [longest_plain, longest_cp])
            right.set(ylabel="tokens", title=f"longest sequence, {args.budget_mib:.0f} MiB/rank")

        save_plot(args.plot, draw)


if __name__ == "__main__":
    main()
