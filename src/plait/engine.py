"""boost(): apply a plan to a model and own the training step.

The strands apply in a fixed order, TP -> recompute -> PP split -> compile -> ZeRO/DP (recomputation
wraps the layers the stages then hold); this is the one place that composes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from plait.amp.policy import PrecisionPolicy
from plait.amp.scaler import LossScaler, Overflow
from plait.checkpoint.engine_state import load_engine, save_engine
from plait.checkpoint.writer import CheckpointWriter
from plait.compile import CompileStats, apply_compile, check_compile_available
from plait.config import Plan
from plait.context.apply import ContextParallel, apply_context_parallel
from plait.context.batch import context_loss
from plait.distributed.comm import CommCounter, all_reduce
from plait.distributed.launch import get_logger, join_launched_group
from plait.distributed.memory import model_state_bytes
from plait.distributed.mesh import Mesh
from plait.losses import with_hidden_request
from plait.moe import expert_parameters, has_moe, reset_stats, set_aux_loss_scale
from plait.moe.all_to_all import Exchange
from plait.moe.expert_parallel import apply_expert_parallel, check_expert_parallel, gather_experts
from plait.optim.layerwise import use_mesh_norms
from plait.pipeline.build import build_pipeline
from plait.pipeline.runtime import StepInputs
from plait.recompute import apply_recompute
from plait.tensor.apply import apply_tensor_parallel, count_collectives
from plait.tensor.hf import apply_hf_tensor_parallel, check_tp
from plait.tensor.loss_check import CheckedLoss
from plait.tensor.state import gather_tp_state
from plait.update import Update
from plait.zero.factory import build_data_parallel
from plait.zero.offload.manager import Offload
from plait.zero.offload.settle import after_step as settle_after_step
from plait.zero.sharded import ZeroDataParallel

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Any, Batch], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class StepResult:
    """What one training step reports; reading a field is the only host sync."""

    loss: torch.Tensor  # 0-dim, the global batch loss, equal on every rank
    grad_norm: torch.Tensor  # 0-dim, before clipping
    num_tokens: torch.Tensor  # 0-dim, tokens (or micro-batches, for mean losses) in the global batch
    skipped: bool  # fp16: a non-finite gradient skipped the optimizer step


def split_microbatches(batch: Batch, num_microbatches: int) -> list[Batch]:
    """Split every tensor of a batch along dim 0 into equal micro-batches."""
    sizes = {key: value.size(0) for key, value in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sizes}; give every tensor the same first dim")
    size = next(iter(sizes.values()))
    if size % num_microbatches:
        raise ValueError(
            f"this rank's batch of {size} sequences does not split into plan.microbatches={num_microbatches}; "
            f"feed a multiple of {num_microbatches} sequences per rank or change plan.microbatches"
        )
    chunks = {key: value.chunk(num_microbatches) for key, value in batch.items()}
    return [{key: chunks[key][i] for key in batch} for i in range(num_microbatches)]


@dataclass
class EngineParts:
    """The factories and knobs `boost` hands the engine."""

    optimizer: OptimizerFactory
    loss_fn: LossFn
    lr_scheduler: SchedulerFactory | None = None
    max_grad_norm: float | None = None
    on_nonfinite: str | None = None  # fp32/bf16: "stop" (NonFiniteError) or "skip" a step whose loss or norm is nan/inf


class Engine:
    """A model trained under a plan. Build it with `plait.boost`."""

    def __init__(self, model: nn.Module, *, parts: EngineParts, mesh: Mesh) -> None:
        mesh.plan.check_available()
        check_compile_available(mesh.plan.compile, device_type=mesh.device_type)
        self.moe = has_moe(model)
        _check_moe_plan(model, mesh)
        self.mesh = mesh
        self.plan = mesh.plan
        self.loss_fn = CheckedLoss(parts.loss_fn) if mesh.size("tp") > 1 else parts.loss_fn  # tp: vocab slices
        self.max_grad_norm = parts.max_grad_norm
        self.comm = CommCounter.for_mesh(mesh)  # every strand's collectives, per axis and link
        self.expert_params = _apply_ep(model, mesh=mesh, counter=self.comm)
        self.policy = PrecisionPolicy.from_name(self.plan.precision)
        self.scaler = LossScaler.from_policy(self.policy)
        self.device = torch.device(mesh.device_type) if _is_meta(model) else next(model.parameters()).device
        self.tensor_parallel = _apply_tp(model, mesh)
        if self.expert_params:  # tp swaps in sliced experts: their parameters are new objects
            self.expert_params = [param for _, param in expert_parameters(model)]
        self.recomputed = apply_recompute(  # before the split: the stages hold these same layer objects
            model,
            mode=self.plan.recompute,
            ratio=self.plan.recompute_ratio,
            modules=self.plan.recompute_modules or None,
        )
        self.pipeline = build_pipeline(model, mesh=mesh, device=self.device) if mesh.size("pp") > 1 else None
        self.model = self.pipeline.module if self.pipeline else model
        self.context = _apply_cp(self.model, mesh=mesh, counter=self.comm)
        if self.context is not None:
            self.loss_fn = context_loss(parts.loss_fn)
        self.compiled = apply_compile(  # after every strand that swaps layers, before DP hooks gradients
            model,
            mode=self.plan.compile,
            held=self.model if self.pipeline else None,
            stages=self.pipeline.runner.chunks if self.pipeline else (),
            eager=self.tensor_parallel,  # tp layers' collectives bound the compiled regions
        )
        self._compile_start = CompileStats.now() if self.compiled else None
        self.compile_stats: CompileStats | None = None  # set after the first step
        count_collectives(self.model, self.comm)
        if self.pipeline is not None:
            self.pipeline.runner.link.counter = self.comm
        self.data_parallel = build_data_parallel(
            self.model, mesh=mesh, policy=self.policy, counter=self.comm, expert_params=self.expert_params
        )
        if self.pipeline is not None and isinstance(self.data_parallel, ZeroDataParallel):
            self.pipeline.runner.backward_scope = self.data_parallel.backward_pass
        self.optimizer = parts.optimizer(self.data_parallel.optimizer_params)
        self.offload: Offload | None = getattr(self.data_parallel, "offload", None)
        use_mesh_norms(self.optimizer, mesh=mesh, offloaded=self.offload is not None)  # LAMB, LARS
        if self.offload is not None:
            self.offload.optimizer = self.optimizer
            for note in self.offload.notes if mesh.rank("dp") == 0 and mesh.rank("tp") == 0 else []:
                get_logger().info(note)
        self.scheduler = parts.lr_scheduler(self.optimizer) if parts.lr_scheduler else None
        self.update = Update(
            data_parallel=self.data_parallel,
            optimizer=self.optimizer,
            scaler=self.scaler,
            mesh=mesh,
            comm=self.comm,
            device=self.device,
            max_grad_norm=self.max_grad_norm,
            offload=self.offload,
            has_pipeline=self.pipeline is not None,
            on_nonfinite=parts.on_nonfinite,
        )
        self.steps_done = 0
        self.record_timeline = False  # pipeline: keep each action's start and end (benchmarks read them)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._count = torch.zeros((), dtype=torch.float64, device=self.device)
        self._divisor: torch.Tensor | None = None
        self._divisor_work: dist.Work | None = None
        self._stand_in = 1.0
        self._num_microbatches = self.plan.microbatches  # this step's, set by begin_step
        self._micro_losses: list[torch.Tensor] = []  # this step's, to name where a non-finite loss appeared
        self._writer: CheckpointWriter | None = None

    @property
    def last_overflow(self) -> Overflow | None:
        """The last step's fp16 overflow verdict (None before the first fp16 step)."""
        return self.update.last_overflow

    @property
    def dp_rank(self) -> int:
        return self.mesh.rank("data")  # the data shard; cp peers share it (plait.distributed.mesh)

    @property
    def dp_size(self) -> int:
        return self.mesh.size("data")

    def _model_inputs(self, batch: Batch, *, loss_fn: LossFn | None = None) -> Batch:
        """What the model's forward gets: the batch, less `labels` when the loss reads them itself, and
        `return_hidden` when the loss in use (`loss_fn`, default the engine's) takes hidden states."""
        if getattr(self.loss_fn, "reads_labels", False):
            batch = {key: value for key, value in batch.items() if key != "labels"}
        return with_hidden_request(batch, loss_fn=self.loss_fn if loss_fn is None else loss_fn, model=self.model)

    def _cp_shard(self, batch: Batch) -> Batch:
        """Under context parallel, this cp rank's two chunks of every row (plait.context.batch)."""
        return self.context.shard(batch) if self.context is not None else batch

    def _to_device(self, batch: Batch) -> Batch:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def begin_step(self, micro_batches: list[Batch]) -> None:
        """Fix the step's divisor before any backward: the global token count when
        the loss can count tokens up front. Without it, gradients are summed and
        divided at optimizer_step."""
        counter = getattr(self.loss_fn, "count_tokens", None)
        self._divisor = None
        self._num_microbatches = len(micro_batches)
        if counter is not None:  # summed over dp while the first forward runs; waited for before backward
            count = torch.stack([counter(mb) for mb in micro_batches]).sum().double().to(self.device)
            self._divisor_work = all_reduce(count, group=self.mesh.group("dp"), counter=self.comm, async_op=True)
            self._divisor = count

    def _global_divisor(self) -> torch.Tensor | None:
        if self._divisor_work is not None:
            self._divisor_work.wait()
            self._divisor_work = None
        return self._divisor

    def forward_backward(self, micro_batch: Batch, *, sync: bool = True) -> torch.Tensor:
        """Forward and backward one micro-batch, accumulating gradients.

        Pass sync=False on every micro-batch but the last of a step: only the
        last one communicates (where the ZeRO stage allows). Returns the
        micro-batch's loss as the loss_fn gave it.
        """
        micro_batch = self._to_device(micro_batch)
        self._set_moe_aux_scale()
        outputs = self.model(**self._model_inputs(micro_batch))
        loss = self.loss_fn(outputs, micro_batch)
        loss_sum, count = loss if isinstance(loss, tuple) else (loss, torch.ones((), device=loss.device))
        divisor = self._global_divisor()
        if divisor is not None:
            to_backward = loss_sum / divisor.float()
        else:  # the count is known only after the step: divide by a stand-in now (fp16 range), correct later
            self._stand_in = float(next(iter(micro_batch.values())).numel()) if isinstance(loss, tuple) else 1.0
            to_backward = loss_sum / self._stand_in
        if sync:
            self.update.arm(divisor_known=self._divisor is not None)
        self.data_parallel.before_backward(sync=sync)
        self.scaler.scale_loss(to_backward).backward()
        self.data_parallel.after_backward()
        self._loss_sum += loss_sum.detach().double()
        self._count += count.detach().double()
        self._micro_losses.append(loss_sum.detach())
        return loss_sum.detach()

    def _set_moe_aux_scale(self) -> None:
        """The gradient MoE layers start their weighted aux loss's backward with (plait.moe.aux).

        The update must see the gradient of loss + weight x (the aux loss's mean over every routing
        group of the step: one per micro-batch per dp rank), as one process with num_groups = dp x
        micro-batches computes it. With the global token count known up front, each micro-batch's
        loss goes to backward divided by it and times the loss scale, and the sum over micro-batches
        and dp ranks is the update's gradient: the aux starts at loss scale / (dp x micro-batches).
        Without the count, the summed gradients are divided by it after backward (for a mean loss,
        by dp x micro-batches): the aux starts at the loss scale. (A (sum, count) loss without
        count_tokens is divided by its token count instead; the aux weight is then relative to a
        mean over every position of the batch.)
        """
        if not self.moe:
            return
        groups = self.dp_size * self._num_microbatches if self._divisor is not None else 1
        set_aux_loss_scale(self.model, self.scaler.scale / groups)

    def _gradient_factor(self, count: torch.Tensor) -> torch.Tensor | float | None:
        """What the summed gradients are multiplied by before clipping (None: nothing to do)."""
        factor = 1.0 / self.scaler.scale
        if self._divisor is None:
            factor = factor * self._stand_in / count
        return factor if self.scaler.dynamic or self._divisor is None else None

    def optimizer_step(self) -> StepResult:
        """Normalise by the global count, unscale, clip, step; skip on fp16 overflow."""
        totals = torch.stack([self._loss_sum, self._count])
        all_reduce(totals, group=self.mesh.group("dp"), counter=self.comm)
        if self.pipeline is not None:  # only the last stage saw the loss: share it, count it once
            all_reduce(totals, group=self.mesh.group("pp"), counter=self.comm)
        loss_sum, count = totals.unbind()
        self.update.steps_done = self.steps_done
        micro_losses, self._micro_losses = self._micro_losses, []
        grad_norm, skipped = self.update.step(
            self._gradient_factor(count), loss=loss_sum / count, micro_losses=micro_losses
        )
        if self.scheduler is not None:
            self.scheduler.step()
        self.data_parallel.zero_()
        if self.offload is not None and (note := settle_after_step(self.offload)):
            get_logger().info(note)
        self._loss_sum.zero_()
        self._count.zero_()
        self._divisor = None
        self.steps_done += 1
        self._report_compile()
        return StepResult(loss=(loss_sum / count).float(), grad_norm=grad_norm, num_tokens=count, skipped=skipped)

    def _report_compile(self) -> None:
        """Once, after the first step: graphs, graph breaks and seconds compiling (plait.compile)."""
        if self._compile_start is None or self.compiled is None:
            return
        stats = CompileStats.now().since(self._compile_start)
        self._compile_start = None
        self.compile_stats = stats
        get_logger().info(stats.line(self.compiled.describe()))

    def _pipeline_step(self, micro_batches: list[Batch]) -> None:
        """Run the schedule without communicating gradients, sync tied weights, then reduce over dp."""
        assert self.pipeline is not None
        micro_batches = [self._to_device(mb) for mb in micro_batches]
        self._set_moe_aux_scale()
        self.data_parallel.before_backward(sync=False)
        divisor = self._global_divisor()
        divisor = divisor.float() if divisor is not None else 1.0
        step = StepInputs(
            micro_batches=micro_batches,
            loss_fn=self.loss_fn,
            loss_scale=lambda loss_sum: self.scaler.scale_loss(loss_sum / divisor),
        )
        loss_sum, count = self.pipeline.runner.run(step, record_timeline=self.record_timeline)
        if self.pipeline.tied_group is not None:
            for param in self.pipeline.tied_params:
                all_reduce(param.grad, group=self.pipeline.tied_group, counter=self.comm)
        self.data_parallel.before_backward(sync=True)
        self.data_parallel.after_backward()
        self._loss_sum += loss_sum.to(self._loss_sum)
        self._count += count.to(self._count)

    def train_step(self, batch: Batch) -> StepResult:
        """One optimizer step on this rank's share of the global batch."""
        micro_batches = [self._cp_shard(mb) for mb in split_microbatches(batch, self.plan.microbatches)]
        if self.offload is not None:
            self.offload.reset_stats()
        if self.moe:
            reset_stats(self.model)  # plait.moe.collect_stats then reads this step's routing
        self.begin_step(micro_batches)
        if self.pipeline is not None:
            self._pipeline_step(micro_batches)
            return self.optimizer_step()
        for index, micro_batch in enumerate(micro_batches):
            self.forward_backward(micro_batch, sync=index == len(micro_batches) - 1)
        return self.optimizer_step()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], *, metric: LossFn | None = None) -> torch.Tensor:
        """The loss over this rank's share of `batches`, combined over dp as train_step does; `metric`
        (same contract as loss_fn, e.g. (correct, count) for an accuracy) in place of the loss."""
        loss_fn = self.loss_fn if metric is None else metric
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = [self._to_device(self._cp_shard(batch)) for batch in batches]
        if self.pipeline is not None:
            loss_sum, count = self.pipeline.runner.forward_only(batches, loss_fn=loss_fn)
            totals += torch.stack([loss_sum, count]).to(totals)
            all_reduce(totals, group=self.mesh.group("pp"), counter=self.comm)
        for batch in batches if self.pipeline is None else []:
            loss = loss_fn(self.model(**self._model_inputs(batch, loss_fn=loss_fn)), batch)
            loss_sum, count = loss if isinstance(loss, tuple) else (loss, torch.ones(()))
            totals += torch.stack([loss_sum.double(), count.to(totals)])
        all_reduce(totals, group=self.mesh.group("dp"), counter=self.comm)
        self.model.train(was_training)
        return (totals[0] / totals[1]).float()

    def state_bytes(self) -> dict[str, int]:
        """Model-state bytes this rank holds (params, grads, optimizer), from the live storages."""
        return model_state_bytes(self.model, self.optimizer, held=self.data_parallel.held_tensors())

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole model weights by name (every rank must call this: ZeRO-3 and tp gather)."""
        state = gather_tp_state(self.data_parallel.full_state_dict(), self.model, group=self.mesh.group("tp"))
        gather_experts(state, self.model, group=self.mesh.group("ep"))
        if self.pipeline is not None:  # each pipeline rank holds some layers: collect them all
            parts: list[Any] = [None] * self.mesh.size("pp")
            dist.all_gather_object(parts, state, group=self.mesh.group("pp"))
            state = {name: tensor for part in parts for name, tensor in part.items()}
        return state

    def save(
        self,
        path: str | Path,
        *,
        extra: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        asynchronous: bool = False,
        on_commit: Callable[[Path], None] | None = None,
    ) -> None:
        """Write the whole training state as a checkpoint any plan can load (call on every rank).

        Each rank writes the pieces it owns; rank 0 commits the directory
        atomically. `asynchronous=True` returns once the state is copied to
        host memory and writes from a background thread (one save in flight;
        `wait_for_save()` blocks until it is committed). `extra` (picklable)
        and `config` (JSON) are stored beside it; `on_commit(path)` runs on
        rank 0 once the checkpoint is in place.
        """
        if self._writer is None:
            self._writer = CheckpointWriter()
        save_engine(
            self,
            Path(path),
            writer=self._writer,
            extra=extra or {},
            config=config or {"plan": dataclasses.asdict(self.plan)},
            asynchronous=asynchronous,
            on_commit=on_commit,
        )

    def close(self) -> None:
        """Finish any save and remove the offload files (also done at interpreter exit)."""
        self.wait_for_save()
        if self.offload is not None:
            self.offload.close()

    def wait_for_save(self) -> None:
        """Block until an asynchronous save is committed (re-raising its error)."""
        if self._writer is not None:
            self._writer.wait()

    def load(self, path: str | Path) -> tuple[dict[str, Any], list[str]]:
        """Load a checkpoint saved under any plan (call on every rank). Returns the saved
        trainer state (with `extra`'s entries) and notes on what makes the continuation inexact."""
        self.wait_for_save()
        return load_engine(self, Path(path))


def _apply_tp(model: nn.Module, mesh: Mesh) -> list[str]:
    """Swap in tensor-parallel layers by the model's plan (plait's GPT carries one as `tp_plan()`);
    a model without one (Hugging Face's) gets `tp_plan_for(model)`, checked before any collective."""
    group = mesh.group("tp")
    if group is None:
        return []
    if _is_meta(model):
        raise ValueError(
            "lazy (meta-device) initialisation with plan.tp > 1 is not available yet; build the model on a real "
            "device, or load a Hugging Face checkpoint with plait.tensor.hf.load_pretrained_tp"
        )
    plan_of = getattr(model, "tp_plan", None)
    if not callable(plan_of):  # Hugging Face models hold a dict of HF styles there (or nothing)
        return apply_hf_tensor_parallel(model, group=group, sequence_parallel=mesh.plan.sequence_parallel)
    plan = plan_of()
    check_tp(model, mesh.size("tp"), plan=plan)
    return apply_tensor_parallel(model, plan, group=group, sequence_parallel=mesh.plan.sequence_parallel)


def _apply_cp(model: nn.Module, *, mesh: Mesh, counter: CommCounter) -> ContextParallel | None:
    """Context parallel: ring attention in plait's attention layers (None without cp)."""
    if mesh.size("cp") == 1:
        return None
    if has_moe(model):
        raise ValueError(
            "plan.cp with a Mixture-of-Experts model is not available yet in plait (experts would route "
            "pieces of sequences); set plan.cp=1"
        )
    return apply_context_parallel(model, mesh=mesh, counter=counter)


def _check_moe_plan(model: nn.Module, mesh: Mesh) -> None:
    """Mixture-of-Experts layers route whole tokens on every tp rank (their experts split over tp) and
    run inside pipeline stages; sequence parallel would hand them a slice of the sequence, with routing
    groups the plain process does not have."""
    if mesh.plan.ep > 1:
        check_expert_parallel(model, mesh.plan.ep)
    if not has_moe(model):
        return
    if mesh.size("tp") > 1 and mesh.plan.sequence_parallel:
        raise ValueError(
            "plan.sequence_parallel with a Mixture-of-Experts model is not available yet in plait: MoE layers "
            "route whole sequences; set plan.sequence_parallel=false (tp and pp work without it)"
        )
    if callable(getattr(model, "tp_plan", None)):  # plait's GPT: its MoE layers tested under tp and pp
        return
    for axis in ("tp", "pp"):
        if mesh.size(axis) > 1:
            raise ValueError(
                f"plan.{axis}={mesh.size(axis)} with plait's MoE layers in a model other than plait's GPT is not "
                f"available yet; set plan.{axis}=1 (dp, ep and ZeRO 0-3 work)"
            )


def _apply_ep(model: nn.Module, *, mesh: Mesh, counter: CommCounter) -> list[nn.Parameter]:
    """Expert parallel: keep this rank's experts, exchange tokens by all-to-all; returns the expert
    parameters (reduced over edp, not dp), or [] without ep."""
    group = mesh.group("ep")
    if group is None:
        return []
    exchange = Exchange(group=group, rank=mesh.rank("ep"), size=mesh.size("ep"), counter=counter)
    apply_expert_parallel(model, exchange=exchange)
    return [param for _, param in expert_parameters(model)]


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def boost(
    model: nn.Module,
    *,
    optimizer: OptimizerFactory,
    loss_fn: LossFn,
    plan: Plan | None = None,
    mesh: Mesh | None = None,
    lr_scheduler: SchedulerFactory | None = None,
    max_grad_norm: float | None = None,
    on_nonfinite: str | None = None,
) -> Engine:
    """Apply `plan` to `model` and return the engine that trains it.

    Example::

        engine = plait.boost(model, optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-4),
                             loss_fn=plait.losses.causal_lm, plan=plait.Plan(dp=-1, zero=2))
        result = engine.train_step(batch)

    A model built under `torch.device("meta")` is materialised shard by shard (plan.zero=3).
    `on_nonfinite` ("stop" or "skip"; fp32/bf16) checks every step's loss and gradient norm: "stop" raises
    plait.update.NonFiniteError naming the step, micro-batch and first parameter, "skip" skips the update.
    """
    if mesh is None:
        plan = plan or Plan()
        plan.check_available()  # before the mesh enters any collective
        check_compile_available(plan.compile, device_type=_device_type(model))
        if plan.ep > 1:
            check_expert_parallel(model, plan.ep)
        join_launched_group(_device_type(model))  # under torchrun (`plait run`) the script need not join it
        mesh = Mesh(plan, device_type=_device_type(model))
    elif plan is not None and plan != mesh.plan:
        raise ValueError("pass either plan= or mesh= (a mesh carries its plan), not two different plans")
    if on_nonfinite not in (None, "stop", "skip"):
        raise ValueError(f"on_nonfinite={on_nonfinite!r}: choose 'stop', 'skip' or None (no check)")
    parts = EngineParts(
        optimizer=optimizer,
        loss_fn=loss_fn,
        lr_scheduler=lr_scheduler,
        max_grad_norm=max_grad_norm,
        on_nonfinite=on_nonfinite,
    )
    return Engine(model, parts=parts, mesh=mesh)


def _device_type(model: nn.Module) -> str:
    device = next(model.parameters()).device
    return device.type if device.type != "meta" else ("cuda" if torch.cuda.is_available() else "cpu")
