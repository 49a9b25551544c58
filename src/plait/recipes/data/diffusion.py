"""Digits for diffusion training: clean images in [-1, 1] with the noise and timestep each sample gets.

Every random draw of a sample (its augmentation, its Gaussian noise, its diffusion timestep) comes
from (seed, the sample's global stream position) alone, never from a rank's generator. The position
counts samples since training began, so it names both the sample and the step: the same sample in
a later epoch gets fresh noise, and dp=N sees exactly what one process sees.

    train, _ = load_digits(size=16)
    loader = DiffusionLoader(train, global_batch=32, dp_rank=rank, dp_size=2, seed=0, num_train_timesteps=1000)
    batch = loader.next_batch()  # pixel_values, noise (16, 1, 16, 16); timesteps, labels (16,)
"""

from __future__ import annotations

import numpy as np
import torch

from plait.data.images import Augment, ImageLoader, ImageSet, augment_images
from plait.data.loader import Batch

NOISE_STREAM = 1  # the draws' own stream: (seed, position) alone is the augmentation's (plait.data.images)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [-1, 1], the range DDPM's schedule (and its sample clipping) assumes."""
    return images * 2.0 - 1.0


def to_pixel_range(samples: torch.Tensor) -> torch.Tensor:
    return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)


def sample_noise(
    positions: np.ndarray, shape: tuple[int, ...], *, seed: int, num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (n, *shape) float32, timesteps (n,) int64) for the samples at global `positions`: each
    row drawn from its own generator seeded by (seed, stream, position), so a row never depends on
    which rank draws it or which rows share its batch."""
    noise = torch.empty((len(positions), *shape), dtype=torch.float32)
    timesteps = torch.empty(len(positions), dtype=torch.int64)
    for row, position in enumerate(np.asarray(positions).tolist()):
        rng = np.random.default_rng([seed, NOISE_STREAM, position])
        timesteps[row] = int(rng.integers(0, num_train_timesteps))
        noise[row] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    return noise, timesteps


def diffusion_batch(
    images: torch.Tensor, labels: torch.Tensor, positions: np.ndarray, *, seed: int, num_train_timesteps: int
) -> Batch:
    """The model's batch for clean [0, 1] `images` at global `positions`."""
    noise, timesteps = sample_noise(
        positions, tuple(images.shape[1:]), seed=seed, num_train_timesteps=num_train_timesteps
    )
    return {"pixel_values": to_model_range(images), "noise": noise, "timesteps": timesteps, "labels": labels}


class DiffusionLoader(ImageLoader):
    """This dp rank's share of each step's global batch, in the global order of plait's loader
    (resumable under any dp size), each sample with its own noise and timestep."""

    def __init__(
        self,
        dataset: ImageSet,
        *,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_train_timesteps: int,
        augment: Augment | None = None,
    ) -> None:
        augment = augment or Augment(max_shift=0.0, max_degrees=0.0)
        super().__init__(
            dataset, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed, augment=augment
        )
        self.num_train_timesteps = num_train_timesteps

    def next_batch(self) -> Batch:
        start = self.offset + self.dp_rank * self.per_rank
        images, labels = self.dataset.gather(self.global_indices(start, self.per_rank))
        positions = np.arange(start, start + self.per_rank)
        images = augment_images(images, positions, augment=self.augment, seed=self.seed)
        self.offset += self.global_batch
        return diffusion_batch(images, labels, positions, seed=self.seed, num_train_timesteps=self.num_train_timesteps)


def heldout_batches(
    dataset: ImageSet, *, batch_size: int, seed: int, num_train_timesteps: int, limit: int | None = None
) -> list[Batch]:
    """The test set un-augmented, in order, with fixed noise and timesteps (drawn from `seed` and each
    image's index): the held-out denoising loss compares models on exactly the same problems."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    batches = []
    for start in range(0, count, batch_size):
        positions = np.arange(start, min(start + batch_size, count))
        images, labels = dataset.gather(positions)
        batches.append(diffusion_batch(images, labels, positions, seed=seed, num_train_timesteps=num_train_timesteps))
    return batches
