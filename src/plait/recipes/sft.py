"""Supervised fine-tuning (SFT): instruction -> response pairs, the prompt's tokens masked from the loss.

The loss is plait's causal LM loss (`plait.losses.causal_lm`, a (sum, count) pair): prompt and padding labels
are -100, so it is the mean over response tokens of the whole global batch, under any plan. Examples pack
several to a row, each attending only to itself (position ids restart per example; plait's models read them
as document boundaries); a transformers model attends across them, so it trains with data.pack=false.

Example::

    model, tokenizer = load_base("runs/gpt-10m/checkpoints/step-000300")
    data = SFTData.build(config.data, tokenizer, model=model, seed=0)
    engine = plait.boost(model, optimizer=..., loss_fn=causal_lm, plan=plait.Plan(dp=2, zero=3))
    engine.train_step(data.train_batch(0, engine.dp_rank, engine.dp_size, global_batch=16))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from plait.data.heldout import held_out
from plait.losses import causal_lm
from plait.models.gpt import GPT
from plait.recipes.base import BaseTokenizer, checkpoint_record, load_base
from plait.recipes.config import FinetuneConfig, FinetuneDataConfig
from plait.recipes.data.instructions import Example, Tokens, collate, corpus_examples, pack, render, resolve_template
from plait.recipes.data.readers import hold_out_last, read_examples
from plait.recipes.loop import CheckpointRecord, FinetuneSummary, RecipeData, train_recipe

EVAL_ROWS_PER_BATCH = 8
PAD_MULTIPLE = 16  # a batch is cut after its longest row, to a multiple of this (sp/cp still split it)
LOSS_FN = causal_lm  # the mean over the global batch's response tokens (a (sum, count) pair)


def split_examples(data: FinetuneDataConfig) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples. The corpus: pairs from training documents, held-out pairs from
    validation documents (`plait eval`'s split). A jsonl file: its last data.eval_examples records held out."""
    if data.source == "corpus":
        part = held_out(data.corpus, val_fraction=data.val_fraction)
        train = corpus_examples(data.corpus, val_fraction=data.val_fraction, held=False, part=part)
        held = corpus_examples(data.corpus, val_fraction=data.val_fraction, held=True, part=part)
    else:
        train, held = hold_out_last(read_examples(data), data=data, noun="records")
    train = train[: data.max_examples] if data.max_examples else train
    return train, held[: data.eval_examples]


def context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_seq_len", None) or getattr(config, "max_position_embeddings", None)


def check_model(data: FinetuneDataConfig, model: nn.Module) -> None:
    """The rows fit the model, and packing has the per-example attention it needs."""
    context = context_length(model)
    if context is not None and data.seq_len > context:
        raise ValueError(f"data.seq_len={data.seq_len} is longer than the model's {context} positions; lower it")
    if data.pack and not isinstance(model, GPT):
        raise ValueError(
            f"data.pack=true packs examples that attend only to themselves, which plait's models do and "
            f"{type(model).__name__} does not (it would attend across examples); set data.pack=false"
        )


@dataclass
class SFTData:
    """Rows of rendered examples; step `s` takes global_batch rows of one seeded permutation per epoch."""

    train_rows: list[list[Tokens]]
    eval_rows: list[list[Tokens]]
    seq_len: int
    pad_id: int
    positions: bool  # plait's models: position ids per example
    seed: int = 0
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, data: FinetuneDataConfig, tokenizer: BaseTokenizer, *, model: nn.Module, seed: int) -> SFTData:
        check_model(data, model)
        template = resolve_template(data.template, tokenizer)
        train, held = split_examples(data)

        def rows(examples: list[Example]) -> list[list[Tokens]]:
            rendered = [render(example, tokenizer, template=template) for example in examples]
            return pack(rendered, seq_len=data.seq_len, pack=data.pack)

        train_rows = rows(train)
        if not train_rows:
            raise ValueError(f"no training example keeps a response token within data.seq_len={data.seq_len}")
        return cls(
            train_rows=train_rows,
            eval_rows=rows(held),
            seq_len=data.seq_len,
            pad_id=tokenizer.eot_id,
            positions=isinstance(model, GPT),
            seed=seed,
        )

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(len(self.train_rows), generator=generator).tolist()
        return self._orders[epoch]

    def _batch(self, rows: list[list[Tokens]]) -> dict[str, torch.Tensor]:
        """The rows padded to the longest of them (rounded up), not to seq_len: causal attention makes trailing
        padding dead weight, and unpacked pairs are mostly shorter than a row."""
        longest = max(sum(len(tokens.ids) for tokens in row) for row in rows)
        width = min(self.seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        return collate(rows, seq_len=width, pad_id=self.pad_id, positions=self.positions)

    def step_rows(self, step: int, *, global_batch: int) -> list[list[Tokens]]:
        count = len(self.train_rows)
        spots = range(step * global_batch, (step + 1) * global_batch)
        return [self.train_rows[self._order(spot // count)[spot % count]] for spot in spots]

    def step_tokens(self, step: int, *, global_batch: int) -> int:
        """The pairs' own tokens in step `step`'s global batch (padding not counted), for tokens/s."""
        return sum(len(tokens.ids) for row in self.step_rows(step, global_batch=global_batch) for tokens in row)

    def train_batch(self, step: int, dp_rank: int, dp_size: int, *, global_batch: int) -> dict[str, torch.Tensor]:
        """This dp rank's contiguous share of step `step`'s global batch."""
        per_rank = global_batch // dp_size
        rows = self.step_rows(step, global_batch=global_batch)
        return self._batch(rows[dp_rank * per_rank : (dp_rank + 1) * per_rank])

    def eval_batches(self, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        mine = self.eval_rows[dp_rank::dp_size]
        return [self._batch(mine[i : i + EVAL_ROWS_PER_BATCH]) for i in range(0, len(mine), EVAL_ROWS_PER_BATCH)]

    def recipe_data(self, *, global_batch: int) -> RecipeData:
        return RecipeData(
            train_batch=lambda step, rank, size: self.train_batch(step, rank, size, global_batch=global_batch),
            eval_batches=self.eval_batches,
            tokens_per_step=lambda step: self.step_tokens(step, global_batch=global_batch),
        )


def run(config: FinetuneConfig) -> FinetuneSummary:
    """`plait finetune` with recipe.kind = "sft", on this rank."""
    model, tokenizer = load_base(config.base.path)
    data = SFTData.build(config.data, tokenizer, model=model, seed=config.train.seed)
    config_dict, extra = checkpoint_record(config.base.path)
    return train_recipe(
        config,
        model,
        loss_fn=LOSS_FN,
        data=data.recipe_data(global_batch=config.train.global_batch),
        record=CheckpointRecord(config=config_dict, extra=extra),
    )
