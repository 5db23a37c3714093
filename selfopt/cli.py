"""The ``selfopt`` command.

    selfopt demo [--task mlp] [--steps 300] [--seed 0] [--adam-lr 1e-3]

Bad input ends with one line on stderr (``selfopt: error: ...``) and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time

from selfopt.tasks import FAMILIES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfopt", description="Learned optimizers that train themselves.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train one task with a random learned optimizer and with Adam",
        description="Train one task with a randomly initialised learned optimizer (where "
                    "self-training starts) and with Adam, and print both losses.")
    demo.add_argument("--task", default="mlp", choices=sorted(FAMILIES),
                      help="task family (default: mlp)")
    demo.add_argument("--steps", type=_positive_int, default=300, help="inner steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--adam-lr", type=_positive_float, default=1e-3)
    return parser


def demo(args: argparse.Namespace) -> None:
    from selfopt.demo import run_demo

    started = time.perf_counter()
    curves = run_demo(args.task, args.steps, args.seed, args.adam_lr)
    window = max(1, min(10, args.steps // 10))
    print(f"task: {args.task} (default configuration, seed {args.seed}), {args.steps} steps")
    print(f"{'optimizer':<28} {'first loss':>10} {'final loss':>10}")
    for curve in curves:
        first, final = curve.losses[:window].mean(), curve.losses[-window:].mean()
        print(f"{curve.name:<28} {first:>10.4f} {final:>10.4f}")
    print(f"({time.perf_counter() - started:.1f} s; final = mean of the last {window} steps. "
          "A random learned optimizer barely trains; `selfopt train` makes a population of "
          "them train itself.)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"demo": demo}[args.command](args)
    except KeyboardInterrupt:
        print("selfopt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
