"""FlatUnit: the storage and collectives of one flat, dp-sharded group of parameters.

Stages differ only in what a unit keeps between uses:
- stage 1: full parameters and a full gradient buffer (accumulation needs no
  communication), reduced once per step into this rank's gradient shard;
- stage 2: full parameters; gradients are reduced as soon as a micro-batch's
  backward produced them and only the shard is kept;
- stage 3: only the parameter shard; the full parameters are gathered just
  before use and their storage released after. In 16 bits the shard kept is
  the fp32 master itself, cast as it is sent, so 16-bit parameters exist only
  gathered; a 16-bit shard is kept apart only where the optimizer or the
  parameters are offloaded (it halves the bytes each gather fetches).
The optimizer always steps on this rank's pieces of the fp32 master shard.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.comm import CommCounter, all_gather_flat, reduce_scatter_flat
from plait.distributed.placement import placement_of
from plait.zero.flat import FlatLayout, make_piece_param, views_of
from plait.zero.offload.placement import ON_DEVICE, UnitTiers
from plait.zero.offload.unit_pages import UnitPages, host_tensor


@dataclass(frozen=True)
class UnitConfig:
    stage: int
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    group: dist.ProcessGroup | None
    num_shards: int
    shard_index: int
    use_all_reduce: bool  # gloo's all-reduce beats its reduce-scatter; the kept bytes are the same
    counter: CommCounter
    copy_stream: torch.cuda.Stream | None = None  # CUDA: host-to-device copies of offloaded shards and their gathers
    axis: str = "dp"  # the mesh axis `group` spans, as placement records name it ("edp" for experts)
    # hybrid sharding: the ranks holding this rank's shard in the other shard groups (other nodes);
    # the shard's gradients, reduced over `group`, are then summed over these
    replica_group: dist.ProcessGroup | None = None


@dataclass
class PendingReduce:
    handle: dist.Work | None
    source: torch.Tensor  # the full (padded) gradients in the reduce dtype
    result: torch.Tensor  # the reduced shard, or `source` itself after an all-reduce
    over_replicas: bool = False  # hybrid sharding's second phase: the shard's all-reduce across replicas


class FlatUnit:
    """One unit's flat parameters and gradients; see the module docstring."""

    def __init__(
        self, named_params: list[tuple[str, nn.Parameter]], *, config: UnitConfig, tiers: UnitTiers = ON_DEVICE
    ) -> None:
        self.config = config
        self.tiers = tiers
        self.pages: UnitPages | None = None  # set by plait.zero.offload when a state of this unit lives on disk
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.layout = FlatLayout(
            [(n, p.shape) for n, p in named_params], num_shards=config.num_shards, shard_index=config.shard_index
        )
        self.full = torch.zeros(self.layout.padded_numel, dtype=config.param_dtype, device=self.params[0].device)
        with torch.no_grad():
            for param, view in zip(self.params, views_of(self.full, self.layout), strict=True):
                view.copy_(param.detach())
                param.data = view
        shard = self.full[self.layout.shard_start : self.layout.shard_end]
        self.param_shard = shard.clone() if config.stage == 3 else shard
        self.master_shard = self._make_master()
        if tiers.params != "device":
            self.param_shard = self._offloaded_param_shard()
        elif config.stage == 3 and tiers.optimizer == "device":
            self.param_shard = self.master_shard  # 16-bit parameters exist only gathered: cast at each gather
        self.grad_full: torch.Tensor | None = None
        if config.stage <= 1:
            self.grad_full = torch.zeros_like(self.full)
            for param, view in zip(self.params, views_of(self.grad_full, self.layout), strict=True):
                param.grad = view
        self.grad_shard = self._make_grad_shard()
        placements = {name: placement_of(p) for name, p in named_params}
        self.pieces = [
            make_piece_param(
                piece,
                master_shard=self.master_shard,
                grad_shard=self.grad_shard,
                layout=self.layout,
                sharded=config.num_shards > 1,
                base=placements[piece.span.name],
                axis=config.axis,
            )
            for piece in self.layout.pieces()
        ]
        self.gather_handle: dist.Work | None = None
        self.gathered = True
        if config.stage == 3:
            self.release()

    def _make_master(self) -> torch.Tensor:
        """fp32 master shard: the parameter shard itself when it is fp32 on the device; on the host
        (its own buffer, pinned on CUDA) when the optimizer is offloaded."""
        if self.tiers.optimizer != "device":
            return host_tensor(self.param_shard.float(), tier=self.tiers.optimizer)
        needs_master = self.config.param_dtype != torch.float32
        return self.param_shard.float() if needs_master else self.param_shard

    def _offloaded_param_shard(self) -> torch.Tensor:
        """ZeRO-3's parameter shard off the device: fp32 parameters beside an optimizer on the same
        tier are the master shard itself (one copy, one file)."""
        if self.tiers.params == self.tiers.optimizer and self.config.param_dtype == torch.float32:
            return self.master_shard
        return host_tensor(self.param_shard, tier=self.tiers.params)

    # --- parameters (stage 3 gathers and releases; stages 1-2 gather after each step) ---

    def _storage_bytes(self) -> int:
        return self.layout.padded_numel * self.full.element_size()

    def start_gather(self) -> None:
        """Launch the all-gather of the full parameters (no-op if they are here or coming)."""
        if self.gathered or self.gather_handle is not None:
            return
        if self.pages is not None and self.pages.params is not None:
            self.pages.params.wait()
        self.full.untyped_storage().resize_(self._storage_bytes())
        shard = self.param_shard
        if shard.device == self.full.device:
            self.gather_handle = self._all_gather(shard)
        else:
            self.gather_handle = self._copy_and_gather(shard)
        if self.gather_handle is None:
            self._params_used()

    def _copy_and_gather(self, shard: torch.Tensor) -> dist.Work | None:
        """A host shard to the device, then the gather, on the copy stream so both overlap compute
        (the collective follows the stream it is issued on; `wait_gather` joins the compute stream)."""
        stream = self.config.copy_stream
        if stream is None:
            return self._all_gather(shard.to(self.full.device, non_blocking=True))
        stream.wait_stream(torch.cuda.current_stream())  # `full` was just allocated on the compute stream
        with torch.cuda.stream(stream):
            handle = self._all_gather(shard.to(self.full.device, non_blocking=True))
        if handle is None:  # one shard: the copy was the gather
            torch.cuda.current_stream().wait_stream(stream)
        return handle

    def wait_gather(self) -> None:
        self.start_gather()
        if self.gather_handle is not None:
            self.gather_handle.wait()
            self.gather_handle = None
            self._params_used()
        self.gathered = True

    def _params_used(self) -> None:
        """The gathered copy exists: an offloaded shard can leave memory (its file is current)."""
        if self.pages is not None and self.pages.params is not None and not self.pages.stepping:
            self.pages.params.evict(write=False)

    def release(self) -> None:
        """Free the full parameters' storage; their views stay valid for the next gather."""
        if self.gather_handle is not None:
            self.wait_gather()
        self.full.untyped_storage().resize_(0)
        self.gathered = False

    def _all_gather(self, shard: torch.Tensor) -> dist.Work | None:
        if self.config.num_shards == 1:
            if shard.data_ptr() != self.full.data_ptr():
                self.full.copy_(shard)
            return None
        # ZeRO-3 in 16 bits gathers from the fp32 master: the cast is a transient send buffer (the work holds
        # it until the gather lands), rounded as a cast after the step was, so the same 16-bit parameters
        send = shard if shard.dtype == self.full.dtype else shard.to(self.full.dtype)
        self.config.counter.record("all_gather", self.full, group=self.config.group)
        return all_gather_flat(self.full, send, group=self.config.group, async_op=True)

    def publish_step(self) -> dist.Work | None:
        """After the optimizer step: cast masters into the parameter shard; stages 1-2 re-gather."""
        with torch.no_grad():
            if self.master_shard is not self.param_shard:
                page = self.pages.params if self.pages is not None else None
                if page is not None:
                    page.claim()  # overwritten whole: no read
                self.param_shard.copy_(self.master_shard)
                if page is not None:
                    page.evict(write=True)
            if self.config.stage == 3 or self.config.num_shards == 1:
                return None
            return self._all_gather(self.param_shard.clone())

    # --- gradients ---

    def _make_grad_shard(self) -> torch.Tensor:
        """fp32 gradients of this rank's shard: under stage 1 in fp32, a view of the full buffer; on the host
        (its own buffer) when they are offloaded."""
        if self.tiers.grads != "device":
            return host_tensor(torch.zeros(self.layout.shard_size, dtype=torch.float32), tier=self.tiers.grads)
        if self.grad_full is not None and self.grad_full.dtype == torch.float32:
            return self.grad_full[self.layout.shard_start : self.layout.shard_end]
        return torch.zeros(self.layout.shard_size, dtype=torch.float32, device=self.full.device)

    def _flat_grads(self) -> torch.Tensor:
        """The unit's full gradients as one padded buffer in the reduce dtype."""
        reduce_dtype = self.config.reduce_dtype
        if self.grad_full is not None:
            if self.grad_full.dtype == reduce_dtype:
                return self.grad_full
            if self._casts_into_grad_shard:  # the cast lands where the sum is kept: no temporary, no copy back
                self.grad_shard.copy_(self.grad_full)
                return self.grad_shard
            return self.grad_full.to(reduce_dtype)
        flat = torch.zeros(self.layout.padded_numel, dtype=reduce_dtype, device=self.full.device)
        for param, view in zip(self.params, views_of(flat, self.layout), strict=True):
            if param.grad is not None:
                view.copy_(param.grad)
            param.grad = None
        return flat

    @property
    def _casts_into_grad_shard(self) -> bool:
        """Unsharded 16-bit stage 1 (ZeRO-0 in bf16): the fp32 gradient shard is the whole padded buffer, on
        the device, in the reduce dtype, so the 16-bit gradients can be cast into it and summed in place."""
        shard = self.grad_shard
        return (
            self.layout.shard_size == self.layout.padded_numel
            and self.tiers.grads == "device"
            and shard.dtype == self.config.reduce_dtype
            and shard.device == self.full.device
        )

    def start_reduce(self) -> PendingReduce:
        """Sum this unit's gradients over dp; the shard lands in grad_shard at `finish_reduce`."""
        if self.pages is not None and self.pages.grads is not None:
            self.pages.grads.fetch()  # read the accumulated shard while the reduction runs
        source = self._flat_grads()
        config = self.config
        if config.group is None:
            return PendingReduce(handle=None, source=source, result=source)
        if config.use_all_reduce:
            config.counter.record("all_reduce", source, group=config.group)
            handle = dist.all_reduce(source, group=config.group, async_op=True)
            return PendingReduce(handle=handle, source=source, result=source)
        result = torch.empty(self.layout.shard_size, dtype=source.dtype, device=source.device)
        config.counter.record("reduce_scatter", source, group=config.group)
        handle = reduce_scatter_flat(result, source, group=config.group, async_op=True)
        return PendingReduce(handle=handle, source=source, result=result)

    def finish_reduce(self, pending: PendingReduce) -> PendingReduce | None:
        """Land the reduced shard in grad_shard; under hybrid sharding the shard group's sum first
        starts its all-reduce over the replicas, returned to be finished in turn (None once landed)."""
        if pending.handle is not None:
            pending.handle.wait()
        result = pending.result
        if result.numel() != self.layout.shard_size:
            result = result[self.layout.shard_start : self.layout.shard_end]
        if self.config.replica_group is not None and not pending.over_replicas:
            return self._reduce_over_replicas(result)
        page = self.pages.grads if self.pages is not None else None
        if page is not None:
            page.wait()
        if self.config.stage >= 2:
            self.grad_shard.add_(result.to(self.grad_shard.device))  # one reduction per micro-batch accumulates here
        elif result.data_ptr() != self.grad_shard.data_ptr():  # stage 1 reduces once per step
            self.grad_shard.copy_(result)
        if page is not None and not self.pages.stepping:  # stepping: the update reads them right away
            page.evict(write=True)
        return None

    def _reduce_over_replicas(self, shard: torch.Tensor) -> PendingReduce:
        """Hybrid sharding: the shard group's sum of this shard, summed over the other groups' copies
        (the only gradient traffic between nodes: one shard per rank, not the whole unit)."""
        group = self.config.replica_group
        self.config.counter.record("all_reduce", shard, group=group)
        handle = dist.all_reduce(shard, group=group, async_op=True)
        return PendingReduce(handle=handle, source=shard, result=shard, over_replicas=True)

    def zero_grads(self) -> None:
        if self.pages is not None and self.pages.grads is not None:
            self.pages.grads.mark_fresh()
        elif self.grad_full is None:  # stage 1: finish_reduce overwrites the shard, or it views grad_full
            self.grad_shard.zero_()
        if self.grad_full is not None:
            self.grad_full.zero_()
            for param, view in zip(self.params, views_of(self.grad_full, self.layout), strict=True):
                if param.grad is not view:  # a user's zero_grad(set_to_none=True) dropped the view
                    param.grad = view

    def load_full(self, tensors: list[torch.Tensor]) -> None:
        """Take this rank's shard (and, under stages 1-2, the full parameters) from full tensors."""
        flat = torch.zeros(self.layout.padded_numel, dtype=torch.float32, device=self.full.device)
        for view, tensor in zip(views_of(flat, self.layout), tensors, strict=True):
            view.copy_(tensor.reshape(view.shape))
        shard = flat[self.layout.shard_start : self.layout.shard_end]
        with self.pages.writing(params=True) if self.pages is not None else nullcontext():
            self.master_shard.copy_(shard)
            self.param_shard.copy_(shard)
        if self.config.stage < 3:
            self.full.copy_(flat)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Copies of this unit's full parameters by name (the caller gathers first under stage 3)."""
        return {
            name: view.detach().clone() for name, view in zip(self.names, views_of(self.full, self.layout), strict=True)
        }
