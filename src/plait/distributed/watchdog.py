"""Each rank's watchdog: a daemon thread that explains dead ranks and hangs instead of letting a job hang
or die with a raw gloo/NCCL error.

Every `period_s` it
- publishes this rank's heartbeat (steps done, state, pid, host) in the job's store;
- checks its peers: a peer that reported a failure, whose process is gone (same host), or whose heartbeat
  stopped for `dead_after_s` (another host) is a fault, named with its rank and last completed step;
- notices a hang: no step progress for `hang_timeout_s`. One rank then asks every rank for its stacks
  (`out_dir/hang-<time>/rank-N.txt`), writes the verdict (which collective, who has not arrived) and the
  job exits;
- answers stack requests (`plait debug stacks OUT_DIR` sends them to a running job).

A fault goes to `on_fault(line, console, root_cause)`, which is expected to end the process. Without a
store (one plain process, or a harness's FileStore) only the hang check runs, on this rank alone.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.distributed.comm import Entered
from plait.distributed.job import process_alive
from plait.distributed.stacks import RankPosition, verdict, write_stack_file

FaultHandler = Callable[[str, bool, bool], None]  # (line, print it on the console, this rank is the cause)
REQUEST_KEY = "stacks/request"
HANG_DONE_KEY = "hang/done"


@dataclass(frozen=True)
class WatchdogSettings:
    out_dir: Path
    hang_timeout_s: float  # 0: no hang check
    period_s: float = 1.0
    dead_after_s: float = 30.0  # a peer on another host with no heartbeat this long is gone
    answer_wait_s: float = 30.0  # how long a stack request waits for every rank's answer


@dataclass
class _Peer:
    beat: int = -1
    changed_at: float = 0.0


def time_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class Watchdog:
    """One per rank; `progress(step)` after each step (and eval or save), `close()` at the end."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        settings: WatchdogSettings,
        store: dist.Store | None,
        entered: Callable[[], Entered | None],
        on_fault: FaultHandler,
    ) -> None:
        self.rank, self.world_size, self.settings = rank, world_size, settings
        self.store, self.entered, self.on_fault = store, entered, on_fault
        self.step, self.phase = 0, "starting"
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._last_progress = time.monotonic()
        self._beats = 0
        self._peers: dict[int, _Peer] = {}
        self._answered: set[int] = set()
        self._hang_seen = False
        self._lock = threading.Lock()  # one store conversation at a time (the thread's and close()'s)
        self._stop = threading.Event()
        self.faulting = threading.Event()  # set once a fault is being reported: the main thread waits
        self._thread = threading.Thread(target=self._loop, name="plait-watchdog", daemon=True)

    def start(self) -> None:
        self._publish("running")
        self._thread.start()

    def progress(self, step: int, phase: str = "training") -> None:
        self.step, self.phase = step, phase
        self._last_progress = time.monotonic()

    def position(self) -> RankPosition:
        idle = time.monotonic() - self._last_progress
        return RankPosition(self.rank, self.step, self.phase, self.entered(), idle)

    def close(self, state: str = "done", message: str = "") -> None:
        """Stop the thread and publish the final state: done, failed (this rank is the cause) or stopped."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.settings.period_s * 5)
        self._publish(state, message)

    # The thread.

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.period_s):
            try:
                self._tick()
            except Exception as err:  # the store is gone: its host (node 0's launcher) died
                if self._stop.is_set():
                    return
                self._fault(f"the job's store is unreachable ({type(err).__name__}: {err}); node 0 is gone?")
                return

    def _tick(self) -> None:
        if self.store is not None:
            self._publish("running")
            self._answer_requests()
            if self._exists(HANG_DONE_KEY):
                self._fault(f"stopped: a hang was reported (stacks in {self.settings.out_dir}/hang-*)", quiet=True)
                return
            if not self._hang_seen and (fault := self._peer_fault()) is not None:
                line, reported = fault
                self._fault(line, quiet=reported)
                return
        self._check_hang()

    def _fault(self, line: str, *, quiet: bool = False, root_cause: bool = False) -> None:
        self.faulting.set()
        self.on_fault(line, not quiet and (root_cause or self.prints_peer_faults()), root_cause)

    def prints_peer_faults(self) -> bool:
        """The lowest-ranked live rank prints a peer's fault; the rest only log it."""
        gone = {r for r, peer in self._peers.items() if peer.beat == -2}
        return all(r in gone for r in range(self.rank))

    # Heartbeats.

    def _publish(self, state: str, message: str = "") -> None:
        if self.store is None:
            return
        self._beats += 1
        record = {"beat": self._beats, "step": self.step, "state": state, "pid": self.pid, "host": self.host}
        with self._lock:
            self.store.set(f"hb/{self.rank}", json.dumps({**record, "message": message}))

    def _read(self, key: str) -> dict[str, Any] | None:
        assert self.store is not None
        with self._lock:
            if not self.store.check([key]):
                return None
            return json.loads(self.store.get(key))

    def _exists(self, key: str) -> bool:
        assert self.store is not None
        with self._lock:
            return self.store.check([key])

    def _peer_fault(self) -> tuple[str, bool] | None:
        """(line, whether the peer reported it itself) for the first peer that failed or is gone."""
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            beat = self._read(f"hb/{rank}")
            if beat is None or beat["state"] in ("done", "stopped"):
                continue
            if beat["state"] == "failed":
                return f"rank {rank} failed after step {beat['step']}: {beat['message']}", True
            gone = self._gone(rank, beat)
            if gone is not None:
                self._peers[rank].beat = -2
                step = max(beat["step"], self.step)  # every step ends in an all-reduce: no rank is a step ahead
                return f"rank {rank} {gone}; its last completed step: {step}; the other ranks stopped", False
        return None

    def _gone(self, rank: int, beat: dict[str, Any]) -> str | None:
        """Why peer `rank` is gone, or None while it lives."""
        peer = self._peers.setdefault(rank, _Peer())
        if beat["host"] == self.host and not process_alive(beat["pid"]):
            return f"(pid {beat['pid']} on {beat['host']}) died: killed or crashed without a word"
        now = time.monotonic()
        if beat["beat"] != peer.beat:
            peer.beat, peer.changed_at = beat["beat"], now
        elif now - peer.changed_at > self.settings.dead_after_s:
            return f"on {beat['host']} sent no heartbeat for {now - peer.changed_at:.0f} s: its process or node is gone"
        return None

    def dead_peer(self, *, wait_s: float) -> tuple[str, bool] | None:
        """For the main thread after a collective failed: the peer that caused it, looking up to `wait_s`."""
        if self.store is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fault = self._peer_fault()
            except Exception:
                return None
            if fault is not None or time.monotonic() > deadline:
                return fault
            time.sleep(self.settings.period_s)

    # Hangs and stack requests.

    def _check_hang(self) -> None:
        idle = time.monotonic() - self._last_progress
        if not self.settings.hang_timeout_s or idle < self.settings.hang_timeout_s or self._hang_seen:
            return
        self._hang_seen = True
        directory = self.settings.out_dir / f"hang-{time_stamp()}"
        if self.store is None:
            write_stack_file(directory / f"rank-{self.rank}.txt", self.position(), reason="hang")
            self._fault(f"no step progress for {idle:.0f} s (step {self.step + 1}, {self.phase}); stack in {directory}")
            return
        with self._lock:
            claimed = self.store.add("hang/claim", 1) == 1
        if not claimed:
            return  # another rank asks for the stacks; this one answers, then exits on HANG_DONE_KEY
        positions = self.request_stacks(directory, reason=f"hang: no step progress for {idle:.0f} s")
        line = f"hang: no step progress for {idle:.0f} s; {verdict(positions, world_size=self.world_size)}"
        (directory / "summary.txt").write_text(line + "\n" + "\n".join(p.describe() for p in positions) + "\n")
        with self._lock:
            self.store.set(HANG_DONE_KEY, directory.name)
        self._fault(f"{line}; every rank's stack in {directory}", root_cause=True)

    def request_stacks(self, directory: Path, *, reason: str) -> list[RankPosition]:
        """Ask every rank (this one included) for its stacks in `directory`; their positions."""
        assert self.store is not None
        request_id = ask_for_stacks(self.store, directory, reason=reason)
        self._answer_requests()
        return collect_answers(self.store, request_id, world_size=self.world_size, wait_s=self.settings.answer_wait_s)

    def _answer_requests(self) -> None:
        request = self._read(REQUEST_KEY)
        if request is None or request["id"] in self._answered:
            return
        self._answered.add(request["id"])
        position = self.position()
        write_stack_file(Path(request["dir"]) / f"rank-{self.rank}.txt", position, reason=request["reason"])
        with self._lock:
            self.store.set(f"stacks/{request['id']}/{self.rank}", json.dumps(position.to_json()))  # type: ignore[union-attr]


def ask_for_stacks(store: dist.Store, directory: Path, *, reason: str) -> int:
    """Post a stack request every rank's watchdog answers within a period; its id."""
    request_id = store.add("stacks/next", 1)
    store.set(REQUEST_KEY, json.dumps({"id": request_id, "dir": str(directory), "reason": reason}))
    return request_id


def collect_answers(store: dist.Store, request_id: int, *, world_size: int, wait_s: float) -> list[RankPosition]:
    """The positions of the ranks that answered request `request_id` within `wait_s`."""
    keys = [f"stacks/{request_id}/{rank}" for rank in range(world_size)]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not store.check(keys):
        time.sleep(0.2)
    return [RankPosition.from_json(json.loads(store.get(key))) for key in keys if store.check([key])]
