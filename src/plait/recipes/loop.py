"""The loop behind `plait finetune`: a recipe's model, loss and batches trained by `plait.boost` under the
config's plan, with `plait train`'s progress bar, metrics line, metrics.csv/TensorBoard log, loss plot and
checkpoints (which `plait eval`, `plait generate` and `plait export` read like a `plait train` checkpoint),
and `plait train`'s operations (plait.train.operations): the hang watchdog, SIGINT/SIGTERM finishing the step
and saving it (train.save_on_signal), time-based saves (train.checkpoint_every_s), background checkpoint
writes (train.async_checkpoints), all agreed by every rank after each step.

A recipe hands the loop a `RecipeData`: this rank's share of each step's batch and of the held-out batches,
cut by dp rank (tensor and pipeline peers get the same share), so every plan sees the same global batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from plait.checkpoint.io import checkpoint_name, prune_checkpoints
from plait.config import Plan
from plait.distributed.launch import FILE_ONLY, get_logger, init_distributed, is_main_rank, log_file
from plait.distributed.mesh import Mesh
from plait.engine import Engine
from plait.recipes.config import FinetuneConfig
from plait.train import metrics
from plait.train.logs import MetricsLog, format_metrics_line, plot_loss_curve
from plait.train.loop import engine_for
from plait.train.operations import Operations
from plait.train.setup import launched_world_size, seed_everything

LOG_FILE = "finetune.log"  # in out_dir: every rank's log lines
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RecipeData:
    """A recipe's batches. `train_batch(step, dp_rank, dp_size)` is this rank's share of step `step`'s global
    batch (global_batch / dp rows); `eval_batches(dp_rank, dp_size)` its share of the held-out batches."""

    train_batch: Callable[[int, int, int], Batch]
    eval_batches: Callable[[int, int], list[Batch]]
    tokens_per_step: int | Callable[[int], int]  # tokens of one global batch (all ranks), or step -> tokens


@dataclass(frozen=True)
class CheckpointRecord:
    """What a fine-tuned checkpoint keeps beside the weights, so plait's commands read it like the base's:
    `config` (the base's config.json) and `extra` trainer-state entries (tokenizer, hf record, data split)."""

    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinetuneSummary:
    steps: int
    first_eval_loss: float | None
    last_eval_loss: float | None
    losses: list[float]
    tokens_per_s: float
    out_dir: str
    stopped_by: str | None = None  # SIGINT/SIGTERM: the run stopped early (train.save_on_signal saved it)


def checked_plan(config: FinetuneConfig, *, world_size: int) -> Plan:
    """The plan resolved for `world_size` and checked, before any collective."""
    plan = config.plan.resolve(world_size)
    plan.check_available()
    config.check_batching(plan.dp)
    return plan


def build_engine(config: FinetuneConfig, model: nn.Module, *, loss_fn: Any, mesh: Mesh) -> Engine:
    return engine_for(config.train, model, loss_fn=loss_fn, mesh=mesh)


class FinetuneRun:
    """One fine-tuning run on this rank (the process group exists or is joined here)."""

    def __init__(
        self, config: FinetuneConfig, model: nn.Module, *, loss_fn: Any, data: RecipeData, record: CheckpointRecord
    ) -> None:
        plan = checked_plan(config, world_size=launched_world_size())
        device = init_distributed(timeout_s=config.train.collective_timeout_s)
        torch.set_num_threads(config.train.threads)
        self.config, self.data, self.record, self.device = config, data, record, device
        self.log = get_logger()
        self.mesh = Mesh(plan, device_type=device.type)
        seed_everything(config.train.seed)
        self.engine = build_engine(config, model.to(device), loss_fn=loss_fn, mesh=self.mesh)
        self.out_dir = Path(config.train.out_dir)
        self.metrics_log = MetricsLog(self.out_dir, enabled=is_main_rank())
        self.throughput = metrics.Throughput()
        self.eval_losses: list[float] = []
        self.losses: list[float] = []
        self.step = 0
        self.operations = Operations(config, comm=self.engine.comm, device=device)
        self.log.info(f"{self.mesh} | recipe {config.recipe.kind} | base {config.base.path}")

    def evaluate(self) -> float | None:
        if not self.config.data.eval_examples:
            return None
        batches = self.data.eval_batches(self.engine.dp_rank, self.engine.dp_size)
        loss = self.engine.evaluate(batches).item()
        self.eval_losses.append(loss)
        return loss

    def train_one_step(self) -> dict[str, Any]:
        batch = self.data.train_batch(self.step, self.engine.dp_rank, self.engine.dp_size)
        start = time.perf_counter()
        result = self.engine.train_step(batch)
        loss = result.loss.item()
        seconds = time.perf_counter() - start
        tokens = self.data.tokens_per_step
        self.throughput.record(self.step, tokens(self.step) if callable(tokens) else tokens, seconds)
        self.losses.append(loss)
        return {
            "loss": loss,
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm.item(),
            "step_s": seconds,
        }

    def save(self) -> None:
        self.operations.progress(self.step, "saving a checkpoint")
        path = self.out_dir / "checkpoints" / checkpoint_name(self.step)
        self.engine.save(
            path,
            extra={**self.record.extra, "step": self.step, "finetune": self.config.to_dict()},
            config=self.record.config,
            asynchronous=self.config.train.async_checkpoints,
            on_commit=self._committed,
        )

    def _committed(self, path: Path) -> None:
        prune_checkpoints(path.parent, keep=self.config.train.keep_checkpoints)
        self.log.info(f"saved {path}")

    def _log_line(self, values: dict[str, Any], bar: tqdm) -> None:
        values["tokens_per_s"] = self.throughput.recent_tokens_per_s()
        values["state_bytes"] = self.state_bytes()
        values["peak_rss"] = metrics.peak_rss_bytes()
        line = format_metrics_line(self.step, self.config.train.steps, values)
        if is_main_rank():
            bar.write(line)
        self.log.info(line, extra={FILE_ONLY: True})

    def state_bytes(self) -> int:
        """Bytes of model state this rank holds (a recipe with more models than its engine adds theirs)."""
        return self.engine.state_bytes()["total"]

    def run(self) -> FinetuneSummary:
        train = self.config.train
        self.operations.start(self.step)
        first = self.evaluate()
        self.metrics_log.log(0, {"val_loss": first})
        bar = tqdm(total=train.steps, disable=not is_main_rank(), desc=self.config.recipe.kind, unit="step")
        while self.step < train.steps:
            values = self.train_one_step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            last = self.step == train.steps
            if self.step % train.eval_every == 0 or last:
                values["val_loss"] = self.evaluate()
            if self.step % train.log_every == 0 or last:
                self._log_line(values, bar)
            self.metrics_log.log(self.step, values)
            saved = self.step % train.checkpoint_every == 0 or last
            if saved:
                self.save()
            stop = self.operations.end_of_step(
                self.step, saved=saved, save=self.save, wait_for_save=self.engine.wait_for_save, resumable=False
            )  # `plait finetune` has no --resume: the stop line names the checkpoint only
            if stop:
                break
        bar.close()
        return self.finish(first)

    def finish(self, first: float | None) -> FinetuneSummary:
        self.engine.wait_for_save()
        self.metrics_log.close()
        if is_main_rank():
            plot_loss_curve(self.metrics_log.csv_path, self.out_dir / "loss.png")
        return FinetuneSummary(
            steps=self.step,
            first_eval_loss=first,
            last_eval_loss=self.eval_losses[-1] if self.eval_losses else None,
            losses=self.losses,
            tokens_per_s=self.throughput.tokens_per_s(),
            out_dir=str(self.out_dir),
            stopped_by=self.operations.stopped_by,
        )


def summary_line(summary: FinetuneSummary) -> str:
    first = f"{summary.first_eval_loss:.4f}" if summary.first_eval_loss is not None else "?"
    last = f"{summary.last_eval_loss:.4f}" if summary.last_eval_loss is not None else "?"
    return (
        f"{summary.steps} steps | held-out loss {first} -> {last} | {summary.tokens_per_s:.0f} tokens/s | "
        f"log, metrics.csv, loss.png and checkpoints in {summary.out_dir}"
    )


def train_recipe(
    config: FinetuneConfig, model: nn.Module, *, loss_fn: Any, data: RecipeData, record: CheckpointRecord
) -> FinetuneSummary:
    """Fine-tune `model` per `config` on this rank (under torchrun every rank calls this)."""
    return run_to_end(config, lambda: FinetuneRun(config, model, loss_fn=loss_fn, data=data, record=record))


def run_to_end(config: FinetuneConfig, make_run: Callable[[], FinetuneRun]) -> FinetuneSummary:
    """Build a run inside its log file, run it, close its engine, log the summary on rank 0 and leave the
    process group as found (under a test harness the caller owns it)."""
    owns_group = not dist.is_initialized()
    try:
        with log_file(Path(config.train.out_dir) / LOG_FILE):
            run = make_run()
            try:
                summary = run.run()
            finally:
                run.operations.close()  # the watchdog and the signal handlers end with the run, a failed one too
                run.engine.close()
            if is_main_rank():
                run.log.info(f"done: {summary_line(summary)}")
            return summary
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
