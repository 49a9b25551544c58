"""Under tp=2 a user's whole-vocabulary loss fails on every rank with the fix; plait's and correct ones train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import plait
from plait.tensor import gather_vocab_logits, is_vocab_sharded, vocab_parallel_cross_entropy
from tests.distributed.harness import run_ranks

VOCAB = 64


def _engine(loss_fn) -> plait.Engine:
    torch.manual_seed(0)
    model = plait.models.build("tiny", vocab_size=VOCAB, max_seq_len=16)
    return plait.boost(
        model, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), loss_fn=loss_fn, plan=plait.Plan(dp=1, tp=2)
    )


def _batch(high: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, high, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def users_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1))


def gathered_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return users_cross_entropy(gather_vocab_logits(logits), batch)


def vocab_parallel(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return vocab_parallel_cross_entropy(logits, targets, shard=is_vocab_sharded(logits)).sum() / (targets != -100).sum()


def refusals_and_losses(rank: int, world_size: int) -> dict:
    messages = []
    for high in (VOCAB, VOCAB // 2):  # targets anywhere (torch's IndexError), and inside rank 0's slice (silent)
        with pytest.raises(ValueError) as refused:
            _engine(users_cross_entropy).train_step(_batch(high))
        messages.append(str(refused.value))
    losses = {
        name: _engine(loss_fn).train_step(_batch(VOCAB)).loss.item()
        for name, loss_fn in [
            ("causal_lm", plait.losses.causal_lm),
            ("causal_lm_mean", plait.losses.causal_lm_mean),
            ("gathered", gathered_cross_entropy),
            ("vocab_parallel", vocab_parallel),
        ]
    }
    return {"messages": messages, "losses": losses}


def test_a_whole_vocabulary_loss_on_vocab_parallel_logits_names_the_fix() -> None:
    for result in run_ranks(refusals_and_losses, 2, timeout_s=60):
        for message in result["messages"]:
            assert "torch.nn.functional.cross_entropy to vocab-parallel logits" in message
            assert f"{VOCAB // 2} of the {VOCAB} vocabulary columns" in message
            assert "plait.losses.causal_lm" in message and "gather_vocab_logits" in message
        losses = result["losses"]  # one loss, however it is computed correctly
        for name in ("causal_lm_mean", "gathered", "vocab_parallel"):
            assert losses[name] == pytest.approx(losses["causal_lm"], rel=1e-5), name
