"""The schedule builders: GPipe, 1F1B, interleaved 1F1B and ZB-H1.

Each builder returns a `Schedule`; `build_schedule` in `schedules.py` picks
one by name. Rank r of p is stage r; micro-batches enter in order 0..m-1.
"""

from __future__ import annotations

from collections.abc import Callable

from plait.pipeline.schedules_base import Action, Schedule


def gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards (in micro-batch order).

    Holds all m micro-batches' activations at once; works for any m >= 1.
    """
    _check_positive(num_ranks=num_ranks, num_microbatches=num_microbatches)
    actions = tuple(Action("F", i) for i in range(num_microbatches)) + tuple(
        Action("B", i) for i in range(num_microbatches)
    )
    return Schedule(
        name="gpipe",
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        num_chunks=1,
        splits_weight_grad=False,
        rank_actions=(actions,) * num_ranks,
    )


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): rank r runs p-r-1 warm-up forwards, then
    alternates one forward and one backward, then drains the backwards.

    Rank r holds at most p - r micro-batches' activations. Needs m >= p.
    """
    return _rank_by_rank("1f1b", _one_f_one_b_rank, num_ranks, num_microbatches, splits_weight_grad=False)


def _rank_by_rank(
    name: str,
    rank_order: Callable[[int, int, int], tuple[Action, ...]],
    num_ranks: int,
    num_microbatches: int,
    *,
    splits_weight_grad: bool,
) -> Schedule:
    """A one-chunk schedule that needs m >= p, each rank's order from ``rank_order(rank, p, m)``."""
    _check_enough_microbatches(name, num_ranks, num_microbatches)
    return Schedule(
        name=name,
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        num_chunks=1,
        splits_weight_grad=splits_weight_grad,
        rank_actions=tuple(rank_order(rank, num_ranks, num_microbatches) for rank in range(num_ranks)),
    )


def _one_f_one_b_rank(rank: int, num_ranks: int, num_microbatches: int) -> tuple[Action, ...]:
    num_warmup = num_ranks - rank - 1
    order = [Action("F", i) for i in range(num_warmup)]
    for i in range(num_microbatches - num_warmup):
        order += [Action("F", num_warmup + i), Action("B", i)]
    order += [Action("B", i) for i in range(num_microbatches - num_warmup, num_microbatches)]
    return tuple(order)


def zero_bubble_h1(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"), the handcrafted schedule.

    Backward is split into B (input gradient, on the critical path) and W
    (weight gradient). Rank r keeps 1F1B's order of F and B, with its first r
    W passes deferred: it runs F,B for r steady steps, then F,B,W, then B,W,
    then the r W passes still owed, which fill the cool-down bubble. Peak
    activations stay 1F1B's: p micro-batches, counting until W. Needs m >= p.
    """
    return _rank_by_rank("zb-h1", _zero_bubble_h1_rank, num_ranks, num_microbatches, splits_weight_grad=True)


def _zero_bubble_h1_rank(rank: int, num_ranks: int, num_microbatches: int) -> tuple[Action, ...]:
    num_warmup = num_ranks - rank - 1
    order = [Action("F", i) for i in range(num_warmup)]
    num_weights = 0
    for i in range(num_microbatches):
        if num_warmup + i < num_microbatches:
            order.append(Action("F", num_warmup + i))
        order.append(Action("B", i))
        if i >= rank:
            order.append(Action("W", num_weights))
            num_weights += 1
    order += [Action("W", i) for i in range(num_weights, num_microbatches)]
    return tuple(order)


def interleaved_1f1b(num_ranks: int, num_microbatches: int, num_chunks: int) -> Schedule:
    """Megatron's interleaved 1F1B: each rank holds `num_chunks` model chunks
    (chunk c of rank r is virtual stage c*p + r).

    Forwards walk the chunks in groups of p micro-batches (p micro-batches
    through chunk 0, the same p through chunk 1, ...); backwards walk the
    chunks in reverse. Rank r runs 2(p-r-1) + (v-1)p warm-up forwards (all of
    them when m == p, as Megatron does), then 1F1B, then drains. Needs
    m a multiple of p and v >= 2.
    """
    _check_enough_microbatches("interleaved", num_ranks, num_microbatches)
    if num_chunks < 2:
        raise ValueError(
            f"interleaved needs num_chunks >= 2 model chunks per rank (got {num_chunks}): "
            "set num_chunks to 2 or more, or use the '1f1b' schedule"
        )
    if num_microbatches % num_ranks:
        lower = num_microbatches - num_microbatches % num_ranks
        raise ValueError(
            f"interleaved needs num_microbatches to be a multiple of num_ranks={num_ranks} "
            f"(got {num_microbatches}): set plan.microbatches to {lower or num_ranks} or {lower + num_ranks}"
        )
    rank_actions = tuple(_interleaved_rank(rank, num_ranks, num_microbatches, num_chunks) for rank in range(num_ranks))
    return Schedule(
        name="interleaved",
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        num_chunks=num_chunks,
        splits_weight_grad=False,
        rank_actions=rank_actions,
    )


def _interleaved_rank(rank: int, num_ranks: int, num_microbatches: int, num_chunks: int) -> tuple[Action, ...]:
    total = num_microbatches * num_chunks
    if num_microbatches == num_ranks:
        num_warmup = total
    else:
        num_warmup = min(2 * (num_ranks - rank - 1) + (num_chunks - 1) * num_ranks, total)

    def forward(k: int) -> Action:
        return Action("F", _interleaved_microbatch(k, num_ranks, num_chunks), (k // num_ranks) % num_chunks)

    def backward(k: int) -> Action:
        chunk = num_chunks - 1 - (k // num_ranks) % num_chunks
        return Action("B", _interleaved_microbatch(k, num_ranks, num_chunks), chunk)

    order = [forward(k) for k in range(num_warmup)]
    for i in range(total - num_warmup):
        order += [forward(num_warmup + i), backward(i)]
    order += [backward(k) for k in range(total - num_warmup, total)]
    return tuple(order)


def _interleaved_microbatch(k: int, num_ranks: int, num_chunks: int) -> int:
    """The micro-batch of a rank's k-th forward (or backward) in the interleaved order."""
    group, offset = divmod(k, num_ranks * num_chunks)
    return group * num_ranks + offset % num_ranks


def _check_positive(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_enough_microbatches(name: str, num_ranks: int, num_microbatches: int) -> None:
    _check_positive(num_ranks=num_ranks, num_microbatches=num_microbatches)
    if num_microbatches < num_ranks:
        raise ValueError(
            f"the {name} schedule needs at least as many micro-batches as pipeline ranks "
            f"(num_microbatches={num_microbatches} < num_ranks={num_ranks}): raise plan.microbatches to at "
            f"least {num_ranks}, or use the 'gpipe' schedule"
        )
