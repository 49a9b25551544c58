"""Every rank writes its own pieces into one directory; rank 0 commits it atomically.

The ranks write into `.tmp-<name>/` beside the target, fsync their files and
send rank 0 their records (file checksums, the pieces' layouts); rank 0
writes the manifest, fsyncs and renames the directory into place. A crash
at any point (a rank killed mid-write) leaves the hidden directory, never a
checkpoint that looks complete, and the previous checkpoint untouched.

Asynchronous saves copy the pieces to host memory first (the step waits
only for that; offloaded state a unit at a time) and write from a background
thread. Its collectives run on a process group of their own, so they never
interleave with training's. Synchronous saves stream offloaded state from its
pages a unit at a time, so it is never all in memory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.checkpoint.sharded import (
    FORMAT,
    MANIFEST_FILE,
    Entry,
    PagedEntries,
    file_record,
    plait_version,
    snapshot,
    snapshot_paged,
    tensor_table,
    write_rank_file,
)

TEMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def synced_record(path: Path) -> dict[str, Any]:
    """`path`'s record (sha256, size), hashed here while a thread fsyncs it: the hash waits on the
    CPU and the fsync on the disk, so together they take about as long as the longer one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        synced = pool.submit(fsync_path, path)
        record = file_record(path)
        synced.result()
    return record


def replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`; an existing `target` is moved aside first, then deleted."""
    aside = None
    if target.exists():
        aside = target.parent / f".old-{target.name}-{secrets.token_hex(4)}"
        os.replace(target, aside)
    os.replace(source, target)
    fsync_path(target.parent)
    if aside is not None:
        shutil.rmtree(aside)


@dataclass
class SaveRequest:
    """What one rank contributes to a checkpoint. `paged`: entries in memory a group at a time (offloaded
    state); `main_files` (rank 0 only): name -> bytes; `manifest_extra` (rank 0 only): fields copied into
    the manifest."""

    path: Path
    entries: list[Entry]
    paged: PagedEntries | None = None
    main_files: dict[str, bytes] = field(default_factory=dict)
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    on_commit: Callable[[Path], None] | None = None  # rank 0, once the checkpoint is in place (pruning)


class CheckpointWriter:
    """Saves checkpoints from every rank, one at a time; `asynchronous=True` returns after the copy.

    Build it on every rank at the same point of the program (it creates a
    process group); call `save` on every rank, and `wait` before exiting.
    """

    def __init__(self, *, distributed: bool = True) -> None:
        """`distributed=False`: this process alone writes the checkpoint (whole tensors, one shard file)."""
        spread = distributed and dist.is_initialized() and dist.get_world_size() > 1
        self.group = dist.new_group(backend="gloo") if spread else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, request: SaveRequest, *, asynchronous: bool = False) -> None:
        self.wait()  # one save in flight at a time: the group's collectives stay in order
        if not asynchronous:
            self._write(request)
            return
        request.entries = snapshot(request.entries)
        if request.paged is not None:
            request.entries += snapshot_paged(request.paged)
            request.paged = None
        self._thread = threading.Thread(target=self._run, args=(request,), name="plait-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"the asynchronous checkpoint save failed: {error}") from error

    def _run(self, request: SaveRequest) -> None:
        try:
            self._write(request)
        except BaseException as error:  # handed to the main thread at wait()
            self._error = error

    def _rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None else 0

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _write(self, request: SaveRequest) -> None:
        path = Path(request.path)
        temporary = path.parent / f"{TEMP_PREFIX}{path.name}"
        rank = self._rank()
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)  # left by a crashed save of the same step
            temporary.mkdir()
        self._barrier()
        record = write_rank_file(
            temporary, rank=rank, entries=request.entries, paged=request.paged, record_of=synced_record
        )
        for name, data in request.main_files.items():
            (temporary / name).write_bytes(data)
            record["files"][name] = synced_record(temporary / name)
        records = self._gather(record)
        if rank == 0:
            self._commit(temporary, path, records=records, extra=request.manifest_extra)
            if request.on_commit is not None:
                request.on_commit(path)
        self._barrier()

    def _gather(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        if self.group is None:
            return [record]
        rank = self._rank()
        gathered: list[Any] = [None] * dist.get_world_size(self.group) if rank == 0 else []
        dist.gather_object(
            record, gathered if rank == 0 else None, dst=dist.get_global_rank(self.group, 0), group=self.group
        )
        return gathered

    def _commit(self, temporary: Path, path: Path, *, records: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        files = {name: info for record in records for name, info in record["files"].items()}
        manifest = {
            "format": FORMAT,
            "plait_version": plait_version(),
            **extra,
            "num_ranks": len(records),
            "tensors": tensor_table(records),
            "files": files,
        }
        (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
        fsync_path(temporary / MANIFEST_FILE)
        fsync_path(temporary)
        replace_dir(temporary, path)
        for stale in path.parent.glob(f"{TEMP_PREFIX}*"):  # hidden directories of crashed saves
            shutil.rmtree(stale, ignore_errors=True)
