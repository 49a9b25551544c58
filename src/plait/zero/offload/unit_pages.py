"""The pages of one flat unit: which of its states live on disk, and how they are brought back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from plait.zero.offload.host_memory import huge_copy
from plait.zero.offload.pages import Page


def host_tensor(source: torch.Tensor, *, tier: str) -> torch.Tensor:
    """A copy of `source` in its own host buffer: pinned for the host tier where CUDA copies it to and from
    the device; otherwise pageable, on huge pages (the disk tier's pages free and reallocate their memory
    between uses, and ask for huge pages again each time)."""
    if tier == "host" and torch.cuda.is_available():
        out = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=True)
        out.copy_(source)
        return out
    return huge_copy(source)


@dataclass
class UnitPages:
    """A unit's states on disk (None: that state stays in memory). `params` may be `master` itself
    (fp32 parameters beside the optimizer on disk: one file)."""

    params: Page | None = None
    master: Page | None = None
    moments: Page | None = None
    grads: Page | None = None
    stepping: bool = False  # inside the optimizer phase: pages stay until the phase evicts them

    def all(self) -> list[Page]:
        pages = [self.params, self.master, self.moments, self.grads]
        unique = {id(p): p for p in pages if p is not None}
        return list(unique.values())

    @contextmanager
    def writing(self, *, params: bool) -> Iterator[None]:
        """Make the master (and parameter) pages resident to overwrite them whole; write them after."""
        pages = [p for p in (self.master, self.params if params else None) if p is not None]
        pages = list({id(p): p for p in pages}.values())
        for page in pages:
            page.claim()
        yield
        for page in pages:
            page.evict(write=True)

    def for_step(self) -> list[Page]:
        """What the optimizer step reads: gradients, master, optimizer state."""
        return [p for p in (self.grads, self.master, self.moments) if p is not None]
