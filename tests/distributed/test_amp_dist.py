"""The loss scaler's overflow check agrees across ranks (world 2, gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.amp import LossScaler, Overflow
from tests.distributed.harness import run_ranks

NAMES = [f"layers.{i}.weight" for i in range(6)]


def _check(rank: int, world_size: int, bad_index_by_rank: dict[int, int], use_world: bool) -> Overflow:
    grads = [torch.randn(3, 2) for _ in NAMES]
    bad = bad_index_by_rank.get(rank)
    if bad is not None:
        grads[bad][0, 1] = float("inf")
    group = dist.new_group(list(range(world_size)))
    groups = [None, group] if use_world else [None]
    return LossScaler().check_overflow(list(zip(NAMES, grads, strict=True)), groups=groups)


def test_all_ranks_agree_on_the_first_overflowing_parameter() -> None:
    # Rank 1 holds the inf of parameter 2, rank 0 a later one (4): both must name parameter 2.
    results = run_ranks(_check, 2, {1: 2, 0: 4}, True, timeout_s=60)
    assert results == [Overflow(found=True, first_name="layers.2.weight")] * 2


def test_no_overflow_anywhere() -> None:
    results = run_ranks(_check, 2, {}, True, timeout_s=60)
    assert results == [Overflow(found=False, first_name=None)] * 2


def test_none_groups_are_local_only() -> None:
    # With only None groups nothing is reduced: each rank sees its own first inf.
    results = run_ranks(_check, 2, {1: 2, 0: 4}, False, timeout_s=60)
    assert [r.first_name for r in results] == ["layers.4.weight", "layers.2.weight"]


def _shards_with_gaps(rank: int, world_size: int) -> Overflow:
    # ZeRO-style: each rank holds some parameters' shards, None or empty for the rest; the inf lives on rank 1 only.
    named: list[tuple[str, torch.Tensor | None]] = []
    for index, name in enumerate(NAMES):
        owner = index % world_size
        named.append((name, torch.zeros(4) if owner == rank else (None if index % 3 else torch.empty(0))))
    if rank == 1:
        named[3][1][2] = float("nan")
    return LossScaler(dynamic=False).check_overflow(named, groups=[dist.group.WORLD])


def test_overflow_on_a_shard_another_rank_holds() -> None:
    results = run_ranks(_shards_with_gaps, 2, timeout_s=60)
    assert results == [Overflow(found=True, first_name="layers.3.weight")] * 2
