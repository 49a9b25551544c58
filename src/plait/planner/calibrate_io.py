"""Measure what offload moves state over on this machine: the disk (write then read a temporary file,
with O_DIRECT where the filesystem allows it) and host memory (memcpy), and the host's AdamW rate.

Each takes well under a few seconds on a local SSD; a slow disk is stopped at `DISK_SECONDS`.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from plait.planner.cluster import Disk

DISK_BYTES = 256 * 2**20  # the file written then read back
CHUNK = 8 * 2**20  # bytes per write / read call (a multiple of every block size O_DIRECT asks for)
DISK_SECONDS = 6.0  # stop writing a slow disk's file after this long (the rate is known by then)
COPY_BYTES = 128 * 2**20
ADAM_PARAMS = 1 << 22


@dataclass(frozen=True)
class DiskMeasurement:
    disk: Disk
    direct: bool  # O_DIRECT (False: buffered writes with fsync, reads after dropping the file's pages)
    directory: str

    @property
    def note(self) -> str:
        how = "O_DIRECT" if self.direct else "buffered I/O with fsync (the filesystem refused O_DIRECT)"
        d = self.disk
        return (
            f"disk {self.directory}: {d.read_bandwidth / 1e9:.2f} GB/s read, {d.write_bandwidth / 1e9:.2f} GB/s "
            f"write, {d.capacity / 1e9:.0f} GB free ({how})"
        )


def _open(path: str, flags: int, *, direct: bool) -> int:
    return os.open(path, flags | (os.O_DIRECT if direct else 0), 0o600)


def _write(path: str, buffer: mmap.mmap, *, direct: bool) -> tuple[int, float]:
    """Bytes written and seconds, fsync included."""
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct=direct)
    written, start = 0, time.perf_counter()
    try:
        while written < DISK_BYTES and time.perf_counter() - start < DISK_SECONDS:
            written += os.write(fd, buffer)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written, time.perf_counter() - start


def _read(path: str, buffer: mmap.mmap, size: int, *, direct: bool) -> float:
    fd = _open(path, os.O_RDONLY, direct=direct)
    try:
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written and synced: the pages drop
        done, start = 0, time.perf_counter()
        while done < size:
            count = os.readv(fd, [buffer])
            if count == 0:
                break
            done += count
        return time.perf_counter() - start
    finally:
        os.close(fd)


def measure_disk(directory: str | None = None) -> DiskMeasurement:
    """Write then read back a file of up to `DISK_BYTES` in `directory` (default: the temp dir)."""
    directory = directory or tempfile.gettempdir()
    if not os.path.isdir(directory):
        raise ValueError(f"--offload-dir {directory}: no such directory; create it or point at a local disk")
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(4096) * (CHUNK // 4096))
    handle, path = tempfile.mkstemp(prefix="plait-disk-probe-", dir=directory)
    os.close(handle)
    try:
        try:
            direct, (written, write_s) = True, _write(path, buffer, direct=True)
        except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
            direct, (written, write_s) = False, _write(path, buffer, direct=False)
        read_s = _read(path, buffer, written, direct=direct)
    finally:
        os.unlink(path)
        buffer.close()
    free = shutil.disk_usage(directory).free
    disk = Disk(capacity=free, read_bandwidth=written / read_s, write_bandwidth=written / write_s)
    return DiskMeasurement(disk=disk, direct=direct, directory=directory)


def measure_memcpy() -> float:
    """Bytes per second one thread copies between two host buffers (best of five)."""
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return COPY_BYTES / best


def adam_rate(params: int = ADAM_PARAMS) -> float:
    """Parameters per second torch's AdamW steps on the host (fused where this torch has it)."""
    weight = torch.zeros(params, requires_grad=True)
    weight.grad = torch.randn(params)
    try:
        optimizer = torch.optim.AdamW([weight], lr=1e-3, fused=True)
        optimizer.step()
    except (RuntimeError, ValueError):
        optimizer = torch.optim.AdamW([weight], lr=1e-3)
        optimizer.step()
    start, repeats = time.perf_counter(), 4
    for _ in range(repeats):
        optimizer.step()
    return params * repeats / (time.perf_counter() - start)
