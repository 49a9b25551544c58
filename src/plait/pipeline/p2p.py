"""Point-to-point transfers between neighbouring pipeline stages.

A :class:`StageLink` moves activations to the next stage and gradients back to the
previous one. Shapes and dtypes are negotiated once per direction: the first message
on a channel is preceded by a small int64 header (ndim, dtype code, shape); later
messages on it send only the payload, and the receiver allocates from the cached
header. Call :meth:`StageLink.reset_shapes` on both ranks when shapes change (eval
with another batch size, a ragged last batch).

Sends are asynchronous (``isend``): their handles are returned and also kept, with the
tensors they read, until they complete or :meth:`StageLink.wait_sends` (call it once
per step, before the optimizer touches anything a send may still read). Receives block until the
tensor has arrived. Forward and backward messages carry different tags, so two ranks
that are each other's previous and next stage (interleaved schedules on 2 ranks) keep
the two directions apart.

Example:
    >>> link = StageLink(prev_rank=None, next_rank=1)      # on rank 0
    >>> link.send_forward(stage(input_ids))
    >>> grad = link.recv_backward()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.distributed.comm import CommCounter

__all__ = ["StageLink", "TensorMeta"]

# Header codes: a dtype's index here. Append only: both ends must agree.
DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
MAX_DIMS = 8
HEADER_LEN = 2 + MAX_DIMS  # ndim, dtype code, shape padded with zeros
FORWARD_TAG = 1
BACKWARD_TAG = 2


@dataclass(frozen=True)
class TensorMeta:
    """The shape and dtype a channel's messages have until the next ``reset_shapes``."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _encode(meta: TensorMeta, *, device: torch.device) -> torch.Tensor:
    if len(meta.shape) > MAX_DIMS:
        raise ValueError(f"pipeline p2p sends tensors of at most {MAX_DIMS} dims, got shape {meta.shape}")
    if meta.dtype not in DTYPES:
        raise ValueError(f"pipeline p2p cannot send dtype {meta.dtype}; send one of {', '.join(map(str, DTYPES))}")
    padding = [0] * (MAX_DIMS - len(meta.shape))
    values = [len(meta.shape), DTYPES.index(meta.dtype), *meta.shape, *padding]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _decode(header: torch.Tensor) -> TensorMeta:
    ndim, code, *dims = header.tolist()
    return TensorMeta(tuple(dims[:ndim]), DTYPES[code])


class StageLink:
    """Sends and receives of one stage with its previous and next pipeline ranks.

    ``prev_rank``/``next_rank`` are global ranks (``None`` at the ends of the
    pipeline); ``group`` is the process group they are in (default: the world);
    received tensors are allocated on ``device`` (``"cuda"`` under NCCL).
    ``num_headers_sent`` counts shape headers this link has sent; every send
    (header and payload) is recorded on ``counter`` when there is one.
    """

    def __init__(
        self,
        prev_rank: int | None,
        next_rank: int | None,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        counter: CommCounter | None = None,
    ) -> None:
        self.prev_rank = prev_rank
        self.next_rank = next_rank
        self.group = group
        self.device = torch.device(device)
        self.num_headers_sent = 0
        self.counter = counter
        self._metas: dict[str, TensorMeta] = {}
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send_forward(self, activation: torch.Tensor, *, key: int = 0) -> list[dist.Work]:
        """Start sending ``activation`` to the next stage; returns the send handles.

        ``key`` (e.g. micro-batch x chunks + chunk) tags the payload, so messages
        match by key, not by arrival order, when a schedule interleaves chunks.
        """
        peer = self._peer(self.next_rank, "send_forward")
        return self._send(activation, peer, channel="forward", tag=FORWARD_TAG, key=key)

    def recv_forward(self, *, requires_grad: bool | None = None, key: int = 0) -> torch.Tensor:
        """The previous stage's activation; it requires grad (default: when grad mode is on
        and it is floating point) so this stage's backward yields the gradient to send back."""
        tensor = self._recv(self._peer(self.prev_rank, "recv_forward"), channel="forward", tag=FORWARD_TAG, key=key)
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled() and tensor.is_floating_point()
        return tensor.requires_grad_(requires_grad)

    def send_backward(self, grad: torch.Tensor, *, key: int = 0) -> list[dist.Work]:
        """Start sending the gradient of the received activation back to the previous stage."""
        if grad is None:
            raise ValueError(
                "send_backward got None: the received activation has no gradient; receive it with "
                "recv_forward() under grad mode (requires_grad=True) and run backward before sending"
            )
        peer = self._peer(self.prev_rank, "send_backward")
        return self._send(grad, peer, channel="backward", tag=BACKWARD_TAG, key=key)

    def recv_backward(self, *, key: int = 0) -> torch.Tensor:
        """The gradient of this stage's output, from the next stage."""
        return self._recv(self._peer(self.next_rank, "recv_backward"), channel="backward", tag=BACKWARD_TAG, key=key)

    def wait_sends(self) -> None:
        """Wait for every send started so far, then let go of the tensors they read."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def reset_shapes(self) -> None:
        """Forget negotiated shapes: the next message each way carries a header again (call on both ranks)."""
        self.wait_sends()
        self._metas.clear()

    def _peer(self, rank: int | None, operation: str) -> int:
        if rank is None:
            end = "first" if operation in ("recv_forward", "send_backward") else "last"
            raise ValueError(f"{operation} on the {end} pipeline stage: it has no peer that way; skip the call there")
        return rank

    def _send(self, tensor: torch.Tensor, peer: int, *, channel: str, tag: int, key: int) -> list[dist.Work]:
        payload = tensor.detach().contiguous()
        self._pending = [(work, sent) for work, sent in self._pending if not work.is_completed()]
        meta = TensorMeta(tuple(payload.shape), payload.dtype)
        slot = f"send_{channel}"
        works = []
        if slot not in self._metas:
            header = _encode(meta, device=payload.device)
            self._count(header, peer)
            works.append(dist.isend(header, peer, group=self.group, tag=tag))
            self._pending.append((works[-1], header))
            self._metas[slot] = meta
            self.num_headers_sent += 1
        elif self._metas[slot] != meta:
            raise ValueError(
                f"{channel} message is {meta} but this link negotiated {self._metas[slot]}; "
                "call reset_shapes() on both ranks when shapes change between steps"
            )
        self._count(payload, peer)
        works.append(dist.isend(payload, peer, group=self.group, tag=_payload_tag(tag, key)))
        self._pending.append((works[-1], payload))
        return works

    def _count(self, tensor: torch.Tensor, peer: int) -> None:
        if self.counter is not None:
            self.counter.record("send", tensor, peer=peer)

    def _recv(self, peer: int, *, channel: str, tag: int, key: int) -> torch.Tensor:
        slot = f"recv_{channel}"
        if slot not in self._metas:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            dist.recv(header, peer, group=self.group, tag=tag)
            self._metas[slot] = _decode(header)
        meta = self._metas[slot]
        tensor = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        dist.recv(tensor, peer, group=self.group, tag=_payload_tag(tag, key))
        return tensor


def _payload_tag(channel_tag: int, key: int) -> int:
    """Headers use the channel's own tag; payloads one per key, distinct from every header tag."""
    return channel_tag + 2 * (key + 1)
