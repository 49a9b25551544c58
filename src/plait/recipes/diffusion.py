"""Diffusion training through diffusers: a tiny UNet (or DiT) trained from scratch to predict noise.

The recipe is a model wrapper and a loss in plait's contract, so `plait.boost` trains it under any
data-parallel plan (dp, ZeRO 1-3). The wrapper holds the denoiser and the DDPM noise schedule: its
forward noises the clean images with the batch's own noise at the batch's timesteps (both drawn per
global sample by plait.recipes.data.diffusion) and returns the predicted noise; the loss is the
epsilon-prediction MSE over every pixel of the global batch. Class-conditional by default (the
digit's label is the class embedding's input); `class_conditional=False` trains unconditionally.

    config = DiffusionConfig(image_size=16)
    engine = plait.boost(build_diffusion(config), optimizer=..., loss_fn=noise_prediction, plan=plan)
    ...  # engine.train_step(batch) for batches of plait.recipes.data.diffusion.DiffusionLoader
    denoiser = denoiser_from_state(config, engine.model_state_dict())  # every rank: ZeRO-3 gathers
    images = sample(denoiser, config, labels=torch.arange(10), seed=0)  # (10, 1, 16, 16) in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from plait.recipes.data.diffusion import to_pixel_range

MODEL_TYPES = ("unet", "dit")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class DiffusionConfig:
    """The denoiser and the noise schedule. `channels`: the UNet's width per resolution (each level
    halves the image), or the DiT's width as (heads x head_dim,) with `patch_size`."""

    model_type: str = "unet"
    image_size: int = 16
    in_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1  # UNet: resnet blocks per level; DiT: transformer blocks
    norm_groups: int = 8
    attention: bool = False  # UNet: self-attention at the lowest resolution and in the middle block
    class_conditional: bool = True
    num_classes: int = 10
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    patch_size: int = 2  # DiT only
    num_heads: int = 2  # DiT only

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", [int(c) for c in self.channels])
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"diffusion model type {self.model_type!r} is unknown; choose one of {', '.join(MODEL_TYPES)}"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r}: choose one of {', '.join(BETA_SCHEDULES)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps}: use at least 2 (e.g. 1000)")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels={self.channels}: give one positive width per UNet level, e.g. [32, 64]")
        if self.class_conditional and self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes}: a class-conditional model needs at least one class")
        self._check_shape()

    def _check_shape(self) -> None:
        if self.model_type == "dit":
            width = self.channels[0]
            if self.image_size % self.patch_size or width % self.num_heads:
                raise ValueError(
                    f"DiT with image_size={self.image_size}, patch_size={self.patch_size}, width {width}, "
                    f"{self.num_heads} heads: the patch size must divide the image size and the heads the width"
                )
            if not self.class_conditional:
                raise ValueError(
                    "diffusers' DiT is class-conditional only: set class_conditional=true or model_type='unet'"
                )
            return
        factor = 2 ** (len(self.channels) - 1)  # each level but the last halves the image
        if self.image_size < 8 or self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} cannot pass a UNet of {len(self.channels)} levels, which halves it "
                f"{len(self.channels) - 1} times: use a multiple of {factor} (8 or more), or fewer channels entries"
            )
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"channels={self.channels} must each be a multiple of norm_groups={self.norm_groups}")


@dataclass(frozen=True)
class DiffusionSection(DiffusionConfig):
    """The [diffusion] table of `plait finetune`: the model's fields and the run's EMA, held-out and
    sampling settings (plait.recipes.diffusion_training.DiffusionTraining takes them with [train]'s)."""

    ema_decay: float = 0.995
    ema_warmup: int = 10
    heldout_images: int = 360
    heldout_batch: int = 40
    num_samples: int = 40
    sample_steps: int = 100

    def model_config(self) -> DiffusionConfig:
        return DiffusionConfig(**{f.name: getattr(self, f.name) for f in fields(DiffusionConfig)})


def build_denoiser(config: DiffusionConfig) -> nn.Module:
    """A freshly initialised diffusers denoiser (UNet2DModel or DiTTransformer2DModel)."""
    import diffusers  # here: only diffusion recipes need diffusers

    if config.model_type == "dit":
        width = config.channels[0]
        return _without_label_dropout(
            diffusers.DiTTransformer2DModel(
                num_attention_heads=config.num_heads,
                attention_head_dim=width // config.num_heads,
                in_channels=config.in_channels,
                num_layers=config.layers_per_block,
                patch_size=config.patch_size,
                sample_size=config.image_size,
                num_embeds_ada_norm=config.num_classes,
                norm_num_groups=config.norm_groups,
            )
        )
    levels = len(config.channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if config.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return diffusers.UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        block_out_channels=tuple(config.channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=config.norm_groups,
        add_attention=config.attention,
        num_class_embeds=config.num_classes if config.class_conditional else None,
    )


def _without_label_dropout(denoiser: nn.Module) -> nn.Module:
    """DiT's label embedding drops 10% of labels in training (for classifier-free guidance) with the rank's
    own generator, which no dp split can reproduce; the recipe samples without guidance: switch it off."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in denoiser.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return denoiser


def build_scheduler(config: DiffusionConfig) -> Any:
    """The DDPM noise schedule (epsilon prediction) training and sampling share."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule, prediction_type="epsilon"
    )


class DiffusionModel(nn.Module):
    """The denoiser with its noise schedule: forward(clean images, noise, timesteps, labels) -> the
    predicted noise (batch, channels, h, w). Noising happens here, so each micro-batch carries its
    samples' own noise and the engine needs nothing diffusion-specific."""

    def __init__(self, denoiser: nn.Module, *, config: DiffusionConfig) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.config = config
        self.scheduler = build_scheduler(config)

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        noisy = self.scheduler.add_noise(pixel_values, noise, timesteps)
        return predict_noise(self.denoiser, noisy, timesteps, labels=labels, config=self.config)


def predict_noise(
    denoiser: nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    config: DiffusionConfig,
) -> torch.Tensor:
    class_labels = labels if config.class_conditional else None
    return denoiser(noisy, timesteps, class_labels=class_labels).sample


def build_diffusion(config: DiffusionConfig) -> DiffusionModel:
    return DiffusionModel(build_denoiser(config), config=config)


class NoisePrediction:
    """Epsilon-prediction MSE as (squared-error sum, pixel count): the step's loss is the mean over every
    pixel of the global batch, as one process computes it. `count_tokens` gives the engine that count
    before any forward. It does not read `labels` itself: the model's forward gets them."""

    reads_labels = False

    def __call__(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        error = outputs.float() - batch["noise"].float()
        return error.square().sum(), self.count_tokens(batch)

    @staticmethod
    def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        noise = batch["noise"]
        return torch.tensor(noise.numel(), device=noise.device)


noise_prediction = NoisePrediction()


@torch.no_grad()
def sample(
    denoiser: nn.Module,
    config: DiffusionConfig,
    *,
    labels: torch.Tensor,
    seed: int,
    num_inference_steps: int = 100,
) -> torch.Tensor:
    """Images (len(labels), channels, size, size) in [0, 1], denoised from seeded Gaussian noise by
    DDPM's ancestral sampler over `num_inference_steps` (labels are ignored when unconditional)."""
    device = next(denoiser.parameters()).device
    scheduler = build_scheduler(config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (len(labels), config.in_channels, config.image_size, config.image_size)
    images = torch.randn(shape, generator=generator, device=device)
    labels = labels.to(device)
    was_training = denoiser.training
    denoiser.eval()
    for timestep in scheduler.timesteps:
        steps = torch.full((len(labels),), int(timestep), device=device, dtype=torch.int64)
        noise = predict_noise(denoiser, images, steps, labels=labels, config=config)
        images = scheduler.step(noise, timestep, images, generator=generator).prev_sample
    denoiser.train(was_training)
    return to_pixel_range(images)


def denoiser_from_state(config: DiffusionConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh denoiser holding `state` (a DiffusionModel's state dict, e.g. EMA weights from
    plait.recipes.ema.EMA.state_dict()), for sampling or `save_pretrained`."""
    prefix = "denoiser."
    denoiser = build_denoiser(config)
    denoiser.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return denoiser
