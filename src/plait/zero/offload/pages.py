"""A page: the tensors of one unit's state of one kind, resident in memory or evicted to disk.

Evicting frees the tensors' storage (`untyped_storage().resize_(0)`), so every
view of them (the optimizer's pieces, their `.grad`) stays the same Python
object and is valid again once the page is fetched back. A page whose
contents are known to be zeros (gradients after `zero_grad`) is `fresh`: it
is fetched by zero-filling, with no read, and dropped without a write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from plait.zero.offload.disk import DiskStore
from plait.zero.offload.host_memory import advise_huge


class Page:
    """One unit's state of one kind (`key`), paged between memory and `store`."""

    def __init__(self, key: str, tensors: list[torch.Tensor], *, store: DiskStore, fresh: bool = False) -> None:
        self.key = key
        self.tensors = tensors
        self.store = store
        self.fresh = fresh
        self.resident = True
        self.fetches = 0  # how often the step needed this page back in memory
        self.moves = 0  # measured use: reads and writes this page caused
        self.wait_s = 0.0  # time the training thread waited for this page's I/O
        self._pending: Future[None] | None = None
        self._nbytes = [t.untyped_storage().nbytes() for t in tensors]

    @property
    def nbytes(self) -> int:
        return sum(self._nbytes)

    def add(self, tensors: list[torch.Tensor]) -> None:
        """Take more tensors into the page (optimizer state created by the first step); it must be resident."""
        self.wait()
        self.tensors += tensors
        self._nbytes += [t.untyped_storage().nbytes() for t in tensors]
        self.fresh = False

    def fetch(self) -> None:
        """Start bringing the page into memory (no-op if it is resident or coming)."""
        if self.resident:
            return
        self._finish_pending()
        self.fetches += 1
        self._allocate()
        if self.fresh:
            for tensor in self.tensors:
                tensor.zero_()
        else:
            self._pending = self.store.read(self.key, self.tensors)
            self.moves += 1
        self.resident = True

    def claim(self) -> None:
        """Make the page resident without reading it: the caller overwrites all of it."""
        if self.resident:
            self._finish_pending()
            return
        self._finish_pending()
        self._allocate()
        self.resident = True

    def wait(self) -> None:
        """Block until the page is in memory."""
        start = time.perf_counter()
        self.fetch()
        self._finish_pending()
        self.wait_s += time.perf_counter() - start

    def evict(self, *, write: bool) -> None:
        """Free the page's memory, writing it first when `write` (its contents changed since the last write)."""
        if not self.resident:
            return
        self._finish_pending()
        self.resident = False
        if write:
            self.fresh = False
            self.moves += 1
            self._pending = self.store.write(self.key, self.tensors, then=self._free)
        else:
            self._free()

    def mark_fresh(self) -> None:
        """The contents are zeros from now on (gradients zeroed): drop them without writing."""
        self._finish_pending()
        self.fresh = True
        if self.resident:
            self.resident = False
            self._free()

    def discard(self) -> None:
        """Its tensors are no longer wanted: let its I/O finish, free its memory, read and write nothing."""
        self._finish_pending()
        if self.resident:
            self.resident = False
            self._free()

    def write_through(self) -> None:
        """Write a resident page's contents (they stay resident)."""
        self._finish_pending()
        self.fresh = False
        self._pending = self.store.write(self.key, self.tensors)

    def _allocate(self) -> None:
        for tensor, nbytes in zip(self.tensors, self._nbytes, strict=True):
            storage = tensor.untyped_storage()
            storage.resize_(nbytes)
            advise_huge(storage)  # before the read or zero-fill first touches it

    def _free(self) -> None:
        for tensor in self.tensors:
            tensor.untyped_storage().resize_(0)

    def _finish_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises an I/O error here, on the training thread


def resident_bytes(pages: list[Page]) -> int:
    return sum(t.untyped_storage().nbytes() for page in pages for t in page.tensors)


Observer = Callable[[str], None]
