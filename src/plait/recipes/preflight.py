"""Each recipe's checks before launch (registry.PREFLIGHTS names one per recipe.kind): the checks that need
no process group, each refusing in one line. All take ``(config, *, world_size)``; the text recipes share
`text_checks` (plan and batch, base tokenizer, chat template)."""

from __future__ import annotations

from typing import Any

from plait.recipes.config import FinetuneConfig


def text_checks(config: FinetuneConfig, *, world_size: int) -> tuple[Any, Any]:
    """(the resolved plan, the base's tokenizer): plan and batch, the base's path, the chat template."""
    from plait.recipes.base import load_tokenizer
    from plait.recipes.data.instructions import resolve_template
    from plait.recipes.loop import checked_plan

    plan = checked_plan(config, world_size=world_size)
    tokenizer = load_tokenizer(config.base.path)
    resolve_template(config.data.template, tokenizer)
    return plan, tokenizer


def instructions(config: FinetuneConfig, *, world_size: int) -> None:
    """sft: the shared checks, then a jsonl file's records hold the configured fields."""
    text_checks(config, world_size=world_size)
    _jsonl_records(config)


def lora(config: FinetuneConfig, *, world_size: int) -> None:
    """sft's checks, with the target modules checked against the base's names (an int8 base without tp)."""
    from plait.recipes.lora import preflight as lora_preflight

    text_checks(config, world_size=world_size)
    lora_preflight(config)
    _jsonl_records(config)


def _jsonl_records(config: FinetuneConfig) -> None:
    from plait.recipes.data.readers import read_examples

    if config.data.source == "jsonl":
        read_examples(config.data)


def preferences(config: FinetuneConfig, *, world_size: int) -> None:
    """reward, dpo, simpo: chosen/rejected pairs (corpus or jsonl) and their batching."""
    from plait.recipes.preference import check_preference_input

    plan, _ = text_checks(config, world_size=world_size)
    check_preference_input(config, dp=plan.dp)


def rl(config: FinetuneConfig, *, world_size: int) -> None:
    """grpo, ppo: the verified doctest tasks, built here once so that the ranks read the cache, some of which
    fit the base's trained length with max_new_tokens; a saved reward model ([ppo] reward="model") that holds
    a head and the policy's tokenizer."""
    from plait.recipes.base import base_window
    from plait.recipes.reward_checkpoint import check_reward_checkpoint
    from plait.recipes.rl_run import rl_tasks

    _, tokenizer = text_checks(config, world_size=world_size)
    section = config.section(config.recipe.kind)
    if section.reward == "model":
        check_reward_checkpoint(section.reward_path, tokenizer)
    rl_tasks(config, tokenizer, window=base_window(config.base.path))


def diffusion(config: FinetuneConfig, *, world_size: int) -> None:
    """Trains from scratch on images: no base model, tokenizer or text."""
    from plait.recipes.diffusion_run import preflight as diffusion_preflight

    diffusion_preflight(config, world_size=world_size)
