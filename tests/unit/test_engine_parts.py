"""Buckets, micro-batching, losses, schedules and clipping, without a process group."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import plait
from plait.config import Plan
from plait.distributed.mesh import Mesh
from plait.engine import split_microbatches
from plait.optim.clip import clip_grad_norm
from plait.optim.schedules import warmup_cosine_factor
from plait.train.reference import train_reference
from plait.zero.buckets import GradBuckets, plan_buckets


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_plan_buckets_respects_the_size_and_keeps_order() -> None:
    params = list(mlp().parameters())
    groups = plan_buckets(params, bucket_bytes=300)
    assert [p for g in groups for p in g] == params
    assert all(sum(p.numel() * 4 for p in g) <= 300 or len(g) == 1 for g in groups)


def test_buckets_launch_in_order_during_backward() -> None:
    model = mlp()
    events: list[str] = []
    buckets = GradBuckets(list(model.parameters()), bucket_bytes=300, reduce_fn=lambda buf: events.append("launch"))
    assert len(buckets.buckets) > 2
    for bucket in buckets.buckets:  # grads are views into the flat buffer: no copy to reduce
        for param in bucket.params:
            assert param.grad.untyped_storage().data_ptr() == bucket.buffer.untyped_storage().data_ptr()
    model[0].weight.register_hook(lambda grad: events.append("first layer's gradient"))
    model(torch.randn(4, 8)).sum().backward()
    events.append("backward ends")
    assert events.index("launch") < events.index("first layer's gradient")  # overlap with backward
    assert events.count("launch") == len(buckets.buckets)
    assert events[-1] == "backward ends"
    buckets.finish()
    with pytest.raises(RuntimeError, match="already reduced"):
        model(torch.randn(4, 8)).sum().backward()


def test_sync_false_accumulates_without_communicating() -> None:
    model = mlp()
    launches: list[torch.Tensor] = []
    buckets = GradBuckets(list(model.parameters()), bucket_bytes=10**6, reduce_fn=launches.append)
    x = torch.randn(4, 8)
    buckets.sync = False
    model(x).sum().backward()
    assert not launches
    buckets.sync = True
    model(x).sum().backward()
    assert len(launches) == 1
    expected = mlp()
    (2 * expected(x).sum()).backward()
    for got, want in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_unused_parameters_are_reduced_at_finish() -> None:
    model = mlp()
    launches: list[torch.Tensor] = []
    buckets = GradBuckets(list(model.parameters()), bucket_bytes=300, reduce_fn=launches.append)
    model[0](torch.randn(2, 8)).sum().backward()  # only the first layer takes part
    launched_in_backward = len(launches)
    buckets.finish()
    assert launched_in_backward < len(buckets.buckets) == len(launches)
    buckets.zero_()
    assert all(float(b.buffer.abs().sum()) == 0 for b in buckets.buckets)


def test_split_microbatches() -> None:
    batch = {"input_ids": torch.arange(12).view(6, 2), "labels": torch.arange(12).view(6, 2)}
    parts = split_microbatches(batch, 3)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 2]
    with pytest.raises(ValueError, match="multiple of 4"):
        split_microbatches(batch, 4)
    with pytest.raises(ValueError, match="disagree"):
        split_microbatches({"input_ids": torch.zeros(4, 2), "labels": torch.zeros(2, 2)}, 1)


def test_causal_lm_shifts_and_ignores() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, 4], [0, -100, -100, 5, 6]])
    loss_sum, count = plait.losses.causal_lm(logits, {"labels": labels})
    assert count.item() == 5 == plait.losses.causal_lm.count_tokens({"labels": labels}).item()
    keep = labels[:, 1:] != -100
    expected = nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], reduction="sum")
    torch.testing.assert_close(loss_sum, expected)


def test_warmup_cosine_shape() -> None:
    factors = [warmup_cosine_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[110] == pytest.approx(0.1) and factors[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_clipping_matches_torch_bit_for_bit() -> None:
    model, twin = mlp(), mlp()
    x = torch.randn(4, 8)
    for m in (model, twin):
        (100 * m(x).sum()).backward()
    norm = clip_grad_norm(list(model.parameters()), max_norm=1.0, mesh=Mesh(Plan()))
    torch_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    assert torch.equal(norm, torch_norm)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_one_rank_engine_equals_the_plain_loop() -> None:
    torch.manual_seed(0)
    batches = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (5, 4, 12))]
    models = [plait.models.build("tiny", vocab_size=64, max_seq_len=12) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opt = plait.optim.adamw(lr=1e-3, weight_decay=0.1, eps=1e-6)
    ref = train_reference(models[0], batches, optimizer=opt, loss_fn=plait.losses.causal_lm, max_grad_norm=1.0)
    engine = plait.boost(
        models[1], optimizer=opt, loss_fn=plait.losses.causal_lm, plan=Plan(microbatches=2), max_grad_norm=1.0
    )
    assert engine.dp_size == 1 and engine.dp_rank == 0
    got = [engine.train_step(b).loss.item() for b in batches]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)
