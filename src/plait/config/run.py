"""The whole run's config (the five tables together, with the checks across them) and its GPT config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plait.config.choices import require
from plait.config.data import DataConfig
from plait.config.model import ModelConfig
from plait.config.plan import Plan
from plait.config.task import TaskConfig
from plait.config.train import TrainConfig

if TYPE_CHECKING:
    from plait.models.gpt_config import GPTConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    plan: Plan = field(default_factory=Plan)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        require(
            self.task.uses_corpus or self.model.pretrained is None,
            f"task.kind={self.task.kind!r} trains a vision preset from scratch; drop model.pretrained and set "
            "model.preset (e.g. 'vit-small')",
        )
        require(
            not (self.data.document_mask and self.model.pretrained is not None),
            "data.document_mask works with plait's models (their attention reads documents from position_ids); "
            "a transformers model attends across documents whatever its positions: set data.document_mask=false",
        )
        require(
            self.train.loss_chunk == 0 or self.task.kind == "causal_lm",
            f"train.loss_chunk={self.train.loss_chunk} chunks the causal LM loss; task.kind={self.task.kind!r} has "
            "a loss of its own: set train.loss_chunk=0",
        )

    def check_batching(self, dp: int) -> None:
        """The global batch must split over dp ranks and then into micro-batches."""
        gb, mb = self.train.global_batch, self.plan.microbatches
        require(gb % dp == 0, f"train.global_batch={gb} does not split over dp={dp} ranks; use a multiple of {dp}")
        per_rank = gb // dp
        require(
            per_rank % mb == 0,
            f"each rank gets {per_rank} sequences, which plan.microbatches={mb} does not divide; use a global_batch that is a multiple of {dp * mb}",
        )
        cp, seq_len = self.plan.cp, self.data.seq_len
        require(
            cp == 1 or seq_len % (2 * cp) == 0,
            f"data.seq_len={seq_len} does not split into 2 * plan.cp = {2 * cp} equal chunks (each cp rank holds one "
            f"from the front and one from the back of every row); use a multiple of {2 * cp}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config_for(config: Config) -> GPTConfig:
    """plait's GPT config of a preset run (the [model] preset and overrides, checked against [data]);
    ValueError for a pretrained one (its config.json defines it)."""
    from plait.models.factory import resolve_config  # here, not at the top: models imports torch

    if config.model.pretrained is not None:
        raise ValueError(
            f"model.pretrained={config.model.pretrained} is a transformers model, not one of plait's GPT presets; "
            "this command works on presets only (plait train, export and generate take pretrained models)"
        )
    overrides: dict[str, Any] = {"vocab_size": config.data.vocab_size, **config.model.overrides}
    model_config = resolve_config(config.model.preset, **overrides)
    if model_config.vocab_size < config.data.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_config.vocab_size} is smaller than data.vocab_size={config.data.vocab_size}; "
            "drop the model override or raise it"
        )
    if config.data.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} is longer than the model's max_seq_len={model_config.max_seq_len}; "
            f"lower data.seq_len or --set model.max_seq_len={config.data.seq_len}"
        )
    return model_config
