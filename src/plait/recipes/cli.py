"""`plait finetune CONFIG.toml [--set section.key=value] [--nproc N]`: a recipe of plait.recipes, launched as
`plait train` launches (torchrun's agent in this process, one line for a failed rank).

Every input error (the config, the base model's path, a jsonl file's records, a chat template the tokenizer
lacks) is one line here, before any rank starts; the ranks check again before their first collective.
"""

from __future__ import annotations

import argparse
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
    """The checks that need no process group: plan and batch, base model, data records, template."""
    if config.recipe.kind == "diffusion":  # trains from scratch on images: no base model, tokenizer or text
        from plait.recipes.diffusion_run import preflight as diffusion_preflight

        diffusion_preflight(config, world_size=world_size)
        return
    from plait.recipes.base import load_tokenizer
    from plait.recipes.data.instructions import resolve_template
    from plait.recipes.data.readers import read_examples
    from plait.recipes.loop import checked_plan
    from plait.recipes.preference import KINDS as PREFERENCE_KINDS
    from plait.recipes.preference import check_preference_input

    plan = checked_plan(config, world_size=world_size)
    tokenizer = load_tokenizer(config.base.path)
    resolve_template(config.data.template, tokenizer)
    if config.recipe.kind == "lora":  # target modules against the base's names, int8 base without tp
        from plait.recipes.lora import preflight as lora_preflight

        lora_preflight(config)
    if config.recipe.kind in ("grpo", "ppo"):  # verified once here, so that the ranks read the cache
        from plait.recipes.rl_run import verified_tasks

        verified_tasks(config)
    if config.recipe.kind == "ppo" and config.section("ppo").reward == "model":  # a saved reward model
        from plait.recipes.reward_checkpoint import check_reward_checkpoint

        check_reward_checkpoint(config.section("ppo").reward_path, tokenizer)
    if config.recipe.kind in PREFERENCE_KINDS:  # chosen/rejected pairs, not instruction records
        check_preference_input(config, dp=plan.dp)
    elif config.data.source == "jsonl":
        read_examples(config.data)


def cmd_finetune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    config = load_finetune_config(args.config, args.overrides)
    nproc = ranks_wanted(config, args.nproc)
    if not under_torchrun():
        preflight(config, world_size=nproc)
    if nproc > 1 and not under_torchrun():
        return launch_cli(nproc, strip_flag(argv, "--nproc"), out_dir=config.train.out_dir)
    from plait.recipes.registry import recipe_function

    recipe_function(config.recipe.kind)(config)  # rank 0 logs the summary line
    return 0
