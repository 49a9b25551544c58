"""Pipeline schedules: which forward and backward passes each rank runs, in what order.

>>> schedule = build_schedule("1f1b", num_ranks=2, num_microbatches=3)
>>> [str(action) for action in schedule.actions(0)]
['F0', 'F1', 'B0', 'F2', 'B1', 'B2']

The types live in `schedules_base`, the builders in `schedules_builders` and
the point-to-point transfers each action implies in `schedules_comm`; this
module is the one to import.
"""

from __future__ import annotations

from plait.pipeline.schedules_base import Action, Schedule, stage_location, virtual_stage
from plait.pipeline.schedules_builders import gpipe, interleaved_1f1b, one_f_one_b, zero_bubble_h1
from plait.pipeline.schedules_comm import Transfer, action_transfers, check_rendezvous, transfer_groups

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1")

__all__ = [
    "SCHEDULE_NAMES",
    "Action",
    "Schedule",
    "Transfer",
    "action_transfers",
    "build_schedule",
    "check_rendezvous",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "stage_location",
    "transfer_groups",
    "virtual_stage",
    "zero_bubble_h1",
]


def build_schedule(name: str, *, num_ranks: int, num_microbatches: int, num_chunks: int = 1) -> Schedule:
    """The schedule called `name` (one of SCHEDULE_NAMES) for p ranks and m micro-batches.

    `num_chunks` (v, model chunks per rank) applies to "interleaved" only,
    which needs v >= 2 and m a multiple of p. "1f1b", "interleaved" and
    "zb-h1" need m >= p; "gpipe" takes any m >= 1.
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown pipeline schedule {name!r}: choose one of {', '.join(SCHEDULE_NAMES)}")
    if name == "interleaved":
        return interleaved_1f1b(num_ranks, num_microbatches, num_chunks)
    if num_chunks != 1:
        raise ValueError(
            f"the {name} schedule runs one model chunk per rank (got num_chunks={num_chunks}): "
            "drop num_chunks, or use the 'interleaved' schedule"
        )
    builders = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zero_bubble_h1}
    return builders[name](num_ranks, num_microbatches)
