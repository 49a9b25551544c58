"""Vocab-parallel cross entropy equals F.cross_entropy on the gathered logits, in 1/tp of the memory."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from plait.tensor import VocabParallelHead, VocabShard, is_vocab_sharded, vocab_parallel_cross_entropy
from tests.distributed.harness import run_ranks

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _shard_of(vocab: int) -> tuple[VocabShard, slice]:
    rank, size = dist.get_rank(), dist.get_world_size()
    width = -(-vocab // size)
    columns = slice(rank * width, min((rank + 1) * width, vocab))
    return VocabShard(group=dist.group.WORLD, start=columns.start, full_size=vocab), columns


def _dense_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none", ignore_index=-100)
    return flat.view(targets.shape)


def _problem(vocab: int, *, batch: int = 3, seq: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, targets (every fourth ignored) and an upstream gradient, the same on every rank."""
    torch.manual_seed(vocab)
    logits = torch.randn(batch, seq, vocab) * 3
    targets = torch.randint(vocab, (batch, seq))
    targets.view(-1)[::4] = -100
    return logits, targets, torch.randn(batch, seq)


def _check_values_and_grads(vocab: int, dtype: torch.dtype) -> None:
    logits, targets, grad_out = _problem(vocab)
    logits = logits.to(dtype)
    full = logits.detach().float().requires_grad_()
    expected = _dense_loss(full, targets)
    expected.backward(grad_out)
    shard, columns = _shard_of(vocab)
    local = logits[..., columns].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, shard=shard)
    loss.backward(grad_out)
    assert loss.dtype == torch.float32 and local.grad.dtype == dtype
    assert not loss[targets == -100].any()
    # The loss is computed in fp32 from the same values; a bf16 gradient is the fp32 one rounded (1 ulp).
    grad_tolerance = TOLERANCE if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-5}
    assert_close(loss, expected, **TOLERANCE)
    assert_close(local.grad, full.grad[..., columns].to(dtype), **grad_tolerance)


def _check_with_head(vocab: int) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(8, vocab, bias=False)
    x = torch.randn(2, 4, 8)
    targets = torch.randint(vocab, (2, 4))
    x_dense, x_local = x.clone().requires_grad_(), x.clone().requires_grad_()
    _dense_loss(dense(x_dense), targets).sum().backward()
    head = VocabParallelHead.from_dense(dense, group=dist.group.WORLD, name="lm_head")
    logits = head(x_local)
    loss = vocab_parallel_cross_entropy(logits, targets, shard=is_vocab_sharded(logits))
    loss.sum().backward()
    assert_close(x_local.grad, x_dense.grad, **TOLERANCE)


def _values_and_grads(rank: int, world_size: int) -> None:
    for vocab in (37, 40):  # 37: the last shard is narrower
        _check_values_and_grads(vocab, torch.float32)
    _check_values_and_grads(37, torch.bfloat16)
    _check_with_head(37)


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_cross_entropy_matches_dense(world_size: int) -> None:
    run_ranks(_values_and_grads, world_size, timeout_s=60)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors allocated inside the mode that are still alive, and their peak.

    An op's output counts when its storage is new (not one of its inputs' storages,
    so views and in-place results are free); a weakref finalizer subtracts it when
    the tensor is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in inputs or key in self.live:
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(tensor, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def _peak_bytes(loss_of: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, grad_out: torch.Tensor) -> int:
    """Peak live bytes allocated by forward + backward of loss_of(logits) (the logits themselves excluded)."""
    logits = logits.clone().requires_grad_()
    with LiveBytes() as tracker:
        loss_of(logits).backward(grad_out)
        del logits
    return tracker.peak


def _memory(rank: int, world_size: int) -> tuple[int, int, int, int]:
    vocab, (batch, seq) = 2048, (2, 8)
    logits, targets, grad_out = _problem(vocab, batch=batch, seq=seq)
    shard, columns = _shard_of(vocab)
    gathered = _peak_bytes(lambda full: _dense_loss(full, targets), logits, grad_out)
    local_logits = logits[..., columns]
    parallel = _peak_bytes(
        lambda local: vocab_parallel_cross_entropy(local, targets, shard=shard), local_logits, grad_out
    )
    return gathered, parallel, local_logits.numel() * 4, batch * seq


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_cross_entropy_memory(world_size: int) -> None:
    """Bound: parallel_peak <= gathered_peak / tp + 128 * num_tokens bytes.

    128 bytes per token (32 fp32 values) covers the per-token vectors (max, sums,
    target logit, masks, int64 indices, the loss); the (tokens, vocab) terms must
    shrink by tp. Stronger: the vocab-parallel loss holds one fp32 buffer of the
    local logits' size (the softmax, turned into the gradient in place), so its
    peak is at most that buffer + 128 * num_tokens. The gathered reference holds at
    least two (tokens, vocab) fp32 buffers at once (log-softmax output + gradient),
    which checks that the tracker sees the allocations at all.
    """
    for gathered, parallel, local_bytes, num_tokens in run_ranks(_memory, world_size, timeout_s=60):
        per_token_allowance = 128 * num_tokens
        assert gathered >= 2 * local_bytes * world_size, (gathered, local_bytes)
        assert parallel <= gathered / world_size + per_token_allowance, (parallel, gathered)
        assert parallel <= local_bytes + per_token_allowance, (parallel, local_bytes)
