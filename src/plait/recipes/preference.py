"""The config tables of the preference recipes: [reward], [dpo] and [simpo] in a `plait finetune` TOML.

    [recipe]
    kind = "dpo"
    [dpo]
    beta = 0.1                 # the implicit reward's scale
    prompt_field = "prompt"    # jsonl field names; prompt_field = "" when chosen/rejected include the prompt

Light on imports: `plait.recipes.config` reads these classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plait.recipes.data.preferences import CORRUPTIONS, PairFields, read_preference_jsonl


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class PreferenceSection:
    """What every preference recipe reads: the jsonl's field names and the corpus pairs' corruptions."""

    prompt_field: str = "prompt"  # "" : chosen and rejected hold the prompt too (split at their common prefix)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    corruptions_per_function: int = 1  # corpus: training pairs per function (held-out pairs take all three)

    def __post_init__(self) -> None:
        _require(
            bool(self.chosen_field.strip() and self.rejected_field.strip()),
            "chosen_field and rejected_field name the jsonl's response fields; they cannot be empty",
        )
        _require(
            1 <= self.corruptions_per_function <= len(CORRUPTIONS),
            f"corruptions_per_function={self.corruptions_per_function}: choose 1..{len(CORRUPTIONS)} "
            f"({', '.join(CORRUPTIONS)})",
        )

    @property
    def fields(self) -> PairFields:
        return PairFields(prompt=self.prompt_field, chosen=self.chosen_field, rejected=self.rejected_field)


@dataclass
class RewardSection(PreferenceSection):
    """[reward]: a scalar head on the base model, trained with -log sigmoid(r_chosen - r_rejected)."""


@dataclass
class DPOSection(PreferenceSection):
    """[dpo]: beta scales the implicit reward beta x (logp - ref logp); label_smoothing is conservative DPO."""

    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.beta > 0, f"dpo.beta={self.beta}: beta must be > 0, e.g. 0.1")
        _require(0 <= self.label_smoothing < 0.5, f"dpo.label_smoothing={self.label_smoothing}: use [0, 0.5)")


@dataclass
class SimPOSection(PreferenceSection):
    """[simpo]: reference-free; beta scales the length-normalised log-prob, gamma is the target margin."""

    beta: float = 2.0
    gamma: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.beta > 0, f"simpo.beta={self.beta}: beta must be > 0, e.g. 2.0")
        _require(self.gamma >= 0, f"simpo.gamma={self.gamma}: the target margin must be >= 0, e.g. 0.5")


SECTIONS: dict[str, type] = {"reward": RewardSection, "dpo": DPOSection, "simpo": SimPOSection}
KINDS = tuple(SECTIONS)


def check_pair_batching(config: Any, *, dp: int) -> None:
    """Every rank's micro-batch holds whole pairs: train.global_batch a multiple of 2 x dp x microbatches."""
    rows, split = config.train.global_batch, dp * config.plan.microbatches
    _require(
        rows % (2 * split) == 0,
        f"train.global_batch={rows} sequences do not split into whole pairs (2 rows each) over dp={dp} x "
        f"microbatches={config.plan.microbatches}; use a multiple of {2 * split}",
    )


def check_preference_input(config: Any, *, dp: int) -> None:
    """`plait finetune`'s preflight for a preference recipe: the batch splits into whole pairs, and a jsonl's
    records have the configured fields and no identical chosen/rejected (one line each, before launch)."""
    check_pair_batching(config, dp=dp)
    if config.data.source == "jsonl":
        read_preference_jsonl(config.data.path, fields=config.section(config.recipe.kind).fields)
