"""The config of `plait finetune`: typed sections that validate themselves, read from TOML with --set overrides
through plait.config's machinery (the same type checks and messages as `plait train`).

    [base]                       # the model fine-tuned: a plait checkpoint or a Hugging Face directory
    path = "runs/gpt-10m/checkpoints/step-000300"
    [recipe]
    kind = "sft"                 # plait.recipes.registry
    [data]
    source = "corpus"            # corpus: docstring -> body pairs of data.corpus; jsonl: data.path
    seq_len = 256
    [plan]                       # plait.Plan, as in `plait train`
    dp = 2
    zero = 3
    [train]                      # plait.config.TrainConfig, as in `plait train`
    steps = 100
    lr = 1e-4
    out_dir = "runs/sft"

A recipe with settings of its own adds a dataclass to RECIPE_SECTIONS (its [kind] table).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.config import Plan, TrainConfig, apply_overrides, build_section, read_toml
from plait.recipes.diffusion import DiffusionSection
from plait.recipes.lora import LoraSettings
from plait.recipes.preference import DPOSection, RewardSection, SimPOSection
from plait.recipes.registry import check_kind
from plait.recipes.rl_config import GRPOSection, PPOSection

SOURCES = ("corpus", "jsonl")
FORMATS = ("alpaca", "sharegpt")
TEMPLATES = ("auto", "plain", "chat", "none")  # auto: the tokenizer's chat template where it has one, else plain


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class BaseConfig:
    path: str = "runs/gpt-10m/checkpoints/step-000300"  # a plait checkpoint or a Hugging Face directory

    def __post_init__(self) -> None:
        _require(
            self.path.strip() != "",
            "base.path is empty; name a plait checkpoint (runs/NAME/checkpoints/step-N) or a Hugging Face directory",
        )


@dataclass
class RecipeConfig:
    kind: str = "sft"

    def __post_init__(self) -> None:
        check_kind(self.kind)


@dataclass
class FinetuneDataConfig:
    """Where the examples come from and how they become rows of tokens."""

    source: str = "corpus"
    corpus: str = "stdlib"  # source=corpus: documented functions give docstring -> body pairs
    val_fraction: float = 0.01  # the split `plait train`/`plait eval` use: held-out pairs from validation documents
    path: str = ""  # source=jsonl: one JSON record per line
    format: str = "alpaca"  # alpaca: instruction/input/output; sharegpt: a list of {from, value} turns
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    conversations_field: str = "conversations"
    role_field: str = "from"
    content_field: str = "value"
    template: str = "auto"
    seq_len: int = 256
    pack: bool = True  # several examples per row, each attending only to itself (plait's document mask)
    max_examples: int = 0  # 0: every training example
    eval_examples: int = 64  # held-out examples scored for the eval loss (0: none)
    cache_dir: str = ".cache/plait"  # grpo/ppo: verified doctest tasks, built once (as plait train's data.cache_dir)

    def __post_init__(self) -> None:
        _require(self.source in SOURCES, f"data.source={self.source!r}: choose one of {', '.join(SOURCES)}")
        _require(self.format in FORMATS, f"data.format={self.format!r}: choose one of {', '.join(FORMATS)}")
        _require(self.template in TEMPLATES, f"data.template={self.template!r}: choose one of {', '.join(TEMPLATES)}")
        _require(
            self.source != "jsonl" or self.path.strip() != "",
            'data.source="jsonl" reads data.path; set it, e.g. data.path = "data/alpaca.jsonl"',
        )
        _require(
            self.source != "jsonl" or Path(self.path).is_file(),
            f"data.path={self.path!r} is not a file; give a .jsonl file with one record per line",
        )
        _require(0 < self.val_fraction < 0.5, f"data.val_fraction={self.val_fraction}: use a fraction in (0, 0.5)")
        _require(self.seq_len >= 8, f"data.seq_len={self.seq_len}: use at least 8 tokens per row, e.g. 256")
        _require(self.max_examples >= 0, f"data.max_examples={self.max_examples}: use 0 (all) or a positive count")
        _require(self.eval_examples >= 0, f"data.eval_examples={self.eval_examples}: use 0 (none) or a count")
        fields = [getattr(self, name) for name in ("instruction_field", "output_field", "conversations_field")]
        _require(all(f.strip() for f in fields), "data.*_field names cannot be empty; name the record's keys")


def _check_train(train: TrainConfig) -> None:
    _require(
        train.loss_chunk == 0,
        f"train.loss_chunk={train.loss_chunk}: plait finetune computes its recipe's loss from whole logits; "
        "set train.loss_chunk=0",
    )


# Recipe-specific tables: [kind] -> its dataclass (a recipe adds its line).
RECIPE_SECTIONS: dict[str, type] = {
    "reward": RewardSection,
    "dpo": DPOSection,
    "simpo": SimPOSection,
    "lora": LoraSettings,
    "diffusion": DiffusionSection,
    "grpo": GRPOSection,
    "ppo": PPOSection,
}

CORPUS_ONLY = ("grpo", "ppo")  # verifiable prompts need doctests: no jsonl reader

SECTIONS: dict[str, type] = {
    "base": BaseConfig,
    "recipe": RecipeConfig,
    "data": FinetuneDataConfig,
    "plan": Plan,
    "train": TrainConfig,
}


@dataclass
class FinetuneConfig:
    base: BaseConfig = field(default_factory=BaseConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    plan: Plan = field(default_factory=Plan)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: dict[str, Any] = field(default_factory=dict)  # RECIPE_SECTIONS' tables, by name

    def __post_init__(self) -> None:
        _check_train(self.train)
        _require(
            self.recipe.kind not in CORPUS_ONLY or self.data.source == "corpus",
            f'data.source="{self.data.source}" is not read by recipe {self.recipe.kind!r}: its prompts are '
            "data.corpus's doctest-carrying functions, scored by running their doctests; set "
            'data.source="corpus"',
        )
        for name in self.options:
            _require(
                name == self.recipe.kind,
                f"[{name}] configures recipe {name!r}, but recipe.kind={self.recipe.kind!r}; drop [{name}]",
            )

    def section(self, name: str) -> Any:
        """The recipe's own table (its defaults when the config has none)."""
        return self.options.get(name) or RECIPE_SECTIONS[name]()

    def check_batching(self, dp: int) -> None:
        gb, mb = self.train.global_batch, self.plan.microbatches
        _require(
            gb % (dp * mb) == 0,
            f"train.global_batch={gb} does not split over dp={dp} x microbatches={mb}; use a multiple of {dp * mb}",
        )

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.update(values.pop("options"))
        return values


def _all_sections() -> dict[str, type]:
    return {**SECTIONS, **RECIPE_SECTIONS}


def finetune_config_from_dict(raw: dict[str, Any]) -> FinetuneConfig:
    sections = _all_sections()
    for name in raw:
        _require(
            name in sections, f"unknown config section [{name}]; plait finetune reads {', '.join(sorted(sections))}"
        )
    built = {name: build_section(name, raw.get(name, {}), sections=sections) for name in SECTIONS}
    options = {name: build_section(name, raw[name], sections=sections) for name in RECIPE_SECTIONS if raw.get(name)}
    return FinetuneConfig(**built, options=options)


def load_finetune_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> FinetuneConfig:
    """A finetune TOML (or the defaults) with `--set section.key=value` overrides applied."""
    raw = read_toml(path) if path is not None else {}
    return finetune_config_from_dict(apply_overrides(raw, overrides, sections=_all_sections()))
