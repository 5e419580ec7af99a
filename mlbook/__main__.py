"""Command line: ``python -m mlbook sinusoid`` (paper reproduction) and
``python -m mlbook bench`` (speed benchmark)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="mlbook")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "sinusoid",
        help="MAML-paper sinusoid: MAML, FOMAML, Reptile, "
        "pretrained baseline; prints the MSE table",
    )
    s.add_argument("--iterations", type=int, default=70_000)
    s.add_argument("--methods", default="maml,fomaml,reptile,pretrained")
    s.add_argument(
        "--out",
        default="runs/sinusoid",
        help="folder for resumable checkpoints and results.json",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--eval-tasks",
        type=int,
        default=600,
        help="fixed test tasks for the MSE table (the paper protocol: 600)",
    )
    s.add_argument("--device", default=None)
    s.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1 is fastest for this tiny MLP)",
    )
    s.add_argument(
        "--compile",
        action="store_true",
        help="MAML, first-order MAML and Reptile steps through torch.compile "
        "(CPU; about 20 s to compile each, then under a third of the time per "
        "step)",
    )
    s.add_argument(
        "--ship",
        action="store_true",
        help="also write the trained models into mlbook/checkpoints",
    )
    sub.add_parser("bench", help="meta-steps per second against baselines "
                   "(python -m mlbook bench --help)")
    args = parser.parse_args(argv)

    if args.command == "sinusoid":
        import torch

        from .reproduce import SINUSOID, sinusoid, sinusoid_table

        methods = [m for m in args.methods.split(",") if m]
        unknown = sorted(set(methods) - set(SINUSOID))
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {list(SINUSOID)}")
        if not methods:
            parser.error(f"--methods names no method; choose from {list(SINUSOID)}")
        # every argument checked before any training (hours, at paper length)
        for flag in ("iterations", "eval_tasks", "threads"):
            if getattr(args, flag) < 1:
                parser.error(f"--{flag.replace('_', '-')} must be at least 1")
        if args.device is not None:
            try:
                device = torch.device(args.device)
            except RuntimeError as err:
                parser.error(f"--device {args.device!r}: {err}")
            if device.type == "cuda" and not torch.cuda.is_available():
                parser.error(f"--device {args.device!r}: this torch sees no CUDA GPU")
        torch.set_num_threads(args.threads)
        try:
            results = sinusoid(
                methods,
                args.iterations,
                args.out,
                args.seed,
                args.device,
                args.ship,
                eval_tasks=args.eval_tasks,
                compile=args.compile,
            )
        except (ValueError, FileExistsError) as err:  # e.g. a checkpoint that
            parser.exit(2, f"error: {err}\n")  # does not fit: say why, no trace
        print(sinusoid_table(results))
        print(f"(results in {args.out}/results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
