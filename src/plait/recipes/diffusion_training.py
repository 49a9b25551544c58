"""The diffusion run's settings (DiffusionTraining) and how `plait finetune`'s [train] table maps onto them.

The optimizer, learning-rate schedule, clipping and non-finite policy are [train]'s, built by
plait.train.loop.engine_for as for `plait train` and every other recipe: `DiffusionTraining.train_config()`
is the TrainConfig it hands there. The [train] keys a from-scratch image run has no use for (it scores
held-out denoising before and after training and writes its denoisers once, at the end) are refused
before launch by `refuse_unread_train_keys`.

    training = DiffusionTraining(steps=300, optimizer="lamb", schedule="poly")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plait.config import TrainConfig
from plait.recipes.diffusion import DiffusionSection

# The fields DiffusionTraining shares with TrainConfig, under the same names and meanings.
SHARED_WITH_TRAIN = (
    "steps",
    "global_batch",
    "lr",
    "min_lr_ratio",
    "warmup",
    "optimizer",
    "momentum",
    "vector_lr_ratio",
    "schedule",
    "weight_decay",
    "beta2",
    "eps",
    "max_grad_norm",
    "seed",
    "log_every",
    "on_nonfinite",
)

_SCORED_ONCE = "it scores held-out denoising before and after training ([diffusion] heldout_images, heldout_batch)"
_WRITTEN_ONCE = "it writes its denoisers once, at the end (ema/, denoiser/ in train.out_dir)"
# [train] keys the diffusion recipe does not read -> why; a value other than [train]'s default is refused.
UNREAD_TRAIN_KEYS = {
    "eval_every": _SCORED_ONCE,
    "eval_batches": _SCORED_ONCE,
    "checkpoint_every": _WRITTEN_ONCE,
    "keep_checkpoints": _WRITTEN_ONCE,
    "async_checkpoints": _WRITTEN_ONCE,
    "checkpoint_every_s": _WRITTEN_ONCE,
    "hang_timeout_s": "its loop has no hang watchdog (a hung collective fails after train.collective_timeout_s)",
}


@dataclass(frozen=True)
class DiffusionTraining:
    """The run: optimisation ([train]'s fields, with this recipe's defaults), EMA, held-out evaluation
    and sampling."""

    steps: int = 600
    global_batch: int = 32
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.0
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    ema_decay: float = 0.995
    ema_warmup: int = 10
    seed: int = 0
    heldout_images: int = 360  # the first test images, each with fixed noise and timestep
    heldout_batch: int = 40
    num_samples: int = 40
    sample_steps: int = 100
    log_every: int = 50
    optimizer: str = "adamw"  # adamw | lamb | lars, as train.optimizer
    schedule: str = "cosine"  # after warmup: cosine | poly | lars, as train.schedule
    min_lr_ratio: float = 0.1
    beta2: float = 0.999  # Adam's/LAMB's second moment: diffusion's usual value ([train]'s default is 0.95)
    momentum: float = 0.9  # lars
    vector_lr_ratio: float = 1.0  # lars
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        positive = ("steps", "global_batch", "heldout_images", "heldout_batch", "sample_steps", "log_every")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"diffusion training {bad[0]}={getattr(self, bad[0])}: use a positive number")
        if not self.lr > 0 or self.warmup < 0 or self.num_samples < 0:
            raise ValueError(
                f"diffusion training lr={self.lr}, warmup={self.warmup}, num_samples={self.num_samples}: "
                "use lr > 0, warmup >= 0 and num_samples >= 0"
            )
        self.train_config()  # the optimizer and schedule settings, checked by TrainConfig's own rules

    def train_config(self) -> TrainConfig:
        """The [train] table plait.train.loop.engine_for builds this run's optimizer and schedule from."""
        return TrainConfig(**{name: getattr(self, name) for name in SHARED_WITH_TRAIN})


def training_from(section: DiffusionSection, train: TrainConfig) -> DiffusionTraining:
    """DiffusionTraining from the [diffusion] table and plait's [train] table (TrainConfig)."""
    return DiffusionTraining(
        **{name: getattr(train, name) for name in SHARED_WITH_TRAIN},
        ema_decay=section.ema_decay,
        ema_warmup=section.ema_warmup,
        heldout_images=section.heldout_images,
        heldout_batch=section.heldout_batch,
        num_samples=section.num_samples,
        sample_steps=section.sample_steps,
    )


def refuse_unread_train_keys(train: Any) -> None:
    """One line for a [train] key set away from its default that the diffusion recipe would not read."""
    defaults = TrainConfig()
    for name, why in UNREAD_TRAIN_KEYS.items():
        value = getattr(train, name)
        if value != getattr(defaults, name):
            raise ValueError(f"train.{name}={value} does not apply to the diffusion recipe: {why}; drop train.{name}")
