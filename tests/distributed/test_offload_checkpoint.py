"""Checkpoints of offloaded state: saved from disk pages and loaded into them a unit at a time, resumed under
another placement.

Each case trains 4 steps, saves, trains 4 more; a fresh engine (possibly under another placement) loads the
checkpoint and trains the same 4 steps. The same placement continues bit for bit; another one within the
parity tolerances (1e-5 relative losses, allclose(1e-5, 1e-6) weights): reductions add in another order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from plait.checkpoint.io import open_checkpoint
from tests.distributed.harness import run_ranks
from tests.distributed.test_offload import ALL_DISK, offload_engine
from tests.distributed.test_parity import fresh_model, make_batches, shard_of

SPLIT = 4  # steps before the checkpoint, and after it
ZERO3_DISK = {"zero": 3, **ALL_DISK}
ZERO1_OPTIMIZER_DISK = {"zero": 1, "offload_optimizer": "disk"}


class PagedPeak:
    """The most bytes of resident master and optimizer-state pages at any unit boundary while armed, next
    to the largest unit's (a save or load may hold two units: the one in use and the one being read or
    written). Pages the step evicted before, whose writes may still be in flight, are the step's."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.armed = False
        self.peak = 0
        self.checks = 0
        engine.offload.observers.append(self)

    def __call__(self, where: str) -> None:
        if self.armed:
            self.checks += 1
            self.peak = max(self.peak, sum(page.nbytes for page in self._pages() if page.resident))

    def _pages(self):
        pages = [unit.pages for unit in self.engine.offload.units if unit.pages is not None]
        return [page for p in pages for page in (p.master, p.moments) if page is not None]

    def summary(self) -> dict[str, int]:
        units = [unit.pages for unit in self.engine.offload.units if unit.pages is not None]
        sizes = sorted(sum(page.nbytes for page in (p.master, p.moments) if page is not None) for p in units)
        return {"peak": self.peak, "checks": self.checks, "two_largest_units": sum(sizes[-2:]), "all": sum(sizes)}


def _train(engine, batches) -> list[float]:
    return [engine.train_step(shard_of(batch, engine)).loss.item() for batch in batches]


def _engine(plan: dict, offload_dir: str):
    model = fresh_model("tiny")
    engine = offload_engine(model, 2, **plan, offload_dir=offload_dir)
    return engine, make_batches(model.config.vocab_size)[: 2 * SPLIT]


def save_midway(rank: int, world: int, plan: dict, offload_dir: str, checkpoint: str, asynchronous: bool):
    """Train, save after SPLIT steps, train on; the steps after the save, the final weights, and what the
    save held in memory."""
    engine, batches = _engine(plan, offload_dir)
    _train(engine, batches[:SPLIT])
    peak = PagedPeak(engine) if engine.offload is not None and not asynchronous else None
    if peak is not None:
        peak.armed = True
    engine.save(checkpoint, asynchronous=asynchronous)
    if peak is not None:
        peak.armed = False
    after = _train(engine, batches[SPLIT:])
    state = engine.model_state_dict()
    engine.close()
    return after, state, peak.summary() if peak is not None else None


def load_and_continue(rank: int, world: int, plan: dict, offload_dir: str, checkpoint: str, warm: bool):
    """Load (`warm`: into an engine that has stepped once, whose optimizer state the checkpoint's replaces)
    and train the steps after the save."""
    engine, batches = _engine(plan, offload_dir)
    if warm:
        _train(engine, batches[-1:])
    peak = PagedPeak(engine) if engine.offload is not None else None
    if peak is not None:
        peak.armed = True
    engine.load(checkpoint)
    if peak is not None:
        peak.armed = False
    after = _train(engine, batches[SPLIT:])
    state = engine.model_state_dict()
    engine.close()
    return after, state, peak.summary() if peak is not None else None


def _assert_bounded(peak: dict | None) -> None:
    if peak is not None:
        assert peak["checks"] > 0, peak
        assert peak["peak"] <= peak["two_largest_units"] < peak["all"], f"more than two units in memory: {peak}"


def _both(tmp_path: Path, saved_under: dict, loaded_under: dict, *, asynchronous: bool = False, warm: bool = False):
    checkpoint = str(tmp_path / "checkpoint")
    (tmp_path / "offload").mkdir()
    offload_dir = str(tmp_path / "offload")
    whole = run_ranks(save_midway, 2, saved_under, offload_dir, checkpoint, asynchronous)
    resumed = run_ranks(load_and_continue, 2, loaded_under, offload_dir, checkpoint, warm)
    assert not any((tmp_path / "offload").iterdir()), "the offload files were not removed"
    for _, _, peak in whole + resumed:
        _assert_bounded(peak)
    return whole, resumed


def test_zero3_everything_on_disk_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Saved asynchronously (the tiny state fits in host memory: copied a unit at a time)."""
    whole, resumed = _both(tmp_path, ZERO3_DISK, ZERO3_DISK, asynchronous=True)
    for (losses, state, _), (resumed_losses, resumed_state, _) in zip(whole, resumed, strict=True):
        assert resumed_losses == losses
        assert state.keys() == resumed_state.keys()
        for name, value in state.items():
            assert torch.equal(resumed_state[name], value), name


PLACEMENTS = {
    "disk -> memory": (ZERO3_DISK, {"zero": 3}),
    "memory -> disk": ({"zero": 3}, ZERO3_DISK),
}


@pytest.mark.parametrize("case", list(PLACEMENTS))
def test_resume_under_another_placement_matches_the_uninterrupted_run(tmp_path: Path, case: str) -> None:
    saved_under, loaded_under = PLACEMENTS[case]
    whole, resumed = _both(tmp_path, saved_under, loaded_under)
    for (losses, state, _), (resumed_losses, resumed_state, _) in zip(whole, resumed, strict=True):
        torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(losses), rtol=1e-5, atol=0)
        for name, value in state.items():
            torch.testing.assert_close(resumed_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def save_again(rank: int, world: int, plan: dict, offload_dir: str, source: str, target: str):
    """Load `source` and save it at once, asynchronously (a memory budget makes that synchronous);
    returns whether the log said so."""
    engine, _ = _engine(plan, offload_dir)
    engine.load(source)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("plait").addHandler(handler)
    engine.save(target, asynchronous=True)
    logging.getLogger("plait").removeHandler(handler)
    engine.close()
    return any("writing synchronously" in message for message in records)


def test_zero1_optimizer_on_disk_round_trip_changes_no_bit(tmp_path: Path) -> None:
    """ZeRO-1 with the optimizer on disk: loaded into an engine that has stepped (its paged optimizer state
    replaced), the run continues bit for bit; loaded into a fresh one and saved again, every tensor is equal."""
    whole, resumed = _both(tmp_path, ZERO1_OPTIMIZER_DISK, ZERO1_OPTIMIZER_DISK, warm=True)
    for (losses, state, _), (resumed_losses, resumed_state, _) in zip(whole, resumed, strict=True):
        assert resumed_losses == losses
        for name, value in state.items():
            assert torch.equal(resumed_state[name], value), name
    first, again = tmp_path / "checkpoint", tmp_path / "again"
    budgeted = {**ZERO1_OPTIMIZER_DISK, "memory_budget": "1GiB"}
    logged = run_ranks(save_again, 2, budgeted, str(tmp_path / "offload"), str(first), str(again))
    assert all(logged), "an asynchronous save under a memory budget did not say it wrote synchronously"
    a, b = open_checkpoint(first), open_checkpoint(again)
    assert sorted(a.tensors) == sorted(b.tensors)
    assert any(name.startswith("optim/exp_avg_sq/") for name in a.tensors)
    for name in a.tensors:
        assert torch.equal(a.whole(name), b.whole(name)), name
