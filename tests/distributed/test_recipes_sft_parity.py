"""SFT (prompt-masked, packed instruction pairs) under dp=2 x ZeRO-3 against one plain process: the recipe's
own batches (SFTData.train_batch per dp rank), 10 fp32 steps, same losses every step, same final weights."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import plait
from plait.models import build
from plait.recipes.base import BaseTokenizer
from plait.recipes.data.instructions import Example, pack, render
from plait.recipes.sft import LOSS_FN, SFTData
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import assert_parity, optimizer

STEPS = 10
GLOBAL_BATCH = 8
SEQ = 96
WORDS = ("alpha", "beta", "gamma", "delta", "return", "value", "list", "sum", "the", "of", "def", "self")


def tiny_tokenizer() -> BaseTokenizer:
    """A byte-level BPE of 300 tokens trained on the test's words, <eot> at id 0 (no chat template)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eot>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = "### Instruction:\n" + " ".join(WORDS) + "\n\n### Response:\n"
    tokenizer.train_from_iterator([text] * 20, trainer=trainer)
    return BaseTokenizer(backend=tokenizer, eot_id=tokenizer.token_to_id("<eot>"))


def examples(count: int, *, seed: int) -> list[Example]:
    """Instruction pairs of random words: prompts and responses of uneven lengths."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    return [Example.pair(words(1, 6), words(1, 8)) for _ in range(count)]


def sft_data() -> SFTData:
    tokenizer = tiny_tokenizer()

    def rows(items: list[Example]) -> list:
        return pack([render(e, tokenizer, template="plain") for e in items], seq_len=SEQ, pack=True)

    return SFTData(
        train_rows=rows(examples(60, seed=1)), eval_rows=rows(examples(8, seed=2)), seq_len=SEQ, pad_id=0,
        positions=True, seed=3,
    )  # fmt: skip


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("tiny", max_seq_len=SEQ)


def scheduler(opt: torch.optim.Optimizer) -> object:
    return plait.optim.warmup_cosine(opt, warmup=2, total=STEPS)


def train_plan(rank: int, world_size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    engine = plait.boost(
        fresh_model(),
        optimizer=optimizer,
        loss_fn=LOSS_FN,
        plan=plait.Plan(dp=world_size, zero=3, bucket_mb=0.01),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    data = sft_data()
    batches = [
        data.train_batch(step, engine.dp_rank, engine.dp_size, global_batch=GLOBAL_BATCH) for step in range(STEPS)
    ]
    losses = [engine.train_step(batch).loss.item() for batch in batches]
    return losses, engine.model_state_dict()


def reference_losses(data: SFTData, model: torch.nn.Module, *, positions: bool = True) -> list[float]:
    batches = [data.train_batch(step, 0, 1, global_batch=GLOBAL_BATCH) for step in range(STEPS)]
    batches = batches if positions else [{**b, "position_ids": None} for b in batches]
    kwargs = dict(optimizer=optimizer, loss_fn=LOSS_FN, lr_scheduler=scheduler, max_grad_norm=1.0)
    return train_reference(model, batches, **kwargs)


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    data = sft_data()
    first = data.train_batch(0, 0, 1, global_batch=GLOBAL_BATCH)
    assert all(len(row) >= 2 for row in data.step_rows(0, global_batch=GLOBAL_BATCH))  # rows pack several pairs
    masked = first["labels"] == -100
    assert masked.any() and (~masked).any()  # prompts masked, responses trained
    model = fresh_model()
    losses = reference_losses(data, model)
    across = reference_losses(data, fresh_model(), positions=False)
    assert abs(across[0] - losses[0]) > 1e-4  # the per-pair attention matters: pairs attending across differ
    return losses, model.state_dict()


def test_sft_dp2_zero3_matches_one_process(reference: tuple) -> None:
    assert_parity(run_ranks(train_plan, 2, timeout_s=240), reference)
