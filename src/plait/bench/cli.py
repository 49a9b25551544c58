"""`plait bench`: the parser and the command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from plait.bench.suites import SUITES


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmark plait's plans against PyTorch's peers (A/B alternated)")
    bench.add_argument("--suite", default="quick", help=f"one of {', '.join(SUITES)} (default quick)")
    bench.add_argument("--cases", nargs="+", default=[], metavar="NAME", help="run only these cases, by name")
    bench.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda (the GPU cases; needs a GPU)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="where the JSON, .md and .png go")
    bench.add_argument("--repeats", type=int, default=None, help="A/B pairs per case (default: each script's own)")
    bench.add_argument("--timeout", type=float, default=1800.0, help="seconds before a case counts as hung")
    bench.add_argument(
        "--peer-path",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a directory a peer was installed into (pip install --target DIR deepspeed ...): put on the cases' "
        "PYTHONPATH; repeatable",
    )


def cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.bench.report import markdown, write_outputs
    from plait.bench.runner import BenchOptions, run_bench

    options = BenchOptions(
        suite=args.suite,
        cases=args.cases,
        device=args.device,
        out=args.out,
        repeats=args.repeats,
        timeout_s=args.timeout,
        peer_paths=args.peer_path,
    )
    record = run_bench(options)
    paths = write_outputs(record, options.out)
    print(markdown(record))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    failed = [case["case"]["name"] for case in record["cases"] if case["returncode"] != 0]
    return 1 if failed else 0
