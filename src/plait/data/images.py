"""An image set that ships with a package, augmented per global sample, and its data-parallel loader.

scikit-learn's 8x8 handwritten digits (1,797 real images, 10 classes), upsampled to `size` x `size`
and split once into fixed train and test sets. Augmentation (a random shift and a small rotation,
one affine warp) draws every random choice from (seed, global sample position), never from a
rank's generator: the loader walks the same global order as plait's token loader, so every plan
sees the same augmented samples and parity with one process holds.

    train, test = load_digits(size=32)
    loader = ImageLoader(train, global_batch=64, dp_rank=rank, dp_size=2, seed=0)
    batch = loader.next_batch()  # {"pixel_values": (32, 1, 32, 32), "labels": (32,)}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from plait.data.loader import Batch, ShardedLoader, rank_batch_size

NUM_DIGIT_CLASSES = 10
DIGITS_MEAN, DIGITS_STD = 0.3, 0.32  # about the upsampled digits' pixel statistics in [0, 1]


@dataclass(frozen=True)
class Augment:
    """Random affine per sample: shift by up to `max_shift` pixels and rotate by up to
    `max_degrees` either way; zeros (the background) fill what comes in from outside."""

    max_shift: float = 3.0
    max_degrees: float = 10.0

    def __post_init__(self) -> None:
        if self.max_shift < 0 or self.max_degrees < 0:
            raise ValueError(
                f"augmentation max_shift={self.max_shift}, max_degrees={self.max_degrees}: use non-negative "
                "values (0 switches that part off)"
            )

    @property
    def is_identity(self) -> bool:
        return self.max_shift == 0 and self.max_degrees == 0


class ImageSet:
    """Images (num, channels, size, size) in [0, 1] and int64 labels; `len` and `gather` as the
    token datasets have, so plait's loader can walk it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return self.images[index], self.labels[index]


def load_digits(*, size: int = 32, num_test: int = 360, split_seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's digits upsampled (bilinear) to size x size; the same fixed (train, test) split
    for a given split_seed (the test set takes `num_test` images of one seeded permutation)."""
    from sklearn.datasets import load_digits as sklearn_digits  # here: only vision runs need scikit-learn

    if size < 8:
        raise ValueError(f"image size {size}: the digits are 8x8; use 8 or more (e.g. 32)")
    digits = sklearn_digits()
    if not 0 < num_test < len(digits.target):
        raise ValueError(f"num_test={num_test}: keep between 1 and {len(digits.target) - 1} images for testing")
    pixels = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (num, 1, 8, 8) in [0, 1]
    if size != 8:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(split_seed).permutation(len(labels)))
    test, train = order[:num_test], order[num_test:]
    return (
        ImageSet(pixels[train], labels[train], num_classes=NUM_DIGIT_CLASSES),
        ImageSet(pixels[test], labels[test], num_classes=NUM_DIGIT_CLASSES),
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - DIGITS_MEAN) / DIGITS_STD


def _affine(augment: Augment, *, seed: int, position: int, size: int) -> torch.Tensor:
    """The (2, 3) warp of the sample at global `position`, drawn from (seed, position) alone."""
    shift_x, shift_y, degrees = np.random.default_rng([seed, position]).uniform(-1.0, 1.0, size=3)
    angle = math.radians(degrees * augment.max_degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    scale = 2.0 / size  # pixels -> affine_grid's [-1, 1] coordinates
    tx, ty = shift_x * augment.max_shift * scale, shift_y * augment.max_shift * scale
    return torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)


def augment_images(images: torch.Tensor, positions: np.ndarray, *, augment: Augment, seed: int) -> torch.Tensor:
    """Each image warped by the affine of its global position. One sample at a time, so a sample's
    pixels never depend on which others share its batch (bitwise the same under any dp split)."""
    if augment.is_identity:
        return images
    out = torch.empty_like(images)
    for row, position in enumerate(positions.tolist()):
        theta = _affine(augment, seed=seed, position=position, size=images.shape[-1])[None]
        image = images[row : row + 1]
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        out[row] = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return out


class ImageLoader(ShardedLoader):
    """This dp rank's share of each step's global batch of augmented images, in the one global order
    of plait's loader (epoch permutations seeded by (seed, epoch), a global offset; resumable)."""

    def __init__(
        self, dataset: ImageSet, *, global_batch: int, dp_rank: int, dp_size: int, seed: int, augment: Augment
    ) -> None:
        super().__init__(dataset, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed)  # type: ignore[arg-type]
        self.augment = augment

    def next_batch(self) -> Batch:
        start = self.offset + self.dp_rank * self.per_rank
        images, labels = self.dataset.gather(self.global_indices(start, self.per_rank))
        positions = np.arange(start, start + self.per_rank)  # global stream positions: fresh warps every epoch
        images = augment_images(images, positions, augment=self.augment, seed=self.seed)
        self.offset += self.global_batch
        return {"pixel_values": normalize(images), "labels": labels}


def image_eval_batches(dataset: ImageSet, *, batch_size: int, dp_rank: int, dp_size: int) -> list[Batch]:
    """This rank's share of the whole test set, in order, un-augmented: batches of `batch_size`
    (global) and a last smaller one; every batch must split evenly over the dp ranks."""
    rank_batch_size(batch_size, dp_rank=dp_rank, dp_size=dp_size)
    batches = []
    for start in range(0, len(dataset), batch_size):
        count = min(batch_size, len(dataset) - start)
        if count % dp_size:
            raise ValueError(
                f"the test set's last batch holds {count} images, which dp={dp_size} ranks cannot split evenly; "
                f"choose an eval batch size that leaves a multiple of {dp_size} (the test set has {len(dataset)})"
            )
        share = count // dp_size
        first = start + dp_rank * share
        images, labels = dataset.gather(np.arange(first, first + share))
        batches.append({"pixel_values": normalize(images), "labels": labels})
    return batches
