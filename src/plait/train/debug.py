"""`plait debug stacks OUT_DIR`: every rank's stack from a running job, found through out_dir/job.json."""

from __future__ import annotations

from pathlib import Path

from plait.distributed.job import running_job
from plait.distributed.stacks import verdict
from plait.distributed.watchdog import ask_for_stacks, collect_answers, time_stamp

ANSWER_WAIT_S = 30.0  # each rank's watchdog answers within a second unless its process is stuck outside Python


def debug_stacks(out_dir: Path) -> int:
    """Ask the job running in `out_dir` for every rank's stack; print where each rank is."""
    address = running_job(out_dir)
    if address is None:
        raise ValueError(f"no running job in {out_dir} (no {out_dir / 'job.json'} of a live job)")
    try:
        store = address.open(timeout_s=5.0)
    except (RuntimeError, OSError) as err:
        raise ValueError(
            f"no running job in {out_dir}: its job.json names the store {address.host}:{address.port}, which "
            f"does not answer ({type(err).__name__})"
        ) from None
    directory = Path(out_dir) / f"stacks-{time_stamp()}"
    request_id = ask_for_stacks(store, directory, reason="plait debug stacks")
    positions = collect_answers(store, request_id, world_size=address.world_size, wait_s=ANSWER_WAIT_S)
    print(verdict(positions, world_size=address.world_size))
    for position in positions:
        print(f"  {position.describe()}")
    print(f"every rank's stack is in {directory} (rank-N.txt on each rank's host)")
    return 0
