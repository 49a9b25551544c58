"""`plait finetune CONFIG.toml [--set section.key=value] [--nproc N]`: a recipe of plait.recipes, launched as
`plait train` launches (torchrun's agent in this process, one line for a failed rank).

Every input error (the config, the base model's path, a jsonl file's records, a chat template the tokenizer
lacks) is one line here, before any rank starts; the ranks check again before their first collective.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Sequence
from typing import Any

from plait.distributed.agent import launch_cli, strip_flag, under_torchrun
from plait.recipes.config import FinetuneConfig, load_finetune_config


def add_finetune_parser(commands: Any) -> None:
    parser = commands.add_parser("finetune", help="fine-tune a model with a recipe (sft, ...) from a TOML config")
    parser.add_argument("config", help="a finetune TOML, e.g. configs/finetune/sft.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--nproc", type=int, default=None, help="ranks to launch on this machine (through torchrun)")


def ranks_wanted(config: FinetuneConfig, nproc: int | None) -> int:
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"--nproc {nproc}: launch at least one rank")
        return nproc
    plan = config.plan
    others = plan.tp * plan.pp * plan.cp
    return others if plan.dp == -1 else plan.dp * others


def preflight(config: FinetuneConfig, *, world_size: int) -> None:
    """The checks that need no process group (plan and batch, base model, data records, template, ...): the
    recipe's own entry in plait.recipes.registry.PREFLIGHTS."""
    from plait.recipes.registry import recipe_preflight

    recipe_preflight(config.recipe.kind)(config, world_size=world_size)


def cmd_finetune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    config = load_finetune_config(args.config, args.overrides)
    nproc = ranks_wanted(config, args.nproc)
    if not under_torchrun():
        preflight(config, world_size=nproc)
    if nproc > 1 and not under_torchrun():
        return launch_cli(nproc, strip_flag(argv, "--nproc"), out_dir=config.train.out_dir)
    from plait.recipes.registry import recipe_function

    summary = recipe_function(config.recipe.kind)(config)  # rank 0 logs the summary line
    stopped_by = getattr(summary, "stopped_by", None)  # diffusion's summary is a dict: it never stops early
    if stopped_by is not None:  # SIGINT/SIGTERM: saved and stopped (128 + N, as `plait train` and a shell)
        return 128 + getattr(signal.Signals, stopped_by, signal.SIGINT).value
    return 0
