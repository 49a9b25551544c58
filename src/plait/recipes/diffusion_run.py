"""Training a diffusion recipe end to end on this rank: digits, plait.boost, EMA, held-out loss, samples.

`train_diffusion` is the loop `plait finetune` (recipe kind "diffusion") and
benchmarks/finetune_diffusion.py share; every rank calls it under the process group the launcher made.

    trained = train_diffusion(DiffusionConfig(), DiffusionTraining(steps=600), plan=plait.Plan(dp=-1, zero=2))
    denoiser = denoiser_from_state(trained.model_config, trained.ema.state_dict())  # every rank calls state_dict
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import plait
from plait.data.images import ImageSet, load_digits
from plait.data.loader import Batch
from plait.distributed.launch import get_logger, init_distributed, is_main_rank, join_launched_group
from plait.distributed.mesh import Mesh
from plait.engine import Engine
from plait.recipes.data.diffusion import DiffusionLoader, heldout_batches
from plait.recipes.diffusion import (
    DiffusionConfig,
    build_diffusion,
    denoiser_from_state,
    noise_prediction,
    sample,
)
from plait.recipes.diffusion_training import DiffusionTraining, refuse_unread_train_keys, training_from
from plait.recipes.ema import EMA
from plait.train.loop import engine_for
from plait.train.setup import launched_world_size

HELDOUT_SEED = 12345  # the held-out problems' own draws, apart from any training seed


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
    """The denoiser under `plan` with [train]'s optimizer, schedule, clipping and non-finite policy, built
    by plait.train.loop.engine_for as for `plait train` and the other recipes."""
    check_plan(plan, config=config)  # before the mesh's first collective
    torch.manual_seed(training.seed)
    model = build_diffusion(config)
    return engine_for(training.train_config(), model, loss_fn=noise_prediction, mesh=host_mesh(plan))


def host_mesh(plan: plait.Plan) -> Mesh:
    """The plan's mesh on the host (gloo), as plait.boost makes one: diffusers' denoisers train on the CPU
    here, and a rank torchrun started joins its group."""
    plan.check_available()
    join_launched_group("cpu")
    return Mesh(plan, device_type="cpu")


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


def check_plan(plan: plait.Plan, *, config: DiffusionConfig) -> None:
    """The recipe runs under dp and ZeRO 0-3 (the DiT under 0-2); diffusers' denoisers have no tp/pp/cp/ep
    plan in plait."""
    for axis in ("tp", "pp", "cp", "ep"):
        if getattr(plan, axis) != 1:
            raise ValueError(
                f"plan.{axis}={getattr(plan, axis)}: the diffusion recipe runs under dp and ZeRO 0-3 "
                f"(plait has no {axis} plan for diffusers' UNet/DiT); set plan.{axis}=1"
            )
    if config.model_type == "dit" and plan.zero == 3:  # ZeRO-3 gathers a block's weights for its own forward only
        raise ValueError(
            "plan.zero=3 with model_type='dit' is not available: diffusers' DiT calls its first block's "
            "embedding from outside that block; use plan.zero<=2 or model_type='unet'"
        )


def preflight(config: Any, *, world_size: int) -> None:
    """`plait finetune`'s checks for this recipe, before any collective: the [diffusion] table against the
    digits, the plan (dp and ZeRO only), the [train] keys it does not read and the batch. No base model,
    tokenizer or text is read."""
    from plait.recipes.loop import checked_plan

    model_config = config.section("diffusion").model_config()
    check_digits(model_config)
    check_plan(config.plan, config=model_config)
    refuse_unread_train_keys(config.train)
    checked_plan(config, world_size=world_size)


def run(config: Any) -> dict[str, Any]:
    """`plait finetune` with recipe.kind="diffusion" (every rank): train on the digits from scratch
    ([base] is not read), then on rank 0 write train.out_dir/samples.png (EMA weights), the EMA and
    the trained denoisers in diffusers' format (ema/, denoiser/) and diffusion.json."""
    preflight(config, world_size=launched_world_size())
    init_distributed(device_type="cpu", timeout_s=config.train.collective_timeout_s)  # launched: join the group
    torch.set_num_threads(config.train.threads)
    section = config.section("diffusion")
    model_config = section.model_config()
    training = training_from(section, config.train)
    logger = get_logger()
    log = logger.info if is_main_rank() else _quiet
    trained = train_diffusion(model_config, training, plan=config.plan, log=log)
    states = {"ema": trained.ema.state_dict(), "denoiser": trained.engine.model_state_dict()}  # every rank
    summary = {"heldout_mse": trained.heldout, "final_loss": trained.losses[-1], "steps": training.steps}
    if is_main_rank():
        _write_outputs(Path(config.train.out_dir), model_config, training, states=states, summary=summary)
        logger.info(
            f"held-out denoising MSE: untrained {trained.heldout['untrained']:.4f}, trained "
            f"{trained.heldout['trained']:.4f}, EMA {trained.heldout['ema']:.4f}; wrote {config.train.out_dir}"
        )
    return summary


def _quiet(_line: str) -> None:
    pass


def _write_outputs(
    out_dir: Path,
    config: DiffusionConfig,
    training: DiffusionTraining,
    *,
    states: dict[str, dict[str, torch.Tensor]],
    summary: dict[str, Any],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        denoiser_from_state(config, state).save_pretrained(out_dir / name)
    if training.num_samples:
        labels = torch.arange(training.num_samples) % max(1, config.num_classes)
        ema = denoiser_from_state(config, states["ema"])
        images = sample(ema, config, labels=labels, seed=training.seed, num_inference_steps=training.sample_steps)
        summary["samples_png"] = str(write_grid(images, out_dir / "samples.png"))
    (out_dir / "diffusion.json").write_text(json.dumps(summary, indent=2) + "\n")
