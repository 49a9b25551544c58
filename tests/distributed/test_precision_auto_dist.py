"""plan.precision="auto" resolves to one precision on every rank (world 2, gloo)."""

from __future__ import annotations

from plait.distributed.precision import agree_on_precision, resolve_precision
from tests.distributed.harness import run_ranks


def _agree(rank: int, world_size: int, flags_by_rank: list[set[str]]) -> str:
    choice = resolve_precision("auto", device_type="cpu", cpu_flags=flags_by_rank[rank])
    return agree_on_precision(choice, device_type="cpu").precision


def test_a_rank_without_bf16_units_makes_every_rank_fp32() -> None:
    assert run_ranks(_agree, 2, [{"amx_bf16"}, {"avx2"}], timeout_s=60) == ["fp32", "fp32"]


def test_ranks_that_all_have_bf16_units_stay_bf16() -> None:
    assert run_ranks(_agree, 2, [{"amx_bf16"}, {"avx512_bf16"}], timeout_s=60) == ["bf16", "bf16"]
