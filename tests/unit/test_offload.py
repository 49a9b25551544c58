"""Offload without a process group: bad plans refused with the fix, placement by budget, the disk store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import plait
from plait.zero.offload.disk import DiskStore, check_offload_dir, supports_direct_io
from plait.zero.offload.host_memory import huge_copy
from plait.zero.offload.pages import Page
from plait.zero.offload.placement import UnitBytes, explicit_tiers, place_by_budget, working_set_bytes


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"memory_budget": "lots"}, "is not a size; write it like '16GiB'"),
        ({"offload_params": "ssd"}, "choose one of none, cpu, disk, auto"),
        ({"offload_optimizer": "auto", "offload_dir": "x"}, "set plan.memory_budget"),
        ({"offload_optimizer": "disk"}, "set plan.offload_dir"),
        ({"memory_budget": "0GiB"}, "give a positive size"),
    ],
)
def test_bad_offload_fields_are_refused_with_the_fix(plan: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plait.Plan(zero=3, **plan)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"zero": 0, "offload_optimizer": "cpu"}, "set plan.zero=1"),
        ({"zero": 2, "offload_params": "cpu", "offload_optimizer": "cpu"}, "needs plan.zero=3"),
        ({"zero": 2, "offload_gradients": "cpu"}, "set plan.offload_optimizer too"),
    ],
)
def test_combinations_offload_cannot_do_are_refused_before_launch(plan: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plait.Plan(**plan).check_available()


def test_a_budget_alone_means_auto_and_parameters_only_under_zero3() -> None:
    assert plait.Plan(zero=3, memory_budget="4GiB", offload_dir="d").offload_tiers == dict.fromkeys(
        ("optimizer", "gradients", "params"), "auto"
    )
    assert plait.Plan(zero=2, memory_budget="4GiB", offload_dir="d").offload_tiers["params"] == "none"
    assert explicit_tiers(plait.Plan(zero=1, offload_optimizer="cpu")).grads == "host"  # grads follow the optimizer


UNITS = [UnitBytes(full=1000, shard=500), UnitBytes(full=4000, shard=2000)]


def test_a_budget_below_the_working_set_names_the_minimum() -> None:
    plan = plait.Plan(zero=3, memory_budget="100", offload_dir="d")
    floor = working_set_bytes(UNITS, plan=plan, param_bytes=4, tiers=explicit_tiers(plan))
    # 3 gathered + 2 reducing units of the largest (4000 x 4 B), staging for 2 of the largest shard per kind
    assert floor == 3 * 16000 + 2 * 16000 + 2 * 2000 * 4 * (1 + 1 + 1 + 2)
    with pytest.raises(ValueError, match=r"raise plan.memory_budget to at least 156\.2 KiB"):
        place_by_budget(UNITS, plan=plan, param_bytes=4, budget=floor - 1)


def test_placement_keeps_the_hottest_states_in_memory_first() -> None:
    plan = plait.Plan(zero=3, memory_budget="1", offload_dir="d", microbatches=4)
    floor = working_set_bytes(UNITS, plan=plan, param_bytes=2, tiers=explicit_tiers(plan))
    # 4 micro-batches: parameter shards are read 8 times a step, gradients 6: all parameter shards
    # (2 B each) fit, then the first unit's gradients (4 B), not the second's
    placed = place_by_budget(UNITS, plan=plan, param_bytes=2, budget=floor + 2 * 2500 + 4 * 500)
    assert [(t.params, t.grads, t.optimizer) for t in placed] == [
        ("device", "host", "disk"),
        ("device", "disk", "disk"),
    ]


def test_offload_dir_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist; create it"):
        check_offload_dir(str(tmp_path / "missing"), needed_bytes=1)
    with pytest.raises(ValueError, match=r"free but the offloaded state needs"):
        check_offload_dir(str(tmp_path), needed_bytes=2**60)
    if Path("/dev/shm").is_dir() and not supports_direct_io(Path("/dev/shm")):
        note = check_offload_dir("/dev/shm", needed_bytes=1)
        assert "does not take O_DIRECT" in note and "buffered I/O" in note


@pytest.mark.parametrize("direct", [True, False])
def test_pages_round_trip_through_the_disk(tmp_path: Path, direct: bool) -> None:
    if direct and not supports_direct_io(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    store = DiskStore(str(tmp_path), rank=0, direct=direct)
    big = torch.randn(9_000_001)  # crosses the 32 MiB bounce buffer, ends off a 4 KiB boundary
    small = torch.arange(7, dtype=torch.bfloat16)
    expected = [big.clone(), small.clone()]
    page = Page("unit0.master", [big, small], store=store)
    page.evict(write=True)
    page.wait()  # waits for the write, then reads back
    assert all(torch.equal(a, b) for a, b in zip(page.tensors, expected, strict=True))
    page.evict(write=False)
    assert big.untyped_storage().nbytes() == 0
    page.fetch()
    page.wait()
    assert torch.equal(big, expected[0])
    grads = Page("unit0.grads", [torch.ones(5)], store=store, fresh=True)
    grads.mark_fresh()
    grads.wait()  # fresh: zeros, nothing read
    assert torch.equal(grads.tensors[0], torch.zeros(5))
    assert store.stats.read_bytes == 2 * (big.numel() * 4 + small.numel() * 2)
    directory = store.directory
    store.close()
    assert not directory.exists() and not any(os.scandir(tmp_path))


def _huge_bytes_behind(tensor: torch.Tensor) -> int | None:
    """AnonHugePages of the mapping holding the middle of `tensor` (asking for huge pages splits its mapping
    at the 2 MiB boundaries); None where /proc/self/smaps is not there."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    address, inside = tensor.data_ptr() + tensor.numel() * tensor.element_size() // 2, False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(part, 16) for part in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return None


def test_host_buffers_ask_for_huge_pages_and_keep_their_values() -> None:
    source = torch.randn(16 << 20)  # 64 MiB
    copy = huge_copy(source)
    assert torch.equal(copy, source) and copy.data_ptr() != source.data_ptr()
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this kernel offers no transparent huge pages")
    huge = _huge_bytes_behind(copy)
    if huge is None:
        pytest.skip("no /proc/self/smaps here")
    assert huge >= 32 << 20, f"only {huge} bytes of the 64 MiB buffer are on huge pages"
