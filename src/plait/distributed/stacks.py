"""Stack files for hang reports: every thread's Python stack (native frames too where py-spy is
installed), headed by where the rank is (its step, phase, and the last collective it entered); and the
one-line verdict over all ranks: which collective the most advanced ranks wait in, which have not arrived."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from plait.distributed.comm import Entered

PY_SPY_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class RankPosition:
    """Where one rank is: steps completed, what it is doing, the last collective it entered."""

    rank: int
    step: int
    phase: str
    entered: Entered | None
    idle_s: float  # seconds since its last progress

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "entered": asdict(self.entered) if self.entered else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankPosition:
        entered = Entered(**data["entered"]) if data.get("entered") else None
        return cls(data["rank"], data["step"], data["phase"], entered, data["idle_s"])

    def describe(self) -> str:
        where = f"collective #{self.entered.index}: {self.entered.describe()}" if self.entered else "no collective"
        return f"rank {self.rank}: step {self.step + 1}, {self.phase}; last entered {where}"


def python_stacks() -> str:
    """Every thread's Python stack, innermost frame last, named by thread."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f'Thread "{names.get(ident, "?")}" ({ident}), most recent call last:')
        parts.append("".join(traceback.format_stack(frame)))
    return "\n".join(parts)


def native_stacks(pid: int) -> str | None:
    """py-spy's dump with native frames, when py-spy is installed (None otherwise)."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return None
    try:
        done = subprocess.run(
            [py_spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=PY_SPY_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"py-spy failed: {err}"
    return done.stdout + done.stderr


def write_stack_file(path: Path, position: RankPosition, *, reason: str) -> Path:
    """Write this rank's stacks to `path` (rank-N.txt), headed by its position."""
    path.parent.mkdir(parents=True, exist_ok=True)
    native = native_stacks(os.getpid())
    lines = [
        f"# {reason}",
        f"# rank {position.rank} | pid {os.getpid()} on {socket.gethostname()} | no progress for "
        f"{position.idle_s:.1f} s",
        f"# {position.describe()}",
        "",
        python_stacks(),
        "native frames (py-spy):" if native else "native frames: py-spy is not installed (pip install py-spy)",
        native or "",
    ]
    path.write_text("\n".join(lines))
    return path


def verdict(positions: list[RankPosition], *, world_size: int) -> str:
    """One line over all ranks: the collective the furthest ranks are in, the ranks that have not arrived,
    and the ranks that never answered."""
    answered = {p.rank for p in positions}
    silent = sorted(set(range(world_size)) - answered)
    entered = [p for p in positions if p.entered is not None]
    if not entered:
        text = "no rank has entered a collective"
    else:
        furthest = max(p.entered.index for p in entered if p.entered)
        waiting = sorted((p for p in entered if p.entered and p.entered.index == furthest), key=lambda p: p.rank)
        behind = sorted(p.rank for p in positions if p.entered is None or p.entered.index < furthest)
        head = waiting[0]
        assert head.entered is not None
        text = (
            f"rank(s) {_ranks(p.rank for p in waiting)} wait in collective #{furthest} "
            f"({head.entered.describe()}, step {head.step + 1})"
        )
        text += f"; rank(s) {_ranks(behind)} have not arrived" if behind else "; every rank that answered is in it"
    if silent:
        text += f"; rank(s) {_ranks(silent)} did not answer"
    return text


def _ranks(ranks: Any) -> str:
    return ", ".join(str(r) for r in ranks)
