"""What context parallel refuses, before any ring is built."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.context.apply import check_context_parallel
from plait.context.batch import context_loss, shard_batch


def test_a_model_without_ring_attention_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="needs plait's GPT models"):
        check_context_parallel(torch.nn.Linear(4, 4))


def test_attention_dropout_is_refused() -> None:
    model = plait.models.build("tiny-llama", dropout=0.1)
    with pytest.raises(ValueError, match="attention dropout"):
        check_context_parallel(model)
    assert len(check_context_parallel(plait.models.build("tiny-llama"))) == model.config.num_layers


def test_only_the_causal_lm_loss_is_taken() -> None:
    with pytest.raises(ValueError, match=r"needs loss_fn=plait\.losses\.causal_lm"):
        context_loss(plait.losses.causal_lm_mean)


def test_labels_are_shifted_before_the_split() -> None:
    ids = torch.arange(8)[None]
    shard = shard_batch({"input_ids": ids, "labels": ids.clone()}, rank=1, size=2)
    assert shard["input_ids"].tolist() == [[2, 3, 4, 5]]  # chunks 1 and 2 of 4
    assert shard["labels"].tolist() == [[3, 4, 5, 6]]  # each token's next one, across the chunk's end
    assert shard["position_ids"].tolist() == [2, 3, 4, 5]
    last = shard_batch({"input_ids": ids, "labels": ids.clone()}, rank=0, size=2)
    assert last["labels"].tolist() == [[1, 2, 7, -100]]  # chunks 0 and 3: the row's last token predicts nothing


@pytest.mark.parametrize("family", ["phi3", "opt", "gemma2"])
def test_hf_models_without_cp_parity_are_refused(family: str) -> None:
    from plait.context.hf import hf_attention_layers
    from tests.hf_models import tiny_model

    with pytest.raises(ValueError, match="not available yet in plait"):
        hf_attention_layers(tiny_model(family))


def test_packed_documents_of_an_hf_model_are_refused() -> None:
    from plait.context.apply import ContextParallel

    ids = torch.arange(8)[None]
    with pytest.raises(ValueError, match="packed documents"):
        ContextParallel(None, hf=True).shard({"input_ids": ids, "labels": ids, "position_ids": ids})
