"""CheckedLoss: a whole-vocabulary loss on vocab-parallel logits is refused, plait's losses pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plait.losses import causal_lm, causal_lm_mean
from plait.tensor import VocabShard, set_vocab_shard
from plait.tensor.loss_check import CheckedLoss


def _sliced_logits(width: int = 5, full_size: int = 10) -> torch.Tensor:
    """Rank 0's slice of a `full_size` vocabulary, with no group (the loss's collectives are skipped)."""
    logits = torch.randn(2, 4, width, requires_grad=True)
    return set_vocab_shard(logits, VocabShard(group=None, start=0, full_size=full_size))


def _batch() -> dict[str, torch.Tensor]:
    labels = torch.randint(0, 5, (2, 4))  # inside the slice: a plain cross entropy would not even fail
    return {"input_ids": labels, "labels": labels}


def _plain_cross_entropy(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(outputs[:, :-1].reshape(-1, outputs.size(-1)), batch["labels"][:, 1:].reshape(-1))


def _by_log_softmax(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return -outputs.log_softmax(-1).gather(-1, batch["labels"].unsqueeze(-1)).mean()


def _transposed(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.CrossEntropyLoss()(outputs.transpose(1, 2), batch["labels"])


@pytest.mark.parametrize("loss_fn", [_plain_cross_entropy, _by_log_softmax, _transposed])
def test_a_whole_vocabulary_loss_on_slices_is_refused_with_the_fix(loss_fn) -> None:
    with pytest.raises(ValueError, match=r"vocab-parallel logits.*5 of the 10.*plait\.losses\.causal_lm"):
        CheckedLoss(loss_fn)(_sliced_logits(), _batch())


def test_plait_losses_and_unsharded_outputs_pass_unchanged() -> None:
    batch = _batch()
    for loss in (causal_lm, causal_lm_mean):
        checked = CheckedLoss(loss)
        assert checked.reads_labels and getattr(checked, "count_tokens", None) == getattr(loss, "count_tokens", None)
        for logits in (_sliced_logits(), _sliced_logits(width=10, full_size=10)):
            torch.testing.assert_close(checked(logits, batch), loss(logits, batch))
    plain = torch.randn(2, 4, 5)  # no vocab shard: a user's loss runs untouched
    torch.testing.assert_close(CheckedLoss(_plain_cross_entropy)(plain, batch), _plain_cross_entropy(plain, batch))
