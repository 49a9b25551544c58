"""PPOSettings are built from the [ppo] table (one list of shared fields, one set of checks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from plait.recipes.config import load_finetune_config
from plait.recipes.ppo import PPOSettings
from plait.recipes.rl_config import PPO_FIELDS
from plait.recipes.rollout import SamplingConfig

PPO_TOML = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "ppo.toml"


def test_settings_carry_every_field_of_the_ppo_table_they_share() -> None:
    sets = ["ppo.samples_per_prompt=3", "ppo.kl_coef=0.07", "ppo.gamma=0.9", "ppo.lam=0.8", "ppo.clip=0.3"]
    section = load_finetune_config(PPO_TOML, [*sets, "ppo.value_clip=0.4", "ppo.ppo_epochs=5"]).section("ppo")
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.5, top_k=3, seed=11)
    settings = PPOSettings.from_section(section, sampling=sampling)
    shared = {f.name for f in dataclasses.fields(PPOSettings)} & {f.name for f in dataclasses.fields(section)}
    assert shared == set(PPO_FIELDS)  # a field added to both and not to PPO_FIELDS fails here
    assert settings == PPOSettings(sampling, 3, 0.07, 0.9, 0.8, 0.3, 0.4, 5)


@pytest.mark.parametrize(
    ("override", "message"),
    [("ppo.gamma=1.5", "both are discounts"), ("ppo.ppo_epochs=0", "must be >= 1"), ("ppo.value_clip=0", "> 0")],
)
def test_bad_ppo_settings_are_refused_when_the_config_loads(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_finetune_config(PPO_TOML, [override])
    with pytest.raises(ValueError, match=message):  # and in Python, by the same check
        PPOSettings(**{override.split("=")[0].removeprefix("ppo."): float(override.split("=")[1])})


def test_every_recipe_has_a_preflight_entry_that_imports() -> None:
    from plait.recipes.registry import PREFLIGHTS, RECIPES, recipe_preflight

    assert set(PREFLIGHTS) == set(RECIPES)
    assert all(callable(recipe_preflight(kind)) for kind in RECIPES)
