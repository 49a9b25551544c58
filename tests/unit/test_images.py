"""The digits image set: fixed split, augmentation drawn from (seed, global position), dp-independent batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.data.images import Augment, ImageLoader, augment_images, image_eval_batches, load_digits

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def digits():
    return load_digits(size=16)


def test_split_is_fixed_disjoint_and_whole(digits) -> None:
    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    assert train.image_shape == (1, 16, 16)
    again_train, _ = load_digits(size=16)
    assert torch.equal(again_train.images, train.images) and torch.equal(again_train.labels, train.labels)
    as_rows = {tuple(row.tolist()) for row in train.images.flatten(1)}
    assert not any(tuple(row.tolist()) in as_rows for row in test.images.flatten(1))  # no test image in train
    assert set(test.labels.tolist()) == set(range(10))


def _stream(train, *, dp_size: int, steps: int, global_batch: int = 24) -> list[dict[str, torch.Tensor]]:
    """The global batches of `steps` steps, each rank's shares concatenated in rank order."""
    loaders = [
        ImageLoader(train, global_batch=global_batch, dp_rank=r, dp_size=dp_size, seed=3, augment=Augment())
        for r in range(dp_size)
    ]
    out = []
    for _ in range(steps):
        shares = [loader.next_batch() for loader in loaders]
        out.append({key: torch.cat([share[key] for share in shares]) for key in shares[0]})
    return out


def test_every_dp_split_sees_the_same_augmented_samples(digits) -> None:
    train, _ = digits
    steps = 62  # past one epoch (1437 / 24 = 59.9 steps): the second epoch's order and warps too
    one = _stream(train, dp_size=1, steps=steps)
    for dp_size in (2, 4):
        split = _stream(train, dp_size=dp_size, steps=steps)
        for a, b in zip(one, split, strict=True):
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def test_augmentation_depends_on_seed_and_position_only(digits) -> None:
    train, _ = digits
    image = train.images[:1].expand(3, -1, -1, -1)
    warped = augment_images(image, np.array([5, 5, 6]), augment=Augment(), seed=0)
    assert torch.equal(warped[0], warped[1])  # same (seed, position): same warp
    assert not torch.equal(warped[0], warped[2])  # another position: another warp
    assert not torch.equal(warped[0], train.images[0])
    other_seed = augment_images(image[:1], np.array([5]), augment=Augment(), seed=1)
    assert not torch.equal(other_seed[0], warped[0])
    assert torch.equal(augment_images(image, np.array([1, 2, 3]), augment=Augment(0, 0), seed=0), image)
    # a warp moves pixels, it does not invent ink: the total stays close
    assert warped[0].sum() == pytest.approx(train.images[0].sum().item(), rel=0.2)


def test_the_same_sample_is_warped_differently_in_another_epoch(digits) -> None:
    train, _ = digits
    loader = ImageLoader(train, global_batch=len(train), dp_rank=0, dp_size=1, seed=0, augment=Augment())
    first, second = loader.next_batch(), loader.next_batch()
    index = int(np.flatnonzero(loader.epoch_order(0) == 0)[0]), int(np.flatnonzero(loader.epoch_order(1) == 0)[0])
    assert first["labels"][index[0]] == second["labels"][index[1]]
    assert not torch.equal(first["pixel_values"][index[0]], second["pixel_values"][index[1]])


def test_resume_continues_the_stream(digits) -> None:
    train, _ = digits
    loader = ImageLoader(train, global_batch=24, dp_rank=0, dp_size=1, seed=3, augment=Augment())
    loader.next_batch()
    state = loader.state_dict()
    expected = loader.next_batch()
    resumed = ImageLoader(train, global_batch=24, dp_rank=1, dp_size=2, seed=3, augment=Augment())
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()["pixel_values"], expected["pixel_values"][12:])


def test_eval_batches_cover_the_test_set_once_under_dp(digits) -> None:
    _, test = digits
    whole = image_eval_batches(test, batch_size=100, dp_rank=0, dp_size=1)
    assert [len(b["labels"]) for b in whole] == [100, 100, 100, 60]
    shares = [image_eval_batches(test, batch_size=100, dp_rank=r, dp_size=4) for r in range(4)]
    labels = torch.cat([torch.cat([rank[i]["labels"] for rank in shares]) for i in range(4)])
    assert torch.equal(labels, test.labels)
    with pytest.raises(ValueError, match="cannot split evenly"):
        image_eval_batches(test, batch_size=32, dp_rank=0, dp_size=16)  # 360 = 11 x 32 + 8


def test_bad_augmentation_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        Augment(max_shift=-1)
