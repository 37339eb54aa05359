"""Command line: ``python -m lightning_cp doctor --model config.json --seq-len 512 --cp 2``.

``python -m lightning_cp plan --model config.json --cp 8 --memory-gib 80`` prints the longest sequence
that fits per rank for each memory option (:mod:`lightning_cp.planner`).

A model that is not from Hugging Face comes from ``--module package.module:factory``, with the loss its
training step computes from ``--loss package.module:function`` (what ``check(loss_fn=...)`` takes).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from lightning_cp.chunked_loss import DEFAULT_CHUNK_TOKENS
from lightning_cp.cp_mode import CP_MODES
from lightning_cp.doctor import check, default_loss, factory_from_spec
from lightning_cp.mixers.mode import MIXER_MODES
from lightning_cp.planner import plan, render


def _import_target(option: str, target: str, kind: str) -> Any:
    """The object that ``package.module:name`` names, for ``--module`` and ``--loss``."""
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise SystemExit(f"{option} expects 'package.module:{kind}', got {target!r}")
    return getattr(importlib.import_module(module_name), attribute)


def _add_plan_command(commands: Any) -> None:
    """The ``plan`` subcommand's options."""
    planner = commands.add_parser("plan", help="the longest sequence per rank for each memory option")
    planner.add_argument("--model", required=True, help="config.json, a local model folder or a cached hub id")
    planner.add_argument("--cp", type=int, required=True, help="context-parallel ranks")
    planner.add_argument("--memory-gib", type=float, required=True, help="memory of one rank, in GiB")
    planner.add_argument(
        "--chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        help=f"tokens per chunk of the chunked loss (default: {DEFAULT_CHUNK_TOKENS})",
    )
    planner.add_argument(
        "--fsdp",
        type=int,
        default=1,
        help="ranks that shard parameters, gradients and optimizer state with FSDP2 (default: 1, replicated)",
    )


def _run_plan(args: argparse.Namespace) -> int:
    """Print the planner's report for the parsed ``plan`` command."""
    shape, rows = plan(args.model, args.cp, args.memory_gib, args.chunk_tokens, args.fsdp)
    print(render(shape, rows, args.cp, args.memory_gib, args.chunk_tokens, args.fsdp))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the doctor (exit code 1 when CP is not exact) or the planner."""
    parser = argparse.ArgumentParser(prog="python -m lightning_cp")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check that context parallelism is exact on a model")
    source = doctor.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="config.json, a local model folder or a cached hub id (random weights)")
    source.add_argument("--module", help="'package.module:factory' returning the model (an nn.Module)")
    doctor.add_argument(
        "--loss",
        help="'package.module:function' computing the loss as your training step does, as check(loss_fn=...)"
        " takes it: function(model, batch) -> loss, returning lightning_cp.doctor.token_correct_loss(logits,"
        " batch['labels']) for a loss of your own (default: the Hugging Face model's own .loss)",
    )
    doctor.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    doctor.add_argument("--vocab-size", type=int, help="draw token ids below this (default: config.vocab_size)")
    doctor.add_argument("--cp", type=int, default=2, help="context-parallel ranks (default: 2)")
    doctor.add_argument("--labels", choices=("hf", "aligned"), default="hf", help="label convention (default: hf)")
    doctor.add_argument("--no-load-balance", action="store_true", help="shard contiguously instead of head/tail")
    doctor.add_argument(
        "--cp-mode", choices=CP_MODES, default="auto", help="CP mechanism (default: auto, decided per model)"
    )
    doctor.add_argument("--ulysses-size", type=int, help="Ulysses group size for --cp-mode hybrid")
    doctor.add_argument(
        "--mixer-mode",
        choices=MIXER_MODES,
        default="auto",
        help="mechanism of sequence mixers that are not attention (default: auto, decided per layer)",
    )
    _add_plan_command(commands)
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _run_plan(args)

    factory = factory_from_spec(args.model) if args.model else _import_target("--module", args.module, "factory")
    loss_fn = _import_target("--loss", args.loss, "function") if args.loss else default_loss
    try:
        report = check(
            factory,
            cp_size=args.cp,
            seq_len=args.seq_len,
            vocab_size=args.vocab_size,
            labels=args.labels,
            loss_fn=loss_fn,
            load_balance=not args.no_load_balance,
            cp_mode=args.cp_mode,
            ulysses_size=args.ulysses_size,
            mixer_mode=args.mixer_mode,
        )
    except ValueError as error:  # the model or the options cannot be checked as given: say how to fix it
        doctor.error(str(error))
    print(report.render())
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main())
