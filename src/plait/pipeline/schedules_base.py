"""Pipeline schedules as data: actions, virtual stages and the Schedule record.

A schedule says, for every pipeline rank, the order in which that rank runs
forward (F), backward (B) and weight-gradient (W) passes. It holds no tensors
and no process groups; the runtime executes it and `simulate` times it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """One pass of one micro-batch through one model chunk of a rank.

    `kind` is "F" (forward), "B" (backward: input and weight gradients, or only
    the input gradient when the schedule splits the weight gradient off) or
    "W" (weight gradient only). `chunk` is the model chunk local to the rank,
    0 unless the schedule is interleaved.
    """

    kind: str
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def virtual_stage(rank: int, chunk: int, num_ranks: int) -> int:
    """The virtual stage of model chunk `chunk` on `rank` (Megatron's layout).

    The model's layers are cut into `num_ranks * num_chunks` consecutive
    pieces; rank r holds pieces r, r + p, r + 2p, ...

    >>> virtual_stage(1, 2, num_ranks=4)
    9
    """
    return chunk * num_ranks + rank


def stage_location(stage: int, num_ranks: int) -> tuple[int, int]:
    """The (rank, chunk) holding virtual stage `stage`; inverse of `virtual_stage`.

    >>> stage_location(9, num_ranks=4)
    (1, 2)
    """
    return stage % num_ranks, stage // num_ranks


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """The per-rank action lists of one pipeline step.

    `rank_actions[r]` is the order rank r executes its actions in. Every rank
    runs exactly one F and one B (and one W when `splits_weight_grad`) for each
    (micro-batch, chunk) pair, F before B before W; construction checks this,
    so a hand-written schedule fails early with the action at fault.
    """

    name: str
    num_ranks: int
    num_microbatches: int
    num_chunks: int
    splits_weight_grad: bool
    rank_actions: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if len(self.rank_actions) != self.num_ranks:
            raise ValueError(
                f"schedule {self.name!r} lists actions for {len(self.rank_actions)} ranks but num_ranks is "
                f"{self.num_ranks}: give one action list per pipeline rank"
            )
        for rank, actions in enumerate(self.rank_actions):
            _check_rank_actions(self, rank, actions)

    @property
    def num_stages(self) -> int:
        """Virtual stages in the pipeline: num_ranks * num_chunks."""
        return self.num_ranks * self.num_chunks

    def actions(self, rank: int) -> list[Action]:
        """The actions `rank` executes, in order."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} is outside the pipeline: use 0 <= rank < {self.num_ranks}")
        return list(self.rank_actions[rank])

    def stage_of(self, action: Action, rank: int) -> int:
        """The virtual stage `action` runs on when `rank` executes it."""
        return virtual_stage(rank, action.chunk, self.num_ranks)


def _check_rank_actions(schedule: Schedule, rank: int, actions: tuple[Action, ...]) -> None:
    kinds = ("F", "B", "W") if schedule.splits_weight_grad else ("F", "B")
    expected = Counter(
        (kind, microbatch, chunk)
        for kind in kinds
        for microbatch in range(schedule.num_microbatches)
        for chunk in range(schedule.num_chunks)
    )
    found = Counter((action.kind, action.microbatch, action.chunk) for action in actions)
    if found != expected:
        missing = sorted((expected - found).elements())
        extra = sorted((found - expected).elements())
        raise ValueError(
            f"schedule {schedule.name!r}, rank {rank}: each (micro-batch, chunk) needs exactly one of "
            f"{', '.join(kinds)}; missing {missing[:5]}, unexpected or repeated {extra[:5]}"
        )
    position = {(action.kind, action.microbatch, action.chunk): index for index, action in enumerate(actions)}
    for kind, microbatch, chunk in expected:
        before = {"B": "F", "W": "B"}.get(kind)
        if before and position[(before, microbatch, chunk)] > position[(kind, microbatch, chunk)]:
            raise ValueError(
                f"schedule {schedule.name!r}, rank {rank}: {kind}{microbatch}.{chunk} comes before "
                f"{before}{microbatch}.{chunk}; move it after"
            )


class ScheduleDeadlockError(RuntimeError):
    """A schedule cannot finish: every rank waits on something no other rank will do."""
