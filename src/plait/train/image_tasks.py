"""`plait train` for task.kind = "image_classification": a ViT or Swin preset on augmented digits.

The same engine, plans, optimizers, schedules, logs and checkpoints as the language-model loop
(plait.train.loop); what differs is the model (transformers' vision classes), the data
(plait.data.images: every augmentation drawn from (seed, global sample position), so any plan
sees the same samples), the loss (cross entropy per image) and the test metric (top-1 accuracy
over the whole fixed test split, shown as `top-1` in the metrics line and `val_acc` in metrics.csv).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from plait.checkpoint.io import checkpoint_name, prune_checkpoints
from plait.config import Config, Plan
from plait.data.images import Augment, ImageLoader, image_eval_batches, load_digits
from plait.distributed.launch import get_logger, init_distributed, is_main_rank, log_file
from plait.distributed.mesh import Mesh
from plait.engine import Engine, boost
from plait.models.vision import build_vision, is_vision_preset, vision_config, vision_preset_names
from plait.optim import lr_schedule
from plait.tasks.vision import image_classification, top1_accuracy
from plait.train.logs import DEFAULT_COLUMNS, MetricsLog, format_metrics_line, plot_loss_curve
from plait.train.optimizers import optimizer_from_config

LOG_FILE = "train.log"
NUM_CHANNELS, NUM_CLASSES = 1, 10  # the digits: grey, ten classes
EVAL_IMAGES_PER_BATCH = 120  # the 360 test images in three batches (rounded to whole shares of dp)


def eval_batch_size(dp: int) -> int:
    return dp * max(1, EVAL_IMAGES_PER_BATCH // dp)


def validate_vision(config: Config, *, plan: Plan) -> Any:
    """Check the vision run before any process group exists; returns the model's transformers config."""
    preset = config.model.preset
    if not is_vision_preset(preset):
        raise ValueError(
            f"task.kind='image_classification' needs a vision preset, got model.preset={preset!r}; choose one "
            f"of {', '.join(vision_preset_names())}"
        )
    hf_config = vision_config(
        preset, image_size=config.task.image_size, num_channels=NUM_CHANNELS, num_labels=NUM_CLASSES,
        **config.model.overrides,
    )  # fmt: skip
    with torch.device("meta"):
        model = build_vision(
            preset, image_size=config.task.image_size, num_channels=NUM_CHANNELS, num_labels=NUM_CLASSES,
            **config.model.overrides,
        )  # fmt: skip
    if plan.sequence_parallel:
        raise ValueError("plan.sequence_parallel with image classification is not available yet; set it to false")
    if plan.tp > 1:
        from plait.tensor.hf import check_tp

        check_tp(model, plan.tp)
    if plan.pp > 1:
        _check_pipeline(model, plan=plan, num_layers=hf_config.num_hidden_layers)
    image_eval_batches(load_digits(size=8)[1], batch_size=eval_batch_size(plan.dp), dp_rank=0, dp_size=plan.dp)
    return hf_config


def _check_pipeline(model: torch.nn.Module, *, plan: Plan, num_layers: int) -> None:
    from plait.pipeline.partition import decoder_layout

    decoder_layout(model)  # refuses Swin with the reason
    stages = plan.pp * plan.pp_chunks
    if plan.pp_split:  # may leave the end stages layer-less (embedding / head alone)
        from plait.train.setup import check_pp_split

        check_pp_split(plan, num_layers=num_layers)
    elif stages > num_layers:
        raise ValueError(
            f"plan.pp={plan.pp} x plan.pp_chunks={plan.pp_chunks} = {stages} stages but the model has {num_layers} "
            f"layers; use at most {num_layers} stages"
        )


@dataclass
class VisionSummary:
    steps: int
    out_dir: str
    losses: list[float]
    accuracies: list[float] = field(default_factory=list)  # test top-1 at every evaluation, the first at step 0
    seconds: float = 0.0
    stopped_by: str | None = None


class VisionRun:
    """One image-classification run on this rank."""

    def __init__(self, config: Config, *, plan: Plan) -> None:
        self.config, train, task = config, config.train, config.task
        device = init_distributed(timeout_s=train.collective_timeout_s)
        torch.set_num_threads(train.threads)
        self.log = get_logger()
        self.mesh = Mesh(plan, device_type=device.type)
        torch.manual_seed(train.seed)
        model = build_vision(
            config.model.preset, image_size=task.image_size, num_channels=NUM_CHANNELS, num_labels=NUM_CLASSES,
            **config.model.overrides,
        ).to(device)  # fmt: skip
        num_params = sum(p.numel() for p in model.parameters())
        self.engine = self._engine(model)
        train_set, test_set = load_digits(size=task.image_size)
        dp_rank, dp_size = self.mesh.rank("dp"), self.mesh.size("dp")
        augment = Augment(max_shift=task.max_shift, max_degrees=task.max_degrees)
        self.loader = ImageLoader(
            train_set, global_batch=train.global_batch, dp_rank=dp_rank, dp_size=dp_size, seed=train.seed,
            augment=augment,
        )  # fmt: skip
        self.test_batches = image_eval_batches(
            test_set, batch_size=eval_batch_size(dp_size), dp_rank=dp_rank, dp_size=dp_size
        )
        self.out_dir = Path(train.out_dir)
        columns = (*DEFAULT_COLUMNS, "val_acc", "images_per_s")
        self.metrics_log = MetricsLog(self.out_dir, enabled=is_main_rank(), columns=columns)
        self.summary = VisionSummary(steps=0, out_dir=str(self.out_dir), losses=[])
        self.log.info(
            f"{self.mesh} | {config.model.preset} {num_params / 1e6:.2f}M params | digits {len(train_set)} train / "
            f"{len(test_set)} test images at {task.image_size}x{task.image_size}"
        )

    def _engine(self, model: torch.nn.Module) -> Engine:
        train = self.config.train
        return boost(
            model,
            optimizer=optimizer_from_config(train),
            loss_fn=image_classification,
            mesh=self.mesh,
            lr_scheduler=lambda opt: lr_schedule(
                opt, name=train.schedule, warmup=train.warmup, total=train.steps, min_ratio=train.min_lr_ratio
            ),
            max_grad_norm=train.max_grad_norm,
            on_nonfinite=train.on_nonfinite,
        )

    def evaluate(self) -> dict[str, float]:
        """Cross entropy and top-1 accuracy over the whole test split (every rank its share)."""
        accuracy = self.engine.evaluate(self.test_batches, metric=top1_accuracy).item()
        self.summary.accuracies.append(accuracy)
        return {"val_loss": self.engine.evaluate(self.test_batches).item(), "val_acc": accuracy}

    def train_one_step(self) -> dict[str, float]:
        batch = self.loader.next_batch()
        start = time.perf_counter()
        result = self.engine.train_step(batch)
        loss = result.loss.item()
        seconds = time.perf_counter() - start
        self.summary.losses.append(loss)
        return {
            "loss": loss,
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm.item(),
            "step_s": seconds,
            "images_per_s": self.config.train.global_batch / seconds,
        }

    def save(self, step: int) -> None:
        path = self.out_dir / "checkpoints" / checkpoint_name(step)
        extra = {"step": step, "loader": self.loader.state_dict()}
        self.engine.save(path, extra=extra, config=self.config.to_dict())
        self.engine.wait_for_save()
        if is_main_rank():
            prune_checkpoints(path.parent, keep=self.config.train.keep_checkpoints)
            self.log.info(f"saved {path}")

    def run(self) -> VisionSummary:
        train, start = self.config.train, time.perf_counter()
        self.metrics_log.log(0, self.evaluate())
        for step in range(1, train.steps + 1):
            values: dict[str, Any] = self.train_one_step()
            last = step == train.steps
            if step % train.eval_every == 0 or last:
                values |= self.evaluate()
            if step % train.log_every == 0 or last:
                line = format_metrics_line(step, train.steps, values)
                self.log.info(line)
            self.metrics_log.log(step, values)
            if step % train.checkpoint_every == 0 or last:
                self.save(step)
            self.summary.steps = step
        self.summary.seconds = time.perf_counter() - start
        self.metrics_log.close()
        if is_main_rank():
            plot_loss_curve(self.metrics_log.csv_path, self.out_dir / "loss.png")
            self.log.info(f"done: {summary_line(self.summary)}")
        return self.summary


def summary_line(summary: VisionSummary) -> str:
    first, last = summary.accuracies[0], summary.accuracies[-1]
    return (
        f"{summary.steps} steps in {summary.seconds:.0f} s | test top-1 {100 * first:.1f}% -> {100 * last:.1f}% | "
        f"metrics.csv, loss.png and checkpoints in {summary.out_dir}"
    )


def run_image_classification(config: Config, *, resume: str | None = None) -> VisionSummary:
    """Train per `config` (task.kind = "image_classification") on this rank; under torchrun every rank calls it."""
    from plait.train.setup import launched_world_size, validate  # here: setup imports this module

    if resume is not None:
        raise ValueError(
            f"--resume {resume}: resuming an image-classification run is not available yet; start it afresh "
            "(a new train.out_dir)"
        )
    validated = validate(config, world_size=launched_world_size())  # before any collective
    owns_group = not dist.is_initialized()  # under a test harness the caller owns it
    try:
        with log_file(Path(config.train.out_dir) / LOG_FILE):
            run = VisionRun(config, plan=validated.plan)
            try:
                return run.run()
            finally:
                run.engine.close()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["VisionRun", "VisionSummary", "run_image_classification", "validate_vision"]
