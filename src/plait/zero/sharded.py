"""ZeRO stages 1-3 over the dp axis, on flat units (see unit.py and partition.py).

Gradients of a unit are reduced as soon as backward has produced all of them
(stage 1: on the step's last micro-batch only), at most two units in flight,
so reduction overlaps the rest of backward and stage 2-3 never hold more
than a couple of units' full gradients. Under stage 3 each module's units are
gathered just before its forward (the next module's are prefetched), released
after it, gathered again when backward reaches the module's output (the
previous module's prefetched), and released once their gradients are reduced.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from plait.distributed.placement import placement_of
from plait.zero.offload.host_memory import trim_heap
from plait.zero.offload.manager import Offload
from plait.zero.offload.placement import ON_DEVICE
from plait.zero.offload.step import FinalGradsHandler
from plait.zero.partition import HookSite, UnitSpec, plan_units
from plait.zero.unit import FlatUnit, PendingReduce, UnitConfig

MAX_IN_FLIGHT = 2
Materialize = Callable[[UnitSpec], list[tuple[str, nn.Parameter]]]


def _with_siblings(materialize: Materialize, specs: list[UnitSpec]) -> Materialize:
    """Materialise the units of one module together (a layer's expert-parallel unit and the rest of it):
    initialising the module draws all its parameters, in the plain build's order, once."""

    def together(spec: UnitSpec) -> list[tuple[str, nn.Parameter]]:
        siblings = [s for s in specs if s.module is spec.module]
        if len(siblings) == 1:
            return materialize(spec)
        merged = UnitSpec(
            name=spec.name, module=spec.module, named_params=[p for s in siblings for p in s.named_params]
        )
        real = dict(materialize(merged))
        for sibling in siblings:  # the siblings built later find real parameters: nothing left to materialise
            sibling.named_params = [(name, real[name]) for name, _ in sibling.named_params]
        return spec.named_params

    return together


class ZeroDataParallel:
    """A model's trainable parameters as dp-sharded flat units, with the hooks each stage needs."""

    def __init__(
        self,
        model: nn.Module,
        *,
        config: UnitConfig,
        materialize: Materialize | None = None,
        offload: Offload | None = None,
        expert_config: UnitConfig | None = None,
        expert_params: Collection[nn.Parameter] = (),
    ) -> None:
        self.config = config
        self.expert_config = expert_config or config  # expert-parallel units: reduced and sharded over edp
        self.model = model
        self.stage = config.stage
        self.offload = offload
        specs, self.sites = plan_units(model, expert_params=expert_params)
        self.peak_held_elements = 0  # parameter elements held (shards + gathered units), at its highest
        self._held_so_far = 0
        if materialize is not None:
            materialize = _with_siblings(materialize, specs)
        self.units = [self._build_unit(index, spec, materialize) for index, spec in enumerate(specs)]
        if offload is not None:
            trim_heap()  # what building the units freed goes back to the system, not to glibc's heap
        self.sync = True
        # Under a pipeline, micro-batches' backwards interleave with other forwards: every micro-batch's
        # gradients accumulate in full and each unit is reduced once, after the schedule (build_data_parallel sets it).
        self.defer_reduction = False
        # ZeRO-3 over several micro-batches: keep each gathered unit until the step's reduction
        # (one all-gather per unit per step) instead of releasing it after every use.
        self.gather_once_per_step = False
        self.in_backward = False
        self._pending: list[tuple[FlatUnit, PendingReduce]] = []
        self._ready_counts = [0] * len(self.units)
        self._reduced = [False] * len(self.units)
        self._hooks: list[Any] = []
        self.on_final_grads: FinalGradsHandler | None = None  # sees each unit's final gradients (offload)
        self._register_grad_hooks()
        if self.stage == 3:
            self._register_param_hooks()

    def _build_unit(self, index: int, spec: UnitSpec, materialize: Materialize | None) -> FlatUnit:
        named = spec.named_params
        if any(param.is_meta for _, param in named):
            if materialize is None:
                raise ValueError(
                    f"unit {spec.name} has parameters on the meta device; pass lazy init or build the model on a real device"
                )
            named = materialize(spec)
        tiers = self.offload.tiers[index] if self.offload is not None else ON_DEVICE
        unit = FlatUnit(named, config=self.expert_config if spec.expert else self.config, tiers=tiers)
        if self.offload is not None:
            self.offload.attach(index, unit)
        # while a unit is flattened, its freshly initialised tensors and its flat buffer coexist
        self.peak_held_elements = max(self.peak_held_elements, self._held_so_far + 2 * unit.layout.padded_numel)
        self._held_so_far += unit.layout.shard_size
        return unit

    def held_tensors(self) -> list[torch.Tensor]:
        """Parameter storage only the units reach: ZeRO-3's 16-bit shards kept apart from an offloaded fp32
        master, or offloaded themselves (on the device the master is the shard, cast as it is gathered)."""
        return [unit.param_shard for unit in self.units if unit.param_shard is not unit.master_shard]

    @property
    def optimizer_params(self) -> list[nn.Parameter]:
        """This rank's pieces of the fp32 master shards, each with its placement record."""
        return [piece for unit in self.units for piece in unit.pieces]

    def named_grads(self) -> list[tuple[str, torch.Tensor | None]]:
        """Every parameter in one global order, with this rank's piece of its gradient (None if it has none)."""
        out: list[tuple[str, torch.Tensor | None]] = []
        for unit in self.units:
            local = {placement_of(piece).name: piece.grad for piece in unit.pieces}
            out += [(name, local.get(name)) for name in unit.names]
        return out

    # --- gradient reduction ---

    def _register_grad_hooks(self) -> None:
        for index, unit in enumerate(self.units):
            for param in unit.params:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._grad_hook(index)))

    def _grad_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def on_grad_ready(_param: torch.Tensor) -> None:
            deferred = (self.stage == 1 or self.defer_reduction) and not self.sync
            if deferred and not self._releases_after_use:
                return
            self._ready_counts[index] += 1
            if self._ready_counts[index] < len(self.units[index].params):
                return
            if deferred:  # this micro-batch is done with the unit; its gradients wait for the step's end
                self._ready_counts[index] = 0
                self.units[index].release()
                return
            self._reduce_unit(index)

        return on_grad_ready

    def _reduce_unit(self, index: int) -> None:
        unit = self.units[index]
        if self._reduced[index]:
            raise RuntimeError(
                f"unit {unit.names[0]}... was reduced twice in one micro-batch: call optimizer_step() before "
                "the next synced backward, and pass sync=False on accumulation micro-batches"
            )
        self._reduced[index] = True
        if self.on_final_grads is not None and self.sync:
            self.on_final_grads.before_reduce(unit)
        self._pending.append((unit, unit.start_reduce()))
        while len(self._pending) > MAX_IN_FLIGHT:
            self._complete_oldest()
        if self._releases_after_use:
            unit.release()

    def _complete_oldest(self) -> None:
        unit, pending = self._pending.pop(0)
        follow = unit.finish_reduce(pending)
        if follow is not None:  # hybrid sharding: the shard's all-reduce across replicas, in flight in turn
            self._pending.append((unit, follow))
            return
        if self.on_final_grads is not None and self.sync:
            self.on_final_grads.after_reduce(unit)

    @property
    def _releases_after_use(self) -> bool:
        """Stage 3 frees a gathered unit after each use, unless it is kept for the rest of the step."""
        return self.stage == 3 and (self.sync or not self.gather_once_per_step)

    def before_backward(self, *, sync: bool) -> None:
        self.sync = sync
        if not self.defer_reduction:  # under a pipeline, `backward_pass` marks each of the schedule's backwards
            self.in_backward = True

    @contextmanager
    def backward_pass(self) -> Iterator[None]:
        """Around one backward of a pipeline schedule: forwards run inside it are recomputation."""
        self.in_backward = True
        try:
            yield
        finally:
            self.in_backward = False

    def after_backward(self) -> None:
        """After each micro-batch's backward: reduce what backward left, wait for all of it."""
        self.in_backward = False
        if self.stage >= 2 or self.sync:
            for index, done in enumerate(self._reduced):
                if not done:
                    self._reduce_unit(index)
            while self._pending:
                self._complete_oldest()
        if self.stage >= 2:  # stage 1 re-arms at zero_(), after the step
            self._rearm()
        if self._releases_after_use:
            for unit in self.units:
                unit.release()

    def scale_(self, factor: torch.Tensor | float) -> None:
        for unit in self.units:
            unit.grad_shard.mul_(factor)

    def after_step(self) -> None:
        """Publish the stepped masters: cast into the parameter shards, re-gather (stages 1-2)."""
        handles = [unit.publish_step() for unit in self.units]
        for handle in handles:
            if handle is not None:
                handle.wait()

    def _rearm(self) -> None:
        self._reduced = [False] * len(self.units)
        self._ready_counts = [0] * len(self.units)

    def zero_(self) -> None:
        for unit in self.units:
            unit.zero_grads()
        self._rearm()

    # --- stage 3: gather before use, release after ---

    def _register_param_hooks(self) -> None:
        for position, site in enumerate(self.sites):
            self._hooks.append(site.module.register_forward_pre_hook(self._pre_forward(position)))
            self._hooks.append(site.module.register_forward_hook(self._post_forward(position)))

    def _gather(self, site: HookSite) -> None:
        for index in site.unit_indices:
            self.units[index].wait_gather()
        self._track_held()

    def _prefetch(self, position: int, *, direction: int) -> None:
        """Start gathering the units at `position`; offloaded shards one site further start their read."""
        if 0 <= position < len(self.sites):
            for index in self.sites[position].unit_indices:
                self.units[index].start_gather()
        after = position + direction
        if self.offload is not None and 0 <= after < len(self.sites):
            self.offload.prefetch_params([self.units[i] for i in self.sites[after].unit_indices])
        self._track_held()

    def _track_held(self) -> None:
        held = sum(
            u.layout.shard_size + (u.layout.padded_numel if u.full.untyped_storage().nbytes() else 0)
            for u in self.units
        )
        self.peak_held_elements = max(self.peak_held_elements, held)

    def _pre_forward(self, position: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            self._gather(self.sites[position])
            if not self.in_backward:
                self._prefetch(position + 1, direction=1)
            if self.offload is not None:
                self.offload.observe(f"forward:{self.sites[position].name}")

        return hook

    def _post_forward(self, position: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if self.in_backward:  # recomputation inside backward: the units stay until reduced
                return
            site = self.sites[position]
            if self.stage == 3 and not (self.gather_once_per_step and torch.is_grad_enabled()):
                for index in site.unit_indices:
                    self.units[index].release()
            self._hook_output(output, position)
            if self.offload is not None:
                self.offload.observe(f"after-forward:{site.name}")

        return hook

    def _hook_output(self, output: Any, position: int) -> None:
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        fired = [False]

        def before_backward(grad: torch.Tensor) -> torch.Tensor:
            if not fired[0]:
                fired[0] = True
                self._gather(self.sites[position])
                self._prefetch(position - 1, direction=-1)
                if self.offload is not None:
                    self.offload.observe(f"backward:{self.sites[position].name}")
            return grad

        for tensor in tensors:
            tensor.register_hook(before_backward)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set every unit's shard (and master) from full tensors by name."""
        missing = sorted(set(self.model.state_dict(keep_vars=True)) - set(state))
        if missing:
            raise ValueError(
                f"the state lacks {len(missing)} parameters, e.g. {missing[:3]}; load a checkpoint of this model"
            )
        for unit in self.units:
            unit.load_full([state[name] for name in unit.names])
        unit_params = {id(p) for unit in self.units for p in unit.params}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if id(tensor) not in unit_params:
                tensor.data.copy_(state[name])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with full parameters (gathers under stage 3: call on every dp rank).

        Keys are the model's own, tied aliases and buffers included.
        """
        by_id: dict[int, torch.Tensor] = {}
        for unit in self.units:
            was_gathered = unit.gathered
            unit.wait_gather()
            for param, value in zip(unit.params, unit.full_state().values(), strict=True):
                by_id[id(param)] = value
            if self.stage == 3 and not was_gathered:
                unit.release()
        state = self.model.state_dict(keep_vars=True)
        return {name: by_id[id(t)] if id(t) in by_id else t.detach().clone() for name, t in state.items()}

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
