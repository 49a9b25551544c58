"""`plait finetune` for the preference recipes: recipe.kind = "reward", "dpo" or "simpo".

Pairs come from the corpus (true function body preferred to a corrupted one; training pairs from training
documents, held-out pairs from validation documents) or a chosen/rejected jsonl (its last
data.eval_examples pairs held out). Prompt and response are joined as plain text (no chat template).
`train.global_batch` counts sequences: two per pair, chosen at row 2i and rejected at 2i+1, so it must
split into an even number of rows per rank and micro-batch.

DPO's reference is a frozen copy of the base model, taken before the plan is applied (replicated on
every rank, no gradients, no optimizer state): each step it computes this rank's share of the batch's
response log-probs once, under no_grad, and they travel in the batch as ``ref_logps``. SimPO needs none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from plait.data.heldout import held_out
from plait.distributed.launch import rank_device
from plait.recipes.base import BaseTokenizer, checkpoint_record, load_base
from plait.recipes.config import FinetuneConfig, FinetuneDataConfig
from plait.recipes.data.preferences import (
    PreferencePair,
    corpus_pairs,
    encode_pairs,
    read_preference_jsonl,
    trim_padding,
)
from plait.recipes.data.readers import hold_out_last
from plait.recipes.dpo import DPOLoss, SimPOLoss, with_reference_logps
from plait.recipes.loop import CheckpointRecord, FinetuneSummary, RecipeData, train_recipe
from plait.recipes.preference import PreferenceSection, check_pair_batching
from plait.recipes.reward import RewardModel, pairwise_loss
from plait.recipes.sft import check_model

Batch = dict[str, torch.Tensor]
EVAL_PAIRS_PER_BATCH = 8


def split_pairs(data: FinetuneDataConfig, section: PreferenceSection, *, seed: int) -> tuple[list, list]:
    """(training, held-out) preference pairs, each refused in one line when bad (before any collective)."""
    if data.source == "corpus":
        part = held_out(data.corpus, val_fraction=data.val_fraction)
        per = section.corruptions_per_function
        train = corpus_pairs(data.corpus, split="train", per_function=per, seed=seed, part=part)
        held = corpus_pairs(data.corpus, split="heldout", per_function=3, seed=seed, part=part)
    else:
        pairs = read_preference_jsonl(data.path, fields=section.fields)
        train, held = hold_out_last(pairs, data=data, noun="pairs")
    train = train[: data.max_examples] if data.max_examples else train
    return train, held[: data.eval_examples]


@dataclass
class PreferenceData:
    """Pairs and their encoding; step ``s`` takes global_batch / 2 pairs of one seeded permutation per epoch.

    ``prepare`` (the DPO reference's log-probs) is applied to every batch handed out.
    """

    train: list[PreferencePair]
    held: list[PreferencePair]
    tokenizer: BaseTokenizer
    seq_len: int
    seed: int = 0
    prepare: Callable[[Batch], Batch] = field(default=lambda batch: batch)
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("no training preference pairs; check data.source, data.path and data.max_examples")

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(len(self.train), generator=generator).tolist()
        return self._orders[epoch]

    def encode(self, pairs: list[PreferencePair]) -> Batch:
        """``pairs`` as a batch cut to its longest row (a multiple of 16 columns), then ``prepare``d."""
        return self.prepare(trim_padding(encode_pairs(pairs, self.tokenizer, seq_len=self.seq_len)))

    def step_pairs(self, step: int, *, num_pairs: int) -> list[PreferencePair]:
        count = len(self.train)
        spots = range(step * num_pairs, (step + 1) * num_pairs)
        return [self.train[self._order(spot // count)[spot % count]] for spot in spots]

    def train_batch(self, step: int, dp_rank: int, dp_size: int, *, global_batch: int) -> Batch:
        """This dp rank's contiguous share of step ``step``'s pairs (global_batch rows in all)."""
        per_rank = global_batch // 2 // dp_size
        pairs = self.step_pairs(step, num_pairs=global_batch // 2)
        return self.encode(pairs[dp_rank * per_rank : (dp_rank + 1) * per_rank])

    def step_tokens(self, step: int, *, global_batch: int) -> int:
        """The real tokens of step ``step``'s global batch (prompts and responses, padding not counted), for tokens/s."""
        pairs = self.step_pairs(step, num_pairs=global_batch // 2)
        return int(encode_pairs(pairs, self.tokenizer, seq_len=self.seq_len)["attention_mask"].sum())

    def eval_batches(self, dp_rank: int, dp_size: int) -> list[Batch]:
        mine = self.held[dp_rank::dp_size]
        return [self.encode(mine[i : i + EVAL_PAIRS_PER_BATCH]) for i in range(0, len(mine), EVAL_PAIRS_PER_BATCH)]

    def recipe_data(self, *, global_batch: int) -> RecipeData:
        return RecipeData(
            train_batch=lambda step, rank, size: self.train_batch(step, rank, size, global_batch=global_batch),
            eval_batches=self.eval_batches,
            tokens_per_step=lambda step: self.step_tokens(step, global_batch=global_batch),
        )


def frozen_reference(model: nn.Module) -> Callable[[Batch], Batch]:
    """A frozen copy of ``model`` as it is now, adding its response log-probs to each batch (no_grad)."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)

    def prepare(batch: Batch) -> Batch:
        reference.to(rank_device())  # the run's GPU is known once the group is joined; a no-op after the first
        return with_reference_logps(reference, batch)

    return prepare


def _prepared(config: FinetuneConfig) -> tuple[nn.Module, PreferenceData, CheckpointRecord]:
    model, tokenizer = load_base(config.base.path)
    _check_context(config.data, model)
    train, held = split_pairs(config.data, config.section(config.recipe.kind), seed=config.train.seed)
    data = PreferenceData(train, held, tokenizer, seq_len=config.data.seq_len, seed=config.train.seed)
    config_dict, extra = checkpoint_record(config.base.path)
    return model, data, CheckpointRecord(config=config_dict, extra=extra)


def _check_context(data: FinetuneDataConfig, model: nn.Module) -> None:
    """Pairs are never packed (data.pack does not apply): only the length is checked."""
    check_model(FinetuneDataConfig(**{**vars(data), "pack": False}), model)


def _train(config: FinetuneConfig, model: nn.Module, *, loss_fn: Any, data: PreferenceData, record: Any) -> Any:
    check_pair_batching(config, dp=config.plan.resolve(_world_size()).dp)
    recipe = data.recipe_data(global_batch=config.train.global_batch)
    return train_recipe(config, model, loss_fn=loss_fn, data=recipe, record=record)


def _world_size() -> int:
    from plait.train.setup import launched_world_size

    return launched_world_size()


def run_reward(config: FinetuneConfig) -> FinetuneSummary:
    """recipe.kind = "reward": a scalar head on the base model, trained on preference pairs."""
    model, data, record = _prepared(config)
    return _train(config, RewardModel(model), loss_fn=pairwise_loss, data=data, record=record)


def run_dpo(config: FinetuneConfig) -> FinetuneSummary:
    """recipe.kind = "dpo": the base model as policy against a frozen copy of itself as the reference."""
    model, data, record = _prepared(config)
    section = config.section("dpo")
    data.prepare = frozen_reference(model)
    loss_fn = DPOLoss(beta=section.beta, label_smoothing=section.label_smoothing)
    return _train(config, model, loss_fn=loss_fn, data=data, record=record)


def run_simpo(config: FinetuneConfig) -> FinetuneSummary:
    """recipe.kind = "simpo": reference-free, length-normalised preference optimisation."""
    model, data, record = _prepared(config)
    section = config.section("simpo")
    return _train(config, model, loss_fn=SimPOLoss(beta=section.beta, gamma=section.gamma), data=data, record=record)
