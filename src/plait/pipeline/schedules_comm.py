"""The point-to-point transfers a schedule implies, and a check that they cannot hang.

F on virtual stage s receives s-1's output activation first and sends its own
output to s+1 after; B on s receives the gradient of its output from s+1 first
and sends the gradient of its input to s-1 after; W moves nothing. Neighbouring
stages on the same rank (one rank, several chunks) hand tensors over locally.

`transfer_groups` packs, before each action, the sends of the previous action
with the receives of this one (Megatron's pattern): one `batch_isend_irecv`
per group, waited on before the action computes, is what `check_rendezvous`
proves deadlock-free even when a send cannot finish until its receive is
posted, as with NCCL.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from plait.pipeline.schedules_base import Action, Schedule, ScheduleDeadlockError, stage_location, virtual_stage


@dataclass(frozen=True)
class Transfer:
    """One point-to-point message, seen from one rank.

    `op` is "send" or "recv" and `peer` the other rank. `payload` is
    "activation" (the output of `from_stage`, the input of `to_stage`) or
    "grad" (the gradient of `from_stage`'s input, which is `to_stage`'s output).
    """

    op: str
    peer: int
    payload: str
    microbatch: int
    from_stage: int
    to_stage: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        """What the message carries, the same on the sending and the receiving side."""
        return self.payload, self.microbatch, self.from_stage, self.to_stage


def action_transfers(
    action: Action, rank: int, *, num_ranks: int, num_chunks: int
) -> tuple[tuple[Transfer, ...], tuple[Transfer, ...]]:
    """(receives `action` needs before it runs, sends it makes after it ran) on `rank`."""
    stage = virtual_stage(rank, action.chunk, num_ranks)
    last = num_ranks * num_chunks - 1
    recv_edge: tuple[str, int, int] | None = None
    send_edge: tuple[str, int, int] | None = None
    if action.kind == "F":
        recv_edge = ("activation", stage - 1, stage) if stage > 0 else None
        send_edge = ("activation", stage, stage + 1) if stage < last else None
    elif action.kind == "B":
        recv_edge = ("grad", stage + 1, stage) if stage < last else None
        send_edge = ("grad", stage, stage - 1) if stage > 0 else None
    place = {"microbatch": action.microbatch, "rank": rank, "num_ranks": num_ranks}
    return _transfer("recv", recv_edge, **place), _transfer("send", send_edge, **place)


def _transfer(
    op: str, edge: tuple[str, int, int] | None, *, microbatch: int, rank: int, num_ranks: int
) -> tuple[Transfer, ...]:
    """The message over `edge` (payload, from_stage, to_stage), or none when it stays on `rank`."""
    if edge is None:
        return ()
    payload, from_stage, to_stage = edge
    peer, _ = stage_location(to_stage if op == "send" else from_stage, num_ranks)
    return () if peer == rank else (Transfer(op, peer, payload, microbatch, from_stage, to_stage),)


def transfer_groups(schedule: Schedule, rank: int) -> list[tuple[Transfer, ...]]:
    """The transfers `rank` posts together, one group before each action and one after the last.

    Group j holds the sends of action j-1 and the receives of action j, so
    `len(groups) == len(actions) + 1`. Run each group as one
    `batch_isend_irecv` and wait on it before computing action j. In an
    interleaved schedule's steady phase each adjacent (F, B) pair acts as one
    unit, as in Megatron: both receives go in the group before the F (the group
    between them is empty) and both sends in the group after the B; without
    this, two ranks can each wait to send a gradient the other has not yet
    asked for.
    """
    actions = schedule.actions(rank)
    per_action = [
        action_transfers(action, rank, num_ranks=schedule.num_ranks, num_chunks=schedule.num_chunks)
        for action in actions
    ]
    recvs = [received for received, _ in per_action]
    sends = [sent for _, sent in per_action]
    for j in _steady_pairs(schedule, actions):
        recvs[j], recvs[j + 1] = recvs[j] + recvs[j + 1], ()
        sends[j], sends[j + 1] = (), sends[j] + sends[j + 1]
    return [before + after for before, after in zip([(), *sends], [*recvs, ()], strict=True)]


def _steady_pairs(schedule: Schedule, actions: list[Action]) -> list[int]:
    """Indices j where actions j, j+1 are a steady-phase (F, B) pair of an interleaved schedule."""
    kinds = [action.kind for action in actions]
    if schedule.num_chunks == 1 or "B" not in kinds or "F" not in kinds[kinds.index("B") :]:
        return []  # no steady phase: all forwards run before the first backward
    return [j for j in range(len(kinds) - 1) if kinds[j] == "F" and kinds[j + 1] == "B"]


def check_rendezvous(schedule: Schedule) -> None:
    """Check that running `transfer_groups` in order cannot hang.

    Messages between two ranks are matched in the order they are posted (as
    NCCL does: no tags), and a group finishes only once every message in it
    has its counterpart posted. Raises ValueError if the k-th send from one
    rank to another is not what the receiver expects k-th, and
    ScheduleDeadlockError if the groups can wait on each other in a cycle.
    """
    groups = [transfer_groups(schedule, rank) for rank in range(schedule.num_ranks)]
    partners = _match_in_order(groups)
    position = [0] * schedule.num_ranks
    moved = True
    while moved:
        moved = False
        for rank, rank_groups in enumerate(groups):
            while position[rank] < len(rank_groups) and all(
                position[peer] >= peer_group for peer, peer_group in partners[(rank, position[rank])]
            ):
                position[rank] += 1
                moved = True
    stuck = {rank: groups[rank][at] for rank, at in enumerate(position) if at < len(groups[rank])}
    if stuck:
        raise ScheduleDeadlockError(f"schedule {schedule.name!r} hangs in point-to-point transfers: {stuck}")


def _match_in_order(groups: list[list[tuple[Transfer, ...]]]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """For each (rank, group), the (peer, peer's group) that posts each message's counterpart."""
    sent: dict[tuple[int, int], list[tuple[int, Transfer]]] = defaultdict(list)
    received: dict[tuple[int, int], list[tuple[int, Transfer]]] = defaultdict(list)
    for rank, rank_groups in enumerate(groups):
        for index, group in enumerate(rank_groups):
            for transfer in group:
                if transfer.op == "send":
                    sent[(rank, transfer.peer)].append((index, transfer))
                else:
                    received[(transfer.peer, rank)].append((index, transfer))
    partners: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for src, dst in sorted(set(sent) | set(received)):
        sends, recvs = sent[(src, dst)], received[(src, dst)]
        if [t.key for _, t in sends] != [t.key for _, t in recvs]:
            raise ValueError(
                f"rank {src} sends to rank {dst} in a different order than rank {dst} receives: "
                f"{[t.key for _, t in sends]} vs {[t.key for _, t in recvs]}; tag the messages or reorder the schedule"
            )
        for (send_group, _), (recv_group, _) in zip(sends, recvs, strict=True):
            partners[(src, send_group)].append((dst, recv_group))
            partners[(dst, recv_group)].append((src, send_group))
    return partners
