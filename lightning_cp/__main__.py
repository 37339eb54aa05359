"""Command line: ``python -m lightning_cp doctor --model config.json --seq-len 512 --cp 2``."""

from __future__ import annotations

import argparse
import importlib
import sys

from lightning_cp.doctor import check, factory_from_spec


def _factory_from_module(target: str) -> object:
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise SystemExit(f"--module expects 'package.module:factory', got {target!r}")
    return getattr(importlib.import_module(module_name), attribute)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the doctor and print its report; exit code 1 when CP is not exact."""
    parser = argparse.ArgumentParser(prog="python -m lightning_cp")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check that context parallelism is exact on a model")
    source = doctor.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="config.json, a local model folder or a cached hub id (random weights)")
    source.add_argument("--module", help="'package.module:factory' returning the model (an nn.Module)")
    doctor.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    doctor.add_argument("--cp", type=int, default=2, help="context-parallel ranks (default: 2)")
    doctor.add_argument("--labels", choices=("hf", "aligned"), default="hf", help="label convention (default: hf)")
    doctor.add_argument("--no-load-balance", action="store_true", help="shard contiguously instead of head/tail")
    args = parser.parse_args(argv)

    factory = factory_from_spec(args.model) if args.model else _factory_from_module(args.module)
    report = check(
        factory, cp_size=args.cp, seq_len=args.seq_len, labels=args.labels, load_balance=not args.no_load_balance
    )
    print(report.render())
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main())
