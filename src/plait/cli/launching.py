"""What `plait train` and `plait verify` decide and check in the launcher, before any rank starts."""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from plait.config import Config
from plait.distributed.agent import launch_cli
from plait.distributed.nodes import Nodes

if typing.TYPE_CHECKING:
    from plait.train.setup import Validated

RANKS_PER_CORE = 4  # more ranks per core than this: a warning (tests oversubscribe on purpose)


def ranks_wanted(config: Config, nproc: int | None) -> int:
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"--nproc {nproc}: launch at least one rank")
        return nproc
    plan = config.plan
    if plan.dp == -1:
        return plan.tp * plan.pp * plan.cp
    return plan.dp * plan.tp * plan.pp * plan.cp


def launch(
    nproc: int, argv: Sequence[str], *, nodes: Nodes | None = None, max_restarts: int = 0, out_dir: str | None = None
) -> int:
    """plait.distributed.agent.launch_cli, named here so tests can stand in for the launch."""
    return launch_cli(nproc, argv, nodes=nodes, max_restarts=max_restarts, out_dir=out_dir)


def preflight(config: Config, *, validated: Validated, resume: str | None, first_node: bool = True) -> None:
    """What only the launcher checks, once, before any rank starts (the ranks would race on it)."""
    from plait.train import preflight
    from plait.train.resume import check_resumable

    out_dir = Path(config.train.out_dir)
    preflight.check_out_dir_writable(out_dir)
    if first_node:  # nodes sharing out_dir: node 1 starting after node 0 began writing must not refuse
        preflight.check_out_dir_unused(out_dir, resume=resume)
    checkpoint, _ = preflight.resolve_resume(resume, out_dir=out_dir)  # verified: manifest and checksums
    if checkpoint is not None:
        check_resumable(checkpoint, config=config)
    preflight.check_data(config, pretrained=validated.pretrained)


def check_rank_resume(resume: str | None, config: Config) -> None:
    """Under torchrun every rank runs the command: the launcher verified the files already."""
    from plait.train.preflight import AUTO
    from plait.train.resume import check_resumable

    if resume is None or resume == AUTO:
        return
    if not Path(resume).is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint directory; pick one under <out_dir>/checkpoints")
    check_resumable(Path(resume), config=config)


def check_elastic(config: Config, *, nodes: Nodes, nproc: int | None) -> None:
    """An elastic job's world changes between restarts: dp must follow it, and --nproc fixes the ranks per node."""
    spec = f"--nnodes {nodes.min_nodes}:{nodes.num_nodes}"
    if nproc is None:
        raise ValueError(f"{spec} is elastic: pass --nproc with the ranks each node runs")
    if config.plan.dp != -1:
        raise ValueError(
            f"{spec} is elastic, so the world size changes between restarts, but plan.dp={config.plan.dp} is fixed; "
            "set plan.dp=-1 (dp follows the world)"
        )


def warn_oversubscribed(nproc: int) -> None:
    """Many ranks per core run (tests oversubscribe on purpose), but slowly: say so, once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > RANKS_PER_CORE * cores:
        print(
            f"plait: warning: --nproc {nproc} starts {nproc / cores:.0f} ranks per CPU core on {cores} cores; "
            f"above {RANKS_PER_CORE} per core they mostly wait for a core, so steps will be slow",
            file=sys.stderr,
        )
