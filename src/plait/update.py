"""The update at the end of a step: unscale, sum partial gradients, check fp16 overflow, clip, step.

With gradients or optimizer state on disk the same update runs a unit at a
time (plait/zero/offload/step.py), and where nothing needs every gradient first,
inside backward as each unit's gradients become final.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.amp.scaler import LossScaler, Overflow
from plait.distributed.comm import CommCounter, all_reduce
from plait.distributed.launch import get_logger
from plait.distributed.mesh import Mesh
from plait.distributed.partial_grads import reduce_partial_grads
from plait.optim.clip import clip_grad_norm, global_grad_norm
from plait.zero.offload.manager import Offload
from plait.zero.offload.step import BackwardStep, NormCollector, StepContext, gradient_pass, update_pass

Handler = BackwardStep | NormCollector


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm under fp32/bf16 with on_nonfinite='stop'; the message names the step,
    the micro-batch and the first parameter affected."""


@dataclass
class Update:
    """What the update needs of the engine; `step()` runs it and reports (grad_norm, skipped)."""

    data_parallel: object  # DataParallel or ZeroDataParallel
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    mesh: Mesh
    comm: CommCounter
    device: torch.device
    max_grad_norm: float | None
    offload: Offload | None
    has_pipeline: bool
    on_nonfinite: str | None = None  # None: no check (fp16's loss scaler skips overflowed steps itself)
    last_overflow: Overflow | None = None
    steps_done: int = 0
    _in_backward: Handler | None = None
    _losses: tuple[torch.Tensor | None, Sequence[torch.Tensor]] = (None, ())

    def arm(self, *, divisor_known: bool) -> None:
        """Before the step's last backward: let ZeRO hand each unit's final gradients to the update."""
        if not self._final_grads_in_backward(divisor_known=divisor_known):
            return
        offload = self.offload
        assert offload is not None
        if not self.max_grad_norm and self.on_nonfinite == "skip":
            return  # updating inside backward cannot be undone: skipping needs the norm before any update
        if self.max_grad_norm:
            self._in_backward = NormCollector(offload.units, mesh=self.mesh)
        else:
            self._in_backward = BackwardStep(offload, self.optimizer, mesh=self.mesh)
        self.data_parallel.on_final_grads = self._in_backward  # type: ignore[attr-defined]

    def _final_grads_in_backward(self, *, divisor_known: bool) -> bool:
        """Gradients or optimizer state on disk, gradients final when reduced (nothing scales or sums
        them afterwards), so their norm, or the update itself, can be taken in backward."""
        offload = self.offload
        return (
            offload is not None
            and offload.pages_optimizer
            and not self.scaler.dynamic
            and divisor_known
            and not self.has_pipeline
            and not offload.has_partial_grads
        )

    def step(
        self,
        factor: torch.Tensor | float | None,
        *,
        loss: torch.Tensor | None = None,
        micro_losses: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, bool]:
        """Scale the summed gradients by `factor` (None: already right), then update unless fp16 overflowed
        or (with `on_nonfinite`) the global `loss` or gradient norm is not finite. `micro_losses`: this
        rank's per-micro-batch losses, to name where a non-finite loss first appeared."""
        self._losses = (loss, micro_losses)
        handler, self._in_backward = self._in_backward, None
        if handler is not None:
            self.data_parallel.on_final_grads = None  # type: ignore[attr-defined]
            grad_norm = handler.finish(counter=self.comm)
            if self._nonfinite(grad_norm, named=False):
                return grad_norm, True
            if isinstance(handler, NormCollector):
                assert self.offload is not None
                update_pass(self.offload, self.optimizer, norm=grad_norm, context=self._context())
            return grad_norm, False
        if self.offload is not None and self.offload.pages_optimizer:
            return self._paged(self.offload, factor)
        return self._in_memory(factor)

    def _in_memory(self, factor: torch.Tensor | float | None) -> tuple[torch.Tensor, bool]:
        if factor is not None:
            self.data_parallel.scale_(factor)  # type: ignore[attr-defined]
        params = self.data_parallel.optimizer_params  # type: ignore[attr-defined]
        reduce_partial_grads(params, mesh=self.mesh, counter=self.comm)
        if self._overflowed():
            return torch.full((), float("nan")), True
        grad_norm = self._clip(params)
        if self._nonfinite(grad_norm, named=True):
            return grad_norm, True
        start = time.perf_counter()
        self.optimizer.step()
        stepped = time.perf_counter()
        self.data_parallel.after_step()  # type: ignore[attr-defined]
        if self.offload is not None:  # the host step, and the copy of its masters into the parameters
            self.offload.optimizer_s += stepped - start
            self.offload.publish_s += time.perf_counter() - stepped
            self.offload.place_host_state(self.optimizer)
        return grad_norm, False

    def _paged(self, offload: Offload, factor: torch.Tensor | float | None) -> tuple[torch.Tensor, bool]:
        """Gradients or optimizer state on disk: the same update, a unit at a time."""
        context = self._context()
        grad_norm, overflow = gradient_pass(offload, factor=factor, context=context)
        if overflow is not None and self.record_overflow(overflow):
            return torch.full((), float("nan")), True
        if self._nonfinite(grad_norm, named=False):
            return grad_norm, True
        update_pass(offload, self.optimizer, norm=grad_norm, context=context)
        return grad_norm, False

    def _context(self) -> StepContext:
        return StepContext(
            mesh=self.mesh, scaler=self.scaler, counter=self.comm, device=self.device, max_grad_norm=self.max_grad_norm
        )

    def _overflowed(self) -> bool:
        """fp16 only: all ranks agree whether any gradient is non-finite, and name the first."""
        if not self.scaler.dynamic:
            return False
        named = self.data_parallel.named_grads()  # type: ignore[attr-defined]
        groups = [self.mesh.group("dp"), self.mesh.group("tp")]  # the same names, other shards or slices
        overflow = self.scaler.check_overflow(named, groups=groups, device=self.device, counter=self.comm)
        return self.record_overflow(self._across_stages(overflow))

    def _across_stages(self, overflow: Overflow) -> Overflow:
        """Pipeline stages hold different parameters: they agree on whether any overflowed, every stage
        skips together, and a stage that saw none names where it was found."""
        group = self.mesh.group("pp")
        if group is None:
            return overflow
        found = torch.tensor([float(overflow.found)], device=self.device)
        all_reduce(found, group=group, counter=self.comm)  # a sum: how many stages found one
        if found.item() > 0 and not overflow.found:
            return Overflow(found=True, first_name="a parameter on another pipeline stage")
        return overflow

    def record_overflow(self, overflow: Overflow) -> bool:
        """Log a skipped step, move the loss scale; True when the step must be skipped."""
        self.last_overflow = overflow
        if overflow.found:
            get_logger().warning(self.scaler.message(overflow, self.steps_done + 1))
        self.scaler.update(overflow)
        return overflow.found

    def _clip(self, params: list[nn.Parameter]) -> torch.Tensor:
        if self.max_grad_norm:
            return clip_grad_norm(params, max_norm=self.max_grad_norm, mesh=self.mesh, counter=self.comm)
        return global_grad_norm(params, mesh=self.mesh, counter=self.comm)

    def _nonfinite(self, grad_norm: torch.Tensor, *, named: bool) -> bool:
        """fp32/bf16 with on_nonfinite set: True when the step must be skipped; NonFiniteError to stop. The loss
        and the norm are global (equal on every rank), so every rank decides alike. One host sync."""
        loss, micro_losses = self._losses
        if self.on_nonfinite is None or self.scaler.dynamic:
            return False
        values = {"loss": float(loss) if loss is not None else 0.0, "gradient norm": float(grad_norm)}
        bad = {name: value for name, value in values.items() if not math.isfinite(value)}
        if not bad:
            return False
        where = self._first_micro_batch(micro_losses)
        first = self._first_parameter() if named else "a gradient shard updated by the offloaded step"
        text = " and ".join(f"{name} ({value})" for name, value in bad.items())
        message = f"step {self.steps_done + 1}: non-finite {text}; {where}; first parameter affected: {first}"
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; stopping (set train.on_nonfinite='skip' to skip such steps)")
        get_logger().warning(f"{message}; step skipped (train.on_nonfinite='skip')")
        return True

    def _first_micro_batch(self, micro_losses: Sequence[torch.Tensor]) -> str:
        """Where a non-finite loss first appeared: (micro-batch, rank), the lowest over the world."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        local = next((i for i, m in enumerate(micro_losses) if not torch.isfinite(m).all()), None)
        code = torch.tensor([len(micro_losses) * world + world if local is None else local * world + rank])
        if world > 1:
            code = code.to(self.device)
            dist.all_reduce(code, op=dist.ReduceOp.MIN)
        index, where_rank = divmod(int(code.item()), world)
        if index >= len(micro_losses):
            return "every micro-batch's loss was finite"
        return f"first non-finite loss in micro-batch {index} on rank {where_rank}"

    def _first_parameter(self) -> str:
        named = self.data_parallel.named_grads()  # type: ignore[attr-defined]
        groups = [self.mesh.group("dp"), self.mesh.group("tp")]
        overflow = self._across_stages(self.scaler.check_overflow(named, groups=groups, device=self.device))
        return overflow.first_name or "none (every gradient finite: the loss alone)"
