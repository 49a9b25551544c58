"""Pipeline schedules: each pass once, no deadlock, bubbles and memory against theory, errors."""

from __future__ import annotations

from collections import Counter

import pytest

from plait.pipeline.schedules import (
    Action,
    Schedule,
    Transfer,
    action_transfers,
    build_schedule,
    check_rendezvous,
    stage_location,
    transfer_groups,
    virtual_stage,
)
from plait.pipeline.schedules_base import ScheduleDeadlockError
from plait.pipeline.simulate import simulate

SIZES = [(p, m) for p in (2, 4, 8) for m in (p, 2 * p, 4 * p)]
CASES = [(name, p, m, 1) for name in ("gpipe", "1f1b", "zb-h1") for p, m in SIZES] + [
    ("interleaved", p, m, v) for p, m in SIZES for v in (2, 3)
]


def _custom(num_microbatches: int, *rank_actions: tuple[Action, ...]) -> Schedule:
    return Schedule(
        name="custom",
        num_ranks=len(rank_actions),
        num_microbatches=num_microbatches,
        num_chunks=1,
        splits_weight_grad=False,
        rank_actions=rank_actions,
    )


def _build(name: str, p: int, m: int, v: int) -> Schedule:
    return build_schedule(name, num_ranks=p, num_microbatches=m, num_chunks=v)


def _case_id(case: tuple[str, int, int, int]) -> str:
    name, p, m, v = case
    return f"{name}-p{p}-m{m}" + (f"-v{v}" if v > 1 else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_rank_runs_each_pass_once_per_microbatch_and_chunk(case: tuple[str, int, int, int]) -> None:
    schedule = _build(*case)
    _, p, m, v = case
    kinds = "FBW" if schedule.splits_weight_grad else "FB"
    expected = Counter((kind, i, c) for kind in kinds for i in range(m) for c in range(v))
    for rank in range(p):
        assert Counter((a.kind, a.microbatch, a.chunk) for a in schedule.actions(rank)) == expected


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_simulation_completes_and_batched_transfers_cannot_hang(case: tuple[str, int, int, int]) -> None:
    schedule = _build(*case)
    result = simulate(schedule, comm_cost=0.1)
    assert [len(spans) for spans in result.intervals] == [len(schedule.actions(r)) for r in range(case[1])]
    check_rendezvous(schedule)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), SIZES)
def test_gpipe_and_1f1b_bubble_is_exactly_theory(name: str, p: int, m: int) -> None:
    f, b = 1.0, 2.0
    theory = (p - 1) * (f + b) / (m * (f + b) + (p - 1) * (f + b))  # = (p-1)/(m+p-1)
    result = simulate(_build(name, p, m, 1), forward_cost=f, backward_cost=b)
    assert result.bubble_fraction == pytest.approx(theory, abs=1e-9)
    assert result.bubble_fractions == pytest.approx([theory] * p, abs=1e-9)
    assert result.makespan == pytest.approx((m + p - 1) * (f + b))


@pytest.mark.parametrize(("p", "m"), SIZES)
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_bubble_is_theory(p: int, m: int, v: int) -> None:
    # One action is one chunk's pass, so F=1, B=2 per chunk; the ideal step is v*m*(F+B).
    result = simulate(_build("interleaved", p, m, v), forward_cost=1.0, backward_cost=2.0)
    assert result.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-9)


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_zb_h1_bubble_is_a_third_of_1f1b_idle_time(p: int, m: int) -> None:
    # Paper setting F = B = W = 1: 1F1B's full backward costs B + W = 2, so each rank of
    # 1F1B idles (p-1)(F+B+W) = 3(p-1); ZB-H1 idles (p-1)(F+B-W) = p-1, a third of it.
    zb = simulate(_build("zb-h1", p, m, 1), forward_cost=1.0, backward_cost=2.0)
    one_f_one_b = simulate(_build("1f1b", p, m, 1), forward_cost=1.0, backward_cost=2.0)
    assert zb.bubble_fraction < one_f_one_b.bubble_fraction
    assert zb.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-9)
    idle_zb, idle_1f1b = zb.makespan - 3 * m, one_f_one_b.makespan - 3 * m  # each rank's idle time
    assert (idle_zb, idle_1f1b) == pytest.approx((p - 1, 3 * (p - 1)))


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_zb_h1_beats_1f1b_when_weight_grads_are_cheaper(p: int, m: int) -> None:
    zb = simulate(_build("zb-h1", p, m, 1), forward_cost=1.0, backward_cost=2.0, weight_cost=0.6)
    one_f_one_b = simulate(_build("1f1b", p, m, 1), forward_cost=1.0, backward_cost=2.0)
    assert zb.bubble_fraction < one_f_one_b.bubble_fraction


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_peak_activations(p: int, m: int) -> None:
    assert simulate(_build("gpipe", p, m, 1)).peak_activations == (m,) * p
    assert simulate(_build("1f1b", p, m, 1)).peak_activations == tuple(p - r for r in range(p))
    # ZB-H1 counts until W: deferred W passes keep every rank at 1F1B's rank-0 peak, p.
    assert simulate(_build("zb-h1", p, m, 1)).peak_activations == (p,) * p


@pytest.mark.parametrize(("p", "m"), SIZES)
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_peak_is_warmup_plus_one_chunk_activations(p: int, m: int, v: int) -> None:
    expected = [m * v if m == p else min(2 * (p - r - 1) + (v - 1) * p + 1, m * v) for r in range(p)]
    assert list(simulate(_build("interleaved", p, m, v)).peak_activations) == expected


def test_1f1b_and_zb_h1_orders() -> None:
    assert [str(a) for a in _build("1f1b", 3, 4, 1).actions(0)] == ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    zb = _build("zb-h1", 3, 4, 1)
    assert [str(a) for a in zb.actions(0)] == ["F0", "F1", "F2", "B0", "W0", "F3", "B1", "W1", "B2", "W2", "B3", "W3"]
    assert [str(a) for a in zb.actions(2)] == ["F0", "B0", "F1", "B1", "F2", "B2", "W0", "F3", "B3", "W1", "W2", "W3"]
    for rank in range(3):  # rank r defers r W passes to the cool-down
        tail = [a.kind for a in zb.actions(rank)][-(rank + 2) :]
        assert tail == ["B"] + ["W"] * (rank + 1)


def test_interleaved_order_follows_megatron() -> None:
    schedule = _build("interleaved", 2, 4, 2)
    expected = [
        "F0",
        "F1",
        "F0.1",
        "F1.1",
        "F2",
        "B0.1",
        "F3",
        "B1.1",
        "F2.1",
        "B0",
        "F3.1",
        "B1",
        "B2.1",
        "B3.1",
        "B2",
        "B3",
    ]
    assert [str(a) for a in schedule.actions(0)] == expected


def test_virtual_stages_follow_megatron_layout() -> None:
    assert virtual_stage(1, 2, num_ranks=4) == 9
    for stage in range(12):
        rank, chunk = stage_location(stage, num_ranks=4)
        assert virtual_stage(rank, chunk, num_ranks=4) == stage


def test_gpipe_makespan_with_comm_cost() -> None:
    p, m, c = 4, 8, 0.5
    result = simulate(_build("gpipe", p, m, 1), comm_cost=c)
    assert result.makespan == pytest.approx((m + p - 1) * 3.0 + 2 * (p - 1) * c)


def test_split_backward_costs() -> None:
    spans = simulate(_build("zb-h1", 2, 2, 1), backward_cost=3.0, weight_cost=1.0).intervals[0]
    durations = {span.kind: span.end - span.start for span in spans}
    assert durations == {"F": 1.0, "B": 2.0, "W": 1.0}
    with pytest.raises(ValueError, match="lies in"):
        simulate(_build("zb-h1", 2, 2, 1), backward_cost=2.0, weight_cost=3.0)


def test_deadlock_is_reported_with_the_stuck_actions() -> None:
    # Rank 0 wants B0 before sending F1, but rank 1 runs F1 before B0.
    rank0 = (Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1))
    rank1 = (Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1))
    schedule = _custom(2, rank0, rank1)
    with pytest.raises(ScheduleDeadlockError, match=r"rank 0 at B0 .*waits for \[\('B', 1, 0\)\]"):
        simulate(schedule)
    with pytest.raises(ScheduleDeadlockError, match="hangs"):
        check_rendezvous(schedule)


def test_rendezvous_rejects_messages_received_out_of_order() -> None:
    rank0 = (Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1))
    rank1 = (Action("F", 1), Action("B", 1), Action("F", 0), Action("B", 0))
    with pytest.raises(ValueError, match="different order"):
        check_rendezvous(_custom(2, rank0, rank1))


def test_schedule_rejects_missing_and_misordered_actions() -> None:
    with pytest.raises(ValueError, match="missing"):
        _custom(2, (Action("F", 0), Action("B", 0)))
    with pytest.raises(ValueError, match="comes before"):
        _custom(1, (Action("B", 0), Action("F", 0)))


def test_action_transfers() -> None:
    middle = action_transfers(Action("F", 3, 1), 1, num_ranks=4, num_chunks=2)  # stage 5
    assert middle == (
        (Transfer("recv", 0, "activation", 3, 4, 5),),
        (Transfer("send", 2, "activation", 3, 5, 6),),
    )
    wrap = action_transfers(Action("B", 0, 1), 0, num_ranks=4, num_chunks=2)  # stage 4
    assert wrap == ((Transfer("recv", 1, "grad", 0, 5, 4),), (Transfer("send", 3, "grad", 0, 4, 3),))
    assert action_transfers(Action("W", 0), 1, num_ranks=2, num_chunks=1) == ((), ())
    assert action_transfers(Action("F", 0, 1), 0, num_ranks=1, num_chunks=2) == ((), ())  # same rank


def test_transfer_groups_pair_interleaved_steady_passes() -> None:
    schedule = _build("interleaved", 2, 4, 2)
    actions, groups = schedule.actions(1), transfer_groups(schedule, 1)
    assert len(groups) == len(actions) + 1
    b = actions.index(Action("B", 0, 0))  # stage 1, right after F2 on stage 1
    assert actions[b - 1] == Action("F", 2, 0)
    (f_recvs, f_sends), (b_recvs, b_sends) = (
        action_transfers(actions[i], 1, num_ranks=2, num_chunks=2) for i in (b - 1, b)
    )
    assert groups[b] == ()  # nothing between the pair's F and B
    assert tuple(t for t in groups[b - 1] if t.op == "recv") == f_recvs + b_recvs
    assert tuple(t for t in groups[b + 1] if t.op == "send") == f_sends + b_sends


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("pipedream", {}, "choose one of gpipe, 1f1b, interleaved, zb-h1"),
        ("1f1b", {"num_microbatches": 2}, "raise plan.microbatches to at least 4"),
        ("zb-h1", {"num_microbatches": 3}, "raise plan.microbatches to at least 4"),
        ("interleaved", {"num_microbatches": 2, "num_chunks": 2}, "raise plan.microbatches to at least 4"),
        ("interleaved", {"num_microbatches": 6, "num_chunks": 2}, "multiple of num_ranks=4.*to 4 or 8"),
        ("interleaved", {"num_chunks": 1}, "num_chunks >= 2"),
        ("1f1b", {"num_chunks": 2}, "use the 'interleaved' schedule"),
        ("gpipe", {"num_microbatches": 0}, "positive integer"),
    ],
)
def test_build_schedule_errors(name: str, kwargs: dict[str, int], message: str) -> None:
    arguments = {"num_ranks": 4, "num_microbatches": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        build_schedule(name, **arguments)


def test_gpipe_takes_fewer_microbatches_than_ranks() -> None:
    result = simulate(build_schedule("gpipe", num_ranks=4, num_microbatches=1))
    assert result.bubble_fraction == pytest.approx(3 / 4)
