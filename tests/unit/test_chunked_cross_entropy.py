"""The chunked linear cross entropy equals F.cross_entropy on the logits, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import plait
from plait.losses import ChunkedCausalLM, causal_lm
from plait.models.head_output import head_of
from plait.tensor.chunked_cross_entropy import chunked_linear_cross_entropy
from plait.train.metrics import peak_live_tensor_bytes


def _inputs(*, bias: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(97, 16, generator=gen, requires_grad=True)
    b = torch.randn(97, generator=gen, requires_grad=True) if bias else None
    targets = torch.randint(0, 97, (3, 37), generator=gen)
    targets[torch.rand(3, 37, generator=gen) < 0.2] = -100
    return hidden, weight, b, targets


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk_size", [1, 16, 37, 111, 4096])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_cross_entropy_with_ignore_index(chunk_size: int, bias: bool) -> None:
    hidden, weight, b, targets = _inputs(bias=bias)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    logits = F.linear(hidden, weight, b)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    got = chunked_linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for want, have in zip(_grads(expected * 0.3, leaves), _grads(got * 0.3, leaves), strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_no_grad_and_bad_arguments() -> None:
    hidden, weight, _, targets = _inputs(bias=False)
    with torch.no_grad():
        got = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=10)
    want = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=0)
    big_weight = torch.randn(4096, 16, requires_grad=True)
    with torch.no_grad():  # evaluation: one chunk's logits at a time, no gradient buffers (4096 x 16 fp32 each)
        live = peak_live_tensor_bytes(lambda: chunked_linear_cross_entropy(hidden, big_weight, targets, chunk_size=8))
    assert live["peak"] - live["start"] < big_weight.numel() * 4
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        chunked_linear_cross_entropy(hidden, weight, targets[:, 1:])
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedCausalLM(0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_gpt_hidden_states_give_causal_lm_and_its_gradients(preset: str) -> None:
    torch.manual_seed(0)
    model = plait.models.build(preset, max_seq_len=16)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    batch["labels"][0, 5:] = -100
    logits = model(batch["input_ids"])  # the plain call still returns logits
    assert logits.shape[-1] == model.config.vocab_size and head_of(logits) is None
    want, want_count = causal_lm(logits, batch)
    want_grads = _grads(want, list(model.parameters()))
    hidden = model(batch["input_ids"], return_hidden=True)
    assert head_of(hidden) is model.lm_head and isinstance(model.lm_head, torch.nn.Linear)
    got, count = ChunkedCausalLM(7)(hidden, batch)
    assert int(count) == int(want_count)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for have, expect in zip(_grads(got, list(model.parameters())), want_grads, strict=True):
        torch.testing.assert_close(have, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ChunkedCausalLM(7)(logits, batch)[0], want)  # logits: causal_lm's path


def test_train_loss_chunk_is_validated_and_picks_the_chunked_loss() -> None:
    from plait.config import Config, Plan, TaskConfig, TrainConfig
    from plait.train.text_tasks import text_task

    assert text_task(Config()).loss_fn is causal_lm
    chunked = text_task(Config(train=TrainConfig(loss_chunk=512))).loss_fn
    assert isinstance(chunked, ChunkedCausalLM) and chunked.chunk_size == 512
    with pytest.raises(ValueError, match="loss_chunk"):
        TrainConfig(loss_chunk=-1)
    Config(train=TrainConfig(loss_chunk=512), plan=Plan(zero=3))  # the loss runs inside the head's call
    with pytest.raises(ValueError, match="masked_lm"):
        Config(train=TrainConfig(loss_chunk=512), task=TaskConfig(kind="masked_lm"))


def test_a_transformers_model_takes_the_plain_path() -> None:
    from plait.losses import with_hidden_request
    from tests.hf_models import tiny_model

    model = tiny_model("llama")
    batch = {"input_ids": torch.randint(0, 96, (2, 12)), "labels": torch.randint(0, 96, (2, 12))}
    assert with_hidden_request(batch, loss_fn=ChunkedCausalLM(5), model=model) is batch  # no return_hidden
    outputs = model(input_ids=batch["input_ids"])
    torch.testing.assert_close(ChunkedCausalLM(5)(outputs, batch)[0], causal_lm(outputs, batch)[0], rtol=0, atol=0)
    gpt = plait.models.build("tiny", max_seq_len=16)
    assert with_hidden_request(batch, loss_fn=ChunkedCausalLM(5), model=gpt)["return_hidden"] is True
    assert with_hidden_request(batch, loss_fn=causal_lm, model=gpt) is batch
