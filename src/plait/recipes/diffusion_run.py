"""Training a diffusion recipe end to end on this rank: digits, plait.boost, EMA, held-out loss, samples.

`train_diffusion` is the loop `plait finetune` (recipe kind "diffusion") and
benchmarks/finetune_diffusion.py share; every rank calls it under the process group the launcher made.

    trained = train_diffusion(DiffusionConfig(), DiffusionTraining(steps=600), plan=plait.Plan(dp=-1, zero=2))
    denoiser = denoiser_from_state(trained.model_config, trained.ema.state_dict())  # every rank calls state_dict
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import plait
from plait.data.images import ImageSet, load_digits
from plait.data.loader import Batch
from plait.engine import Engine
from plait.recipes.data.diffusion import DiffusionLoader, heldout_batches
from plait.recipes.diffusion import DiffusionConfig, build_diffusion, noise_prediction
from plait.recipes.ema import EMA

HELDOUT_SEED = 12345  # the held-out problems' own draws, apart from any training seed


@dataclass(frozen=True)
class DiffusionTraining:
    """The run: optimisation, EMA, held-out evaluation and sampling."""

    steps: int = 600
    global_batch: int = 32
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.995
    ema_warmup: int = 10
    seed: int = 0
    heldout_images: int = 360  # the first test images, each with fixed noise and timestep
    heldout_batch: int = 40
    num_samples: int = 40
    sample_steps: int = 100
    log_every: int = 50

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


@dataclass
class TrainedDiffusion:
    engine: Engine
    ema: EMA
    model_config: DiffusionConfig
    losses: list[float] = field(default_factory=list)
    heldout: dict[str, float] = field(default_factory=dict)  # untrained, trained, ema: held-out denoising MSE


def check_digits(config: DiffusionConfig) -> None:
    """The packaged digits are one-channel images with ten classes; say so before any collective."""
    if config.in_channels != 1:
        raise ValueError(f"in_channels={config.in_channels}: the digits are grayscale; set in_channels=1")
    if config.class_conditional and config.num_classes != 10:
        raise ValueError(f"num_classes={config.num_classes}: the digits have 10 classes; set num_classes=10")


def rank_share(batches: list[Batch], *, dp_rank: int, dp_size: int) -> list[Batch]:
    """This dp rank's contiguous rows of every global batch (each must split evenly)."""
    shares = []
    for batch in batches:
        rows = next(iter(batch.values())).shape[0]
        if rows % dp_size:
            raise ValueError(
                f"a held-out batch of {rows} images does not split over dp={dp_size}; change heldout_batch"
            )
        per_rank = rows // dp_size
        shares.append({k: v[dp_rank * per_rank : (dp_rank + 1) * per_rank] for k, v in batch.items()})
    return shares


def heldout_loss(engine: Engine, batches: list[Batch], *, ema: EMA | None = None) -> float:
    """The mean denoising MSE over the held-out problems (this rank's share), with the EMA weights if given."""
    shares = rank_share(batches, dp_rank=engine.dp_rank, dp_size=engine.dp_size)
    if ema is None:
        return engine.evaluate(shares).item()
    with ema.applied():
        return engine.evaluate(shares).item()


def boost_diffusion(config: DiffusionConfig, training: DiffusionTraining, *, plan: plait.Plan) -> Engine:
    torch.manual_seed(training.seed)
    return plait.boost(
        build_diffusion(config),
        optimizer=lambda params: torch.optim.AdamW(
            params, lr=training.lr, weight_decay=training.weight_decay, eps=1e-6
        ),
        loss_fn=noise_prediction,
        plan=plan,
        lr_scheduler=lambda opt: plait.optim.warmup_cosine(opt, warmup=training.warmup, total=training.steps),
        max_grad_norm=training.max_grad_norm,
    )


def train_diffusion(
    config: DiffusionConfig,
    training: DiffusionTraining,
    *,
    plan: plait.Plan,
    log: Callable[[str], None] = print,
    digits: tuple[ImageSet, ImageSet] | None = None,
) -> TrainedDiffusion:
    """Train on the digits' training split; held-out loss on the test split before and after."""
    check_digits(config)
    train_set, test_set = digits or load_digits(size=config.image_size)
    engine = boost_diffusion(config, training, plan=plan)
    ema = EMA(engine, decay=training.ema_decay, warmup=training.ema_warmup)
    heldout = heldout_batches(
        test_set,
        batch_size=training.heldout_batch,
        seed=HELDOUT_SEED,
        num_train_timesteps=config.num_train_timesteps,
        limit=training.heldout_images,
    )
    result = TrainedDiffusion(engine=engine, ema=ema, model_config=config)
    result.heldout["untrained"] = heldout_loss(engine, heldout)
    loader = DiffusionLoader(
        train_set,
        global_batch=training.global_batch,
        dp_rank=engine.dp_rank,
        dp_size=engine.dp_size,
        seed=training.seed,
        num_train_timesteps=config.num_train_timesteps,
    )
    for step in range(1, training.steps + 1):
        result.losses.append(engine.train_step(loader.next_batch()).loss.item())
        ema.update()
        if step % training.log_every == 0 or step == training.steps:
            recent = result.losses[-training.log_every :]
            log(f"step {step}/{training.steps}  loss {sum(recent) / len(recent):.4f}")
    result.heldout["trained"] = heldout_loss(engine, heldout)
    result.heldout["ema"] = heldout_loss(engine, heldout, ema=ema)
    return result


def write_grid(images: torch.Tensor, path: str | Path, *, columns: int = 10, scale: int = 4) -> Path:
    """A PNG of images (n, 1 or 3, h, w) in [0, 1], `columns` a row, each enlarged `scale` times
    (nearest), with a 2-pixel gap between images."""
    from PIL import Image

    count, channels, height, width = images.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    big = F.interpolate(images.float(), scale_factor=scale, mode="nearest") if scale > 1 else images.float()
    gap, cell_h, cell_w = 2, height * scale, width * scale
    grid = torch.ones(channels, rows * (cell_h + gap) + gap, columns * (cell_w + gap) + gap)
    for index in range(count):
        row, col = divmod(index, columns)
        top, left = gap + row * (cell_h + gap), gap + col * (cell_w + gap)
        grid[:, top : top + cell_h, left : left + cell_w] = big[index]
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels[0].numpy() if channels == 1 else pixels.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
