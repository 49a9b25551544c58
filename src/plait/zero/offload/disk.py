"""The disk tier: tensors in files under `plan.offload_dir`, read and written by background threads.

Each key (one unit's state of one kind) is one file holding its tensors end to
end at 4 KiB-aligned offsets. I/O goes through an aligned bounce buffer per
thread (reused, so memory stays bounded): with O_DIRECT where the filesystem
takes it, bypassing the page cache; where it does not (tmpfs), buffered,
synced and dropped from the cache after each move, said in the log. Nothing
relies on the page cache: every read comes from the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from plait.sizes import format_bytes

ALIGN = 4096
BOUNCE_BYTES = 32 * 2**20
IO_THREADS = 2
WRITES_IN_FLIGHT = 4  # pages waiting to be written hold their memory: a slow disk makes the writer wait
_MARK = ".plait-offload"  # in every directory plait creates, so it is never mistaken for a checkpoint


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def check_offload_dir(directory: str, *, needed_bytes: int) -> str:
    """Refuse a directory that cannot hold the offloaded state (before any collective);
    returns '' or a note for the log (no O_DIRECT: buffered I/O)."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(
            f"plan.offload_dir={directory} does not exist; create it (mkdir -p {directory}) on a fast local disk"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"plan.offload_dir={directory} is not writable by this user; choose a directory you can write")
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise ValueError(
            f"plan.offload_dir={directory} has {format_bytes(free)} free but the offloaded state needs "
            f"{format_bytes(needed_bytes)} on this node; free space, point offload_dir at a larger disk, or keep more "
            "state in memory (plan.memory_budget, fewer states on disk)"
        )
    if supports_direct_io(path):
        return ""
    return (
        f"plan.offload_dir={directory} does not take O_DIRECT (tmpfs?): offload uses buffered I/O there, which the "
        "page cache (memory) serves; put offload_dir on a real disk to keep that memory free"
    )


def supports_direct_io(path: Path) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    with tempfile.NamedTemporaryFile(dir=path, prefix=".plait-probe-") as probe:
        try:
            fd = os.open(probe.name, os.O_RDWR | flag)
        except OSError:
            return False
        try:
            buffer = _aligned_buffer(ALIGN)
            os.pwrite(fd, memoryview(buffer.numpy()), 0)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % ALIGN
    return raw[offset : offset + nbytes]


@dataclass
class IOStats:
    """Bytes moved and seconds the I/O threads were busy, since the last reset."""

    read_bytes: int = 0
    write_bytes: int = 0
    busy_s: float = 0.0

    def reset(self) -> None:
        self.read_bytes = self.write_bytes = 0
        self.busy_s = 0.0


class DiskStore:
    """Files of one rank's offloaded state under `root/rank-R/`, removed by `close()`."""

    def __init__(self, root: str, *, rank: int, direct: bool) -> None:
        self.directory = Path(root) / f"plait-offload-rank{rank}-{os.getpid()}"
        self.directory.mkdir(parents=True, exist_ok=False)
        (self.directory / _MARK).touch()
        self.direct = direct
        self.stats = IOStats()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="plait-offload")
        self._fds: dict[str, int] = {}
        self._write_slots = threading.BoundedSemaphore(WRITES_IN_FLIGHT)
        # removes the files at close(), when the store is collected, or at interpreter exit
        self._cleanup = weakref.finalize(self, _remove, self._pool, self._fds, self.directory)

    def _fd(self, key: str) -> int:
        with self._lock:
            if key not in self._fds:
                flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if self.direct else 0)
                self._fds[key] = os.open(self.directory / key, flags, 0o600)
            return self._fds[key]

    def _bounce(self) -> torch.Tensor:
        buffer = getattr(self._local, "bounce", None)
        if buffer is None:
            buffer = self._local.bounce = _aligned_buffer(BOUNCE_BYTES)
        return buffer

    def write(
        self, key: str, tensors: Sequence[torch.Tensor], *, then: Callable[[], None] | None = None
    ) -> Future[None]:
        """Write `tensors` to the file `key`, then call `then` on the I/O thread (freeing their memory)."""

        def task() -> None:
            try:
                self._move(key, list(tensors), True)
                if then is not None:
                    then()
            finally:
                self._write_slots.release()

        self._write_slots.acquire()  # at most WRITES_IN_FLIGHT pages wait in memory for the disk
        return self._pool.submit(task)

    def read(self, key: str, tensors: Sequence[torch.Tensor]) -> Future[None]:
        """Fill `tensors` (allocated by the caller) from the file `write` produced."""
        return self._pool.submit(self._move, key, list(tensors), False)

    def _move(self, key: str, tensors: list[torch.Tensor], writing: bool) -> None:
        try:
            self._move_all(key, tensors, writing)
        except OSError as err:
            what = "writing" if writing else "reading"
            raise OSError(
                f"offload: {what} {self.directory / key} failed ({err.strerror or err}); the run cannot go on "
                "without that state: check the disk behind plan.offload_dir (space, health), then resume from "
                "the last checkpoint"
            ) from err

    def _move_all(self, key: str, tensors: list[torch.Tensor], writing: bool) -> None:
        start = time.perf_counter()
        fd = self._fd(key)
        offset = moved = 0
        for tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            data = tensor.detach().view(-1).view(torch.uint8)
            self._through_bounce(fd, data, offset=offset, writing=writing)
            offset += aligned(nbytes)
            moved += nbytes
        with self._lock:
            self.stats.busy_s += time.perf_counter() - start
            if writing:
                self.stats.write_bytes += moved
            else:
                self.stats.read_bytes += moved

    def _through_bounce(self, fd: int, data: torch.Tensor, *, offset: int, writing: bool) -> None:
        """Move `data` through this thread's aligned buffer (a tensor's own memory never reaches numpy:
        that would pin its storage, which pages must be able to free)."""
        bounce = self._bounce()
        for lo in range(0, data.numel(), BOUNCE_BYTES):
            chunk = data[lo : lo + BOUNCE_BYTES]
            span = aligned(chunk.numel())
            view = memoryview(bounce[:span].numpy())
            if writing:
                bounce[: chunk.numel()].copy_(chunk)
                _write_all(fd, view, offset + lo)
            else:
                _read_all(fd, view, offset + lo)
                chunk.copy_(bounce[: chunk.numel()])
        if not self.direct:  # buffered: make it durable, then drop it from the page cache
            if writing:
                os.fdatasync(fd)
            os.posix_fadvise(fd, offset, aligned(data.numel()), os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._cleanup()


def _remove(pool: ThreadPoolExecutor, fds: dict[str, int], directory: Path) -> None:
    pool.shutdown(wait=True)
    for fd in fds.values():
        os.close(fd)
    fds.clear()
    shutil.rmtree(directory, ignore_errors=True)


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _read_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise OSError(f"offload file ended early at byte {offset + done}: was it truncated or removed?")
        done += count
