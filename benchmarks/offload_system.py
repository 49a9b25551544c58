"""The machine side of the offload benchmark: capped jobs, disk bandwidth, and disk space.

- `run_capped`: a command in a fresh cgroup v1 memory group with a hard cap
  (FACTS.md: mkdir, memory.limit_in_bytes, cgroup.procs, then
  memory.max_usage_in_bytes for the peak; rmdir after). The child joins the
  group before it execs, so every process it starts counts against the cap.
- `dd_bandwidth`: what the disk sustains with O_DIRECT and 16 MiB blocks,
  write then read, the file removed after.
- `free_disk_bytes` and `largest_params_on_disk`: how big a model's offloaded
  state the free disk holds while leaving a margin free.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
DD_BLOCK = "16M"


@dataclass
class CappedRun:
    """How a capped job ended: exit code, wall time, the group's peak memory, and whether it ran capped."""

    returncode: int
    wall_s: float
    peak_bytes: int | None  # memory.max_usage_in_bytes (page cache counts, reclaimed first)
    limit_bytes: int | None
    oom_kills: int | None  # from memory.oom_control where the kernel reports it
    failcnt: int | None  # times the group hit its limit (reclaim, not necessarily a kill)
    capped: bool
    note: str
    log: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cgroup_unavailable() -> str:
    """'' when a v1 memory cgroup can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root: cannot create a memory cgroup (run as root for the capped figures)"
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {CGROUP_ROOT}"
    return ""


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _oom_kills(group: Path) -> int | None:
    try:
        text = (group / "memory.oom_control").read_text()
    except OSError:
        return None
    found = re.search(r"oom_kill (\d+)", text)
    return int(found.group(1)) if found else None


def _remove_group(group: Path) -> None:
    for _ in range(50):  # the group empties a moment after its last process exits
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


def run_capped(
    command: list[str], *, limit_bytes: int, log_path: str | Path, env: dict[str, str] | None = None, timeout_s: float
) -> CappedRun:
    """Run `command` (stdout+stderr to `log_path`) in a new memory cgroup capped at `limit_bytes`.

    Without root or cgroup v1 the command still runs, uncapped, and the record says so.
    """
    reason = cgroup_unavailable()
    group = None if reason else CGROUP_ROOT / f"plait-offload-bench-{uuid.uuid4().hex[:8]}"
    if group is not None:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def join_group() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=join_group, env=env, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
            note = ""
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            returncode = proc.wait()
            note = f"killed after the {timeout_s:.0f} s time limit"
    wall_s = time.perf_counter() - started
    peak = limit = kills = failcnt = None
    if group is not None:
        peak = _read_int(group / "memory.max_usage_in_bytes")
        limit = _read_int(group / "memory.limit_in_bytes")
        kills = _oom_kills(group)
        failcnt = _read_int(group / "memory.failcnt")
        _remove_group(group)
    if kills:
        note = (note + "; " if note else "") + f"the kernel's OOM killer ended {kills} process(es) at the cap"
    return CappedRun(
        returncode=returncode,
        wall_s=wall_s,
        peak_bytes=peak,
        limit_bytes=limit,
        oom_kills=kills,
        failcnt=failcnt,
        capped=group is not None,
        note=note or reason,
        log=str(log_path),
    )


# ---------------------------------------------------------------------------
# Disk


def free_disk_bytes(path: str | Path) -> int:
    return shutil.disk_usage(path).free


def _dd_rate(args: list[str]) -> float:
    """Bytes/s from dd's last stderr line ("... copied, 1.2 s, 1.5 GB/s"): bytes over seconds."""
    done = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    line = [row for row in done.stderr.splitlines() if "copied" in row][-1]
    num_bytes = int(line.split()[0])
    seconds = float(re.search(r"copied, ([0-9.e+-]+) s", line).group(1))
    return num_bytes / seconds


def dd_bandwidth(directory: str | Path, *, num_bytes: int) -> dict[str, Any]:
    """O_DIRECT write then read of one file of `num_bytes` in 16 MiB blocks (bytes/s each)."""
    count = max(1, num_bytes // 2**24)
    path = Path(directory, f"dd-probe-{uuid.uuid4().hex[:8]}")
    try:
        write = _dd_rate(["if=/dev/zero", f"of={path}", f"bs={DD_BLOCK}", f"count={count}", "oflag=direct"])
        read = _dd_rate([f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}", "iflag=direct"])
    finally:
        path.unlink(missing_ok=True)
    return {
        "write_bytes_per_s": write,
        "read_bytes_per_s": read,
        "probe_bytes": count * 2**24,
        "command": f"dd bs={DD_BLOCK} count={count} oflag=direct / iflag=direct",
    }


def largest_params_on_disk(free_bytes: int, *, keep_free_bytes: int, bytes_per_param: float) -> int:
    """Parameters whose offloaded state fits the free disk leaving `keep_free_bytes` free."""
    return max(0, int((free_bytes - keep_free_bytes) / bytes_per_param))
