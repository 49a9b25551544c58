"""The loop behind `plait train`: steps, metrics, validation, checkpoints, plots."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from plait.checkpoint.io import checkpoint_name, prune_checkpoints
from plait.checkpoint.lengths import checkpoint_lineage
from plait.config import Config, TrainConfig
from plait.distributed.launch import FILE_ONLY, get_logger, init_distributed, is_main_rank, log_file
from plait.distributed.mesh import Mesh
from plait.engine import Engine, boost
from plait.optim import lr_schedule
from plait.train import metrics
from plait.train.logs import MetricsLog, format_metrics_line, plot_loss_curve
from plait.train.operations import Operations, restart_count
from plait.train.optimizers import optimizer_from_config
from plait.train.preflight import AUTO, newest_verified_checkpoint
from plait.train.resume import restore, save_training_state
from plait.train.setup import (
    DataSources,
    build_data,
    build_model,
    checkpoint_extra,
    launched_world_size,
    seed_everything,
    validate,
)
from plait.train.text_tasks import task_tokenizer, text_task

LOG_FILE = "train.log"  # in out_dir: every rank's log lines, appended, "[rank R]" before each


@dataclass
class RunSummary:
    steps: int
    first_val_loss: float | None  # at the run's first step: 0, or the step it resumed at
    last_val_loss: float | None
    tokens_per_s: float
    out_dir: str
    losses: list[float]
    start_step: int = 0
    stopped_by: str | None = None  # SIGINT/SIGTERM: the run stopped early (train.save_on_signal saved it)


def build_engine(config: Config, model: torch.nn.Module, *, mesh: Mesh) -> Engine:
    # causal_lm unless [task] names another (plait.tasks)
    return engine_for(config.train, model, loss_fn=text_task(config).loss_fn, mesh=mesh)


def engine_for(train: TrainConfig, model: torch.nn.Module, *, loss_fn: Any, mesh: Mesh) -> Engine:
    """`boost` with the [train] table's optimizer, schedule, clipping and non-finite policy."""
    return boost(
        model,
        optimizer=optimizer_from_config(train),
        loss_fn=loss_fn,
        mesh=mesh,
        lr_scheduler=lambda opt: lr_schedule(
            opt, name=train.schedule, warmup=train.warmup, total=train.steps, min_ratio=train.min_lr_ratio
        ),
        max_grad_norm=train.max_grad_norm,
        on_nonfinite=train.on_nonfinite,
    )


class Run:
    """One training run on this rank."""

    def __init__(self, config: Config, *, resume: str | None) -> None:
        validated = validate(config, world_size=launched_world_size())  # before any collective
        self.config = config
        device = init_distributed(timeout_s=config.train.collective_timeout_s)
        torch.set_num_threads(config.train.threads)
        self.log = get_logger()
        self.mesh = Mesh(validated.plan, device_type=device.type)
        seed_everything(config.train.seed)
        self.model = build_model(validated, mesh=self.mesh, device=device)
        self.engine = build_engine(config, self.model, mesh=self.mesh)
        self.data: DataSources = build_data(config, mesh=self.mesh, log=self.log, pretrained=validated.pretrained)
        self.tokenizer_json = task_tokenizer(self.data.prepared.load_tokenizer(), text_task(config)).to_str()
        self.checkpoint_extra = checkpoint_extra(validated) if is_main_rank() else {}
        self.out_dir = Path(config.train.out_dir)
        checkpoint, note = Path(resume) if resume else None, ""
        if resume == AUTO:  # the newest checkpoint under out_dir that verifies, or a fresh start
            checkpoint, note = newest_verified_checkpoint(self.out_dir)
        if note and is_main_rank():
            self.log.info(note)
        if checkpoint and is_main_rank():  # its stages count towards the trained length (plait.checkpoint.lengths)
            self.checkpoint_extra.update(checkpoint_lineage(checkpoint))
        self.step = restore(checkpoint, engine=self.engine, loader=self.data.loader) if checkpoint else 0
        self.metrics_log = MetricsLog(self.out_dir, enabled=is_main_rank(), start_step=self.step)
        self.throughput = metrics.Throughput()
        self.flops_per_token = validated.flops_per_token(config.data.seq_len)
        # MFU's denominator: a large matmul in the run's precision on this rank's threads
        self.peak = metrics.measure_peak(device, dtype=self.engine.policy.param_dtype)
        self.peak_flops = self.peak.flops
        self.val_losses: list[float] = []
        self.losses: list[float] = []
        self.log.info(f"{self.mesh} | model {validated.num_parameters() / 1e6:.2f}M params | start step {self.step}")
        self.log.info(self.peak.line())
        self.operations = Operations(config, comm=self.engine.comm, device=device)
        self.stopped_by: str | None = None

    def evaluate(self) -> float | None:
        if not self.data.val_batches:
            return None  # data.val_fraction=0: no validation split
        val_loss = self.engine.evaluate(self.data.val_batches).item()
        self.val_losses.append(val_loss)
        return val_loss

    def train_one_step(self) -> dict[str, float]:
        batch = self.data.loader.next_batch()
        start = time.perf_counter()
        result = self.engine.train_step(batch)
        loss = result.loss.item()
        seconds = time.perf_counter() - start
        num_tokens = self.config.train.global_batch * self.config.data.seq_len
        self.throughput.record(self.step, num_tokens, seconds)
        self.losses.append(loss)
        return {
            "loss": loss,
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm.item(),
            "step_s": seconds,
            **metrics.comm_metrics(self.engine.comm),  # bytes sent this step: total, per axis, per link
            **metrics.offload_metrics(self.engine.offload),  # bytes per tier, I/O this step
            **metrics.moe_metrics(self.engine.model),  # routing: aux loss, drops, expert load
        }

    def add_slow_metrics(self, values: dict[str, Any]) -> None:
        tokens_per_s = self.throughput.recent_tokens_per_s()
        values["tokens_per_s"] = tokens_per_s
        values["mfu"] = metrics.mfu(
            tokens_per_s=tokens_per_s,
            flops_per_token=self.flops_per_token,
            peak_flops=self.peak_flops,
            num_ranks=self.mesh.world_size,
        )
        values["state_bytes"] = self.engine.state_bytes()["total"]
        values["peak_rss"] = metrics.peak_rss_bytes()

    def _committed(self, path: Path) -> None:
        prune_checkpoints(path.parent, keep=self.config.train.keep_checkpoints)
        self.log.info(f"saved {path}")

    def save(self) -> None:
        self.operations.progress(self.step, "saving a checkpoint")
        save_training_state(
            self.out_dir / "checkpoints" / checkpoint_name(self.step),
            engine=self.engine,
            loader=self.data.loader,
            step=self.step,
            config=self.config,
            tokenizer_json=self.tokenizer_json,
            extra=self.checkpoint_extra,
            asynchronous=self.config.train.async_checkpoints,
            on_commit=self._committed,
        )

    def run(self) -> RunSummary:
        train = self.config.train
        start_step = self.step
        self.operations.start(self.step)
        first_val = self.evaluate()  # a resumed run too: its summary starts from the loaded weights' loss
        if start_step == 0:
            self.metrics_log.log(0, {"val_loss": first_val})
        bar = tqdm(total=train.steps, initial=self.step, disable=not is_main_rank(), desc="train", unit="step")
        while self.step < train.steps:
            self.engine.comm.reset()
            values = self.train_one_step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            if self.step % train.eval_every == 0 or self.step == train.steps:
                values["val_loss"] = self.evaluate()
            if self.step % train.log_every == 0 or self.step == train.steps:
                self.add_slow_metrics(values)
                line = format_metrics_line(self.step, train.steps, values)
                if is_main_rank():
                    bar.write(line)
                self.log.info(line, extra={FILE_ONLY: True})  # the bar wrote it to the console
            self.metrics_log.log(self.step, values)
            saved = self.step % train.checkpoint_every == 0 or self.step == train.steps
            if saved:
                self.save()
            if self.end_of_step(saved=saved):
                break
        bar.close()
        return self.finish(first_val, start_step=start_step)

    def end_of_step(self, *, saved: bool) -> bool:
        """Every rank agrees whether to stop or save (plait.train.operations); True when the run stops here."""
        stop = self.operations.end_of_step(
            self.step, saved=saved, save=self.save, wait_for_save=self.engine.wait_for_save
        )
        self.stopped_by = self.operations.stopped_by
        return stop

    def finish(self, first_val: float | None, *, start_step: int) -> RunSummary:
        self.engine.wait_for_save()
        self.operations.close()
        self.metrics_log.close()
        if is_main_rank():
            plot_loss_curve(self.metrics_log.csv_path, self.out_dir / "loss.png")
        summary = RunSummary(
            steps=self.step,
            first_val_loss=first_val,
            last_val_loss=self.val_losses[-1] if self.val_losses else None,
            tokens_per_s=self.throughput.tokens_per_s(),
            out_dir=str(self.out_dir),
            losses=self.losses,
            start_step=start_step,
            stopped_by=self.stopped_by,
        )
        if is_main_rank():
            self.log.info(f"done: {summary_line(summary)}")
        return summary


def summary_line(summary: RunSummary) -> str:
    """The run's closing line: validation loss from its first step to its last, and where its files are."""
    start = f"{summary.first_val_loss:.4f}" if summary.first_val_loss is not None else "?"
    if summary.start_step > 0:
        start += f" (resumed at step {summary.start_step})"
    end = f"{summary.last_val_loss:.4f}" if summary.last_val_loss is not None else "?"
    out_dir = Path(summary.out_dir)
    return (
        f"{summary.steps} steps | validation loss {start} -> {end} | {summary.tokens_per_s:.0f} tokens/s | "
        f"every rank's log in {out_dir / LOG_FILE}; metrics.csv, loss.png and checkpoints in {out_dir}"
    )


def run_training(config: Config, *, resume: str | None = None) -> RunSummary:
    """Train per `config` on this rank (under torchrun: every rank calls this)."""
    if config.task.kind == "image_classification":
        from plait.train.image_tasks import run_image_classification

        return run_image_classification(config, resume=resume)
    owns_group = not dist.is_initialized()  # under a test harness the caller owns it
    if resume is None and restart_count() > 0:
        resume = "auto"  # torchrun's elastic agent restarted the ranks: continue from the newest checkpoint
    try:
        with log_file(Path(config.train.out_dir) / LOG_FILE):
            run = Run(config, resume=resume)
            try:
                return run.run()
            except Exception as err:
                run.operations.explain(err, step=run.step)  # a fault ends the process here, in one line
                raise
            finally:
                run.engine.close()  # offload files go with the run
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
