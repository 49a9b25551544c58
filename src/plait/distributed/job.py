"""A running job's address book: the key-value store its ranks share, and the small file that finds it.

Under torchrun every rank can reach the launcher's TCP store (MASTER_ADDR:MASTER_PORT); plait keeps its
operations keys there (heartbeats, stack-dump requests) under a prefix per run and restart. Rank 0 writes
`out_dir/job.json` naming the store, so `plait debug stacks OUT_DIR` can reach a running job from outside.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

JOB_FILE = "job.json"


@dataclass(frozen=True)
class JobAddress:
    """Where a job's operations keys live, and who wrote the job file."""

    host: str
    port: int
    prefix: str
    world_size: int
    pid: int  # rank 0's process: a job file whose process is gone on this host is stale
    hostname: str

    def open(self, *, timeout_s: float = 10.0) -> dist.Store:
        """A client of the job's store, its keys under this job's prefix."""
        store = dist.TCPStore(
            self.host, self.port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        return dist.PrefixStore(self.prefix, store)


def launched_job_address(world_size: int) -> JobAddress | None:
    """This job's address when torchrun started it (its variables are the contract), else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return JobAddress(
        host=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        prefix=f"plait-ops/{run_id}/{restart}/",
        world_size=world_size,
        pid=os.getpid(),
        hostname=socket.gethostname(),
    )


def write_job_file(out_dir: Path, address: JobAddress) -> Path:
    path = Path(out_dir) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(address), indent=2))
    temporary.replace(path)
    return path


def remove_job_file(out_dir: Path, address: JobAddress) -> None:
    """Remove the job file if it is still this job's (a restart may have written its own)."""
    found = read_job_file(out_dir)
    if found == address:
        (Path(out_dir) / JOB_FILE).unlink(missing_ok=True)


def read_job_file(out_dir: Path) -> JobAddress | None:
    path = Path(out_dir) / JOB_FILE
    try:
        return JobAddress(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True  # no /proc: the signal answered
    return fields[0] != "Z"


def running_job(out_dir: Path) -> JobAddress | None:
    """The job that keeps `out_dir/job.json`, or None when there is none or it is no longer running."""
    address = read_job_file(out_dir)
    if address is None:
        return None
    if address.hostname == socket.gethostname() and not process_alive(address.pid):
        return None
    return address
