"""The launcher of `plait train` and `plait run`: torchrun's elastic agent run in this process, so that
Ctrl-C and a scheduler's SIGTERM reach it (it forwards them to the ranks and waits for them to save), and
a failed rank is reported in one line instead of torchrun's ChildFailedError table.

Under `plait train` the agent's own log lines (worker restarts, closing signals) go to out_dir/train.log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plait.distributed.nodes import Nodes

SHUTDOWN_TIMEOUT_S = 120  # after SIGINT/SIGTERM the ranks finish the step and save; then the agent kills them
REPORTED_EXITS = (2, 3)  # a rank already printed the cause in one line (bad input, run-time fault)


def under_torchrun() -> bool:
    """True inside a rank that torchrun started (the command is then a rank, not the launcher)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def strip_flag(argv: Sequence[str], flag: str) -> list[str]:
    """argv without `flag VALUE` and `flag=VALUE`."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            out.append(item)
    return out


def launch_cli(
    nproc: int, argv: Sequence[str], *, nodes: Nodes | None = None, max_restarts: int = 0, out_dir: str | None = None
) -> int:
    """Re-run the `plait` command `argv` on `nproc` local ranks through torchrun (joined to the other `nodes`'
    ranks); the agent runs in this process (signals reach it, failures are told in one line)."""
    node_flags = nodes.torchrun_flags() if nodes else ["--standalone"]
    flags = [*node_flags, f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    return launch_ranks(flags, ["-m", "plait.cli", *argv], out_dir=out_dir)


def launch_ranks(torchrun_flags: Sequence[str], command: Sequence[str], *, out_dir: str | None = None) -> int:
    """Run `command` (e.g. ["-m", "plait.cli", "train", ...]) under torchrun with `torchrun_flags`; the exit
    code: 0, the ranks' reported code (2 or 3), 3 for a rank that died without a word, 128+N for signal N."""
    flags = [*torchrun_flags, f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's choice, without its banner
    with _agent_log(Path(out_dir) if out_dir else None):
        return run_agent([*flags, *command], out_dir=out_dir, name="plait train")


def run_agent(torchrun_args: Sequence[str], *, out_dir: str | None = None, name: str = "plait run") -> int:
    """torchrun with `torchrun_args` in this process; the exit code as `launch_ranks` gives it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parsed = get_args_parser().parse_args(list(torchrun_args))
    try:
        run(parsed)
    except ChildFailedError as err:
        return _report(err, out_dir=out_dir, name=name)
    except SignalException as err:
        return 128 + int(err.sigval)  # the ranks said where they stopped
    return 0


def _report(err: object, *, out_dir: str | None, name: str) -> int:
    """One line for the first rank that failed, unless a rank already printed its cause."""
    failures = err.failures  # type: ignore[attr-defined]  # global rank -> ProcessFailure
    codes = {failure.exitcode for failure in failures.values()}
    reported = sorted(code for code in codes if code in REPORTED_EXITS)
    if reported:
        return reported[-1]
    rank, first = min(failures.items(), key=lambda item: item[1].timestamp)
    how = f"was killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
    where = f"; every rank's log is in {Path(out_dir) / 'train.log'}" if out_dir else ""
    step = _last_step(out_dir)
    after = f" after step {step}" if step is not None else ""
    print(
        f"plait train: rank {rank} (pid {first.pid}) {how}{after}; the other ranks were stopped{where}", file=sys.stderr
    )
    return 3


def _last_step(out_dir: str | None) -> int | None:
    """The last step metrics.csv recorded (rank 0 writes a row per step)."""
    if out_dir is None:
        return None
    path = Path(out_dir) / "metrics.csv"
    try:
        rows = path.read_text().strip().splitlines()[1:]
        return int(rows[-1].split(",", 1)[0]) if rows else None
    except (OSError, ValueError):
        return None


@contextmanager
def _agent_log(out_dir: Path | None) -> Iterator[None]:
    """torch.distributed's launcher logs into out_dir/train.log while the agent runs (nowhere without one)."""
    logger = logging.getLogger("torch.distributed")
    handler: logging.Handler = logging.NullHandler()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out_dir / "train.log", mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s [launcher] %(message)s"))
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False  # torch's own console handler sits here
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        handler.close()
