"""The recipes `plait finetune` runs: a config's `recipe.kind` -> "module:function".

Each recipe adds its own line. The function takes the checked `FinetuneConfig` and runs the recipe
on this rank (the process group, when launched with --nproc, already exists).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

RECIPES: dict[str, str] = {
    "sft": "plait.recipes.sft:run",
    "reward": "plait.recipes.preference_run:run_reward",
    "dpo": "plait.recipes.preference_run:run_dpo",
    "simpo": "plait.recipes.preference_run:run_simpo",
    "lora": "plait.recipes.lora:run",
    "diffusion": "plait.recipes.diffusion_run:run",
    "grpo": "plait.recipes.rl_run:run_grpo",
    "ppo": "plait.recipes.rl_run:run_ppo",
}

# recipe.kind -> its checks before launch (plait.recipes.preflight), run by `plait finetune` before any rank.
PREFLIGHTS: dict[str, str] = {
    "sft": "plait.recipes.preflight:instructions",
    "reward": "plait.recipes.preflight:preferences",
    "dpo": "plait.recipes.preflight:preferences",
    "simpo": "plait.recipes.preflight:preferences",
    "lora": "plait.recipes.preflight:lora",
    "diffusion": "plait.recipes.preflight:diffusion",
    "grpo": "plait.recipes.preflight:rl",
    "ppo": "plait.recipes.preflight:rl",
}


def recipe_kinds() -> list[str]:
    return sorted(RECIPES)


def check_kind(kind: str) -> None:
    if kind not in RECIPES:
        raise ValueError(f"recipe.kind={kind!r} is not a recipe; use one of {', '.join(recipe_kinds())}")


def recipe_function(kind: str) -> Callable[..., Any]:
    """The function that runs recipe `kind`, imported on demand (recipes pull in peft, diffusers, ...)."""
    check_kind(kind)
    return _imported(RECIPES[kind])


def recipe_preflight(kind: str) -> Callable[..., None]:
    """Recipe `kind`'s checks before launch: ``(config, *, world_size)``, each refusing in one line."""
    check_kind(kind)
    return _imported(PREFLIGHTS[kind])


def _imported(target: str) -> Any:
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)
