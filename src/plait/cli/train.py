"""`plait train`: validate, check, then launch the ranks (or train in this process)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from plait.cli import launching
from plait.cli.launching import check_elastic, check_rank_resume, preflight, ranks_wanted, warn_oversubscribed
from plait.config import load_config
from plait.distributed.agent import strip_flag, under_torchrun
from plait.distributed.nodes import Nodes, strip_node_flags


def _with_auto_plan(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """Replace `--plan auto` by the planner's best plan, as --set overrides every rank reads."""
    from plait.planner.auto import auto_plan, plan_overrides

    if under_torchrun():
        raise ValueError(
            "--plan auto chooses the plan before launch; run it as `plait train ... --nproc N --plan auto`"
        )
    config = load_config(args.config, args.overrides)
    nproc = args.nproc or 1
    plan, result = auto_plan(config, world_size=nproc)
    from plait.planner.report import why_best

    print(why_best(result))
    args.overrides = [*args.overrides, *plan_overrides(plan)[1::2]]
    return [*strip_flag(argv, "--plan"), *plan_overrides(plan)]


def _with_plan_string(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """Replace `--plan "KEY=VALUE ..."` by --set overrides of every plan field, as `--plan auto` does."""
    from plait.planner.auto import plan_overrides
    from plait.planner.plan_string import parse_plan

    overrides = plan_overrides(parse_plan(args.plan))
    args.overrides = [*args.overrides, *overrides[1::2]]
    return [*strip_flag(argv, "--plan"), *overrides]


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.train.setup import validate

    if args.plan == "auto":
        argv = _with_auto_plan(args, argv)
    elif args.plan:
        argv = _with_plan_string(args, argv)
    config = load_config(args.config, args.overrides)
    nodes = Nodes.from_args(args)  # one node unless --nnodes
    if nodes.elastic and not under_torchrun():
        check_elastic(config, nodes=nodes, nproc=args.nproc)
        for count in nodes.node_counts[:-1]:  # the world may shrink to any of these after a node is lost
            validate(config, world_size=args.nproc * count)
        if args.resume is None:  # a rank a restart or a joining node starts continues the run (checked below)
            argv = [*argv, "--resume", "auto"]
    nproc = nodes.world_size(ranks_wanted(config, args.nproc), per_node=args.nproc is not None)
    # every input error surfaces here, before any rank starts
    validated = validate(config, world_size=nproc, ranks_per_node=nodes.ranks_per_node(nproc))
    if under_torchrun():
        check_rank_resume(args.resume, config)
    else:
        preflight(config, validated=validated, resume=args.resume, first_node=nodes.is_first)
        warn_oversubscribed(nodes.ranks_per_node(nproc))
    if (nproc > 1 or nodes.num_nodes > 1) and not under_torchrun():
        if args.max_restarts < 0:
            raise ValueError(f"--max-restarts {args.max_restarts}: use 0 (no restart) or more")
        per_node, rank_argv = nodes.ranks_per_node(nproc), strip_node_flags(strip_flag(argv, "--nproc"))
        return launching.launch(
            per_node, rank_argv, nodes=nodes, max_restarts=args.max_restarts, out_dir=config.train.out_dir
        )
    from plait.train.loop import run_training

    try:
        summary = run_training(config, resume=args.resume)  # rank 0 logs the summary line
        if summary.stopped_by is not None:  # SIGINT/SIGTERM: saved and stopped (128 + N, as a shell reports it)
            return 128 + getattr(signal.Signals, summary.stopped_by, signal.SIGINT).value
    except (ValueError, OSError) as err:  # raised after start-up: a run-time fault, one line, exit 3
        print(f"plait train: error during the run: {err}", file=sys.stderr)
        return 3
    return 0
