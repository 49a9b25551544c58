"""The commands whose strands keep their own CLI code: debug, data, plan, eval, finetune, bench."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

_PLAN_COUNTS = {"nodes": 1, "gpus_per_node": 1, "global_batch": 1, "seq": 2, "top": 1, "microbatches": 1}


def _check_plan_counts(args: argparse.Namespace) -> None:
    """The planner's counts are positive (0 used to be replaced silently, or blamed on another flag)."""
    for name, least in _PLAN_COUNTS.items():
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < least:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {value}: use {least} or more")


def cmd_debug(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.train.debug import debug_stacks

    return debug_stacks(Path(args.out_dir))


def cmd_data(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.data.prepare.cli import cmd_data as run_data

    return run_data(args, argv)


def cmd_plan(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.planner.cli import run_plan

    _check_plan_counts(args)
    return run_plan(args)


def cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.eval.cli import cmd_eval as run_eval

    return run_eval(args, argv)


def cmd_finetune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.recipes.cli import cmd_finetune as run_finetune

    return run_finetune(args, argv)


def cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.bench.cli import cmd_bench as run_bench

    return run_bench(args, argv)
