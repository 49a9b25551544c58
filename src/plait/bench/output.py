"""Output of benchmark runs: the environment and load average they ran under, result JSON files
and plain-text tables (`plait.bench.harness` re-exports all of it)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "environment",
    "finish",
    "format_bytes",
    "format_table",
    "load_average",
    "wait_for_quiet",
    "write_json",
    "write_results",
]


def environment(*, backend: str = "gloo") -> dict[str, Any]:
    """Where and when the figures were taken: enough to compare runs made on different machines."""
    from plait import __version__ as plait_version
    from plait.train.peak import _cpu_name

    return {
        "plait": plait_version,
        "torch": torch.__version__,
        "backend": backend,
        "cpu_model": _cpu_name(),
        "gpu_model": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def wait_for_quiet(pattern: str, *, poll_s: float = 30.0, max_wait_s: float = 1200.0) -> dict[str, Any]:
    """Wait until no process's command line matches `pattern` (`pgrep -f`), polling every `poll_s`.

    For a box shared with other benchmarks: call before forking the ranks. Gives up
    after `max_wait_s` and says so in the record it returns.
    """
    started = time.monotonic()
    polls = 0
    while True:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        found = [pid for pid in found if int(pid) != os.getpid()]
        waited = time.monotonic() - started
        if not found or waited >= max_wait_s:
            return {"pattern": pattern, "waited_s": round(waited, 1), "polls": polls, "still_running": found}
        if polls == 0:
            print(f"waiting for {pattern!r} (pids {' '.join(found)}) to finish...", file=sys.stderr, flush=True)
        polls += 1
        time.sleep(poll_s)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def finish(path: str | Path, payload: dict[str, Any], *, wall_s: float, phase_wall_s: dict[str, float]) -> None:
    """Print the run's wall time by phase and write its JSON."""
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phase_wall_s.items())
    print(f"\nwall time {wall_s:.0f} s (phases: {phases})")
    print(f"wrote {write_json(path, payload)}")


def write_results(
    path: str | Path,
    payload: dict[str, Any],
    *,
    tag: str | None,
    load_before: float | None,
    started: float,
    phases: dict[str, float],
) -> Path:
    """Write `payload` after the keys every result file has (environment, load average before and
    after) to `path`, with `-TAG` before its suffix where `tag` is set; print the wall time since
    `started` (a `time.perf_counter()` reading) by phase. Returns the path written."""
    path = Path(path)
    if tag:
        path = path.with_name(f"{path.stem}-{tag}{path.suffix}")
    common = {"environment": environment(), "load_average_before": load_before, "load_average_after": load_average()}
    finish(path, common | payload, wall_s=time.perf_counter() - started, phase_wall_s=phases)
    return path


def format_bytes(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table, columns padded to their widest cell (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])
