"""`plait eval CKPT_OR_HF_DIR... --tasks ... [--plan "dp=2"] [--nproc N] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from plait.config import Plan
from plait.eval.tasks import PLAIT_TASKS

# What an eval plan string may leave out (plait.planner.plan_string requires them for training).
_EVAL_PLAN_DEFAULTS = {"dp": "-1", "tp": "1", "pp": "1", "zero": "0", "microbatches": "1", "recompute": "none"}


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="evaluate checkpoints on lm-eval tasks (plait's own or local ones)")
    parser.add_argument("paths", nargs="+", metavar="CKPT_OR_HF_DIR")
    parser.add_argument(
        "--tasks",
        default=",".join(PLAIT_TASKS),
        help=f"comma-separated: plait's {', '.join(PLAIT_TASKS)}, or lm-eval tasks whose data is local",
    )
    parser.add_argument("--plan", default=None, help='e.g. "dp=2", "tp=2" or "pp=2" (unset keys: tp=pp=1, zero=0)')
    parser.add_argument("--nproc", type=int, default=None, help="ranks to launch (default: the plan's product)")
    parser.add_argument("--out", default=None, help="results.json, results.md, metrics.png (default: <run>/eval)")
    parser.add_argument("--include-path", default=None, help="a directory of your own lm-eval task YAMLs")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    parser.add_argument("--limit", type=int, default=None, help="at most N samples per task (a quick look)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (as train.threads)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per scored window (default: the sequence length the checkpoint was trained at)",
    )


def eval_plan(text: str | None) -> Plan | None:
    """A plan string where only the degrees that differ from one rank need writing."""
    if text is None:
        return None
    from plait.planner.plan_string import parse_plan

    given = {item.partition("=")[0] for item in text.split()}
    filled = [text, *(f"{key}={value}" for key, value in _EVAL_PLAN_DEFAULTS.items() if key not in given)]
    return parse_plan(" ".join(filled))


def _ranks(plan: Plan | None, nproc: int | None) -> int:
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"--nproc {nproc}: launch at least one rank")
        return nproc
    if plan is None:
        return 1
    return (max(plan.dp, 1)) * plan.tp * plan.pp * plan.cp


def cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.distributed.agent import launch_cli, strip_flag, under_torchrun
    from plait.eval.runner import EvalRequest, prepare, run_eval

    plan = eval_plan(args.plan)
    request = EvalRequest(
        paths=args.paths,
        tasks=args.tasks,
        plan=plan,
        out_dir=args.out,
        include_path=args.include_path,
        batch_size=args.batch_size,
        limit=args.limit,
        threads=args.threads,
        max_length=args.max_length,
    )
    nproc = _ranks(plan, args.nproc)
    if nproc > 1 and not under_torchrun():
        if plan is None:
            raise ValueError(
                f"--nproc {nproc} without --plan: say how the ranks share the work, e.g. --plan dp={nproc}"
            )
        with tempfile.TemporaryDirectory(prefix="plait-eval-check-") as scratch:
            prepare(request, imported_dir=Path(scratch))  # every input error here, in one line, before launch
        return launch_cli(nproc, strip_flag(argv, "--nproc"))
    results = run_eval(request)
    from plait.distributed.launch import is_main_rank
    from plait.eval.report import markdown_table

    if is_main_rank():
        print(markdown_table(results), end="", file=sys.stdout)
    return 0
