"""The diffusion recipe's pieces in one process: per-sample noise, the EMA, config refusals, sampling, the PNG grid."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import plait
from plait.data.images import load_digits
from plait.recipes.data.diffusion import DiffusionLoader, heldout_batches, sample_noise
from plait.recipes.diffusion import DiffusionConfig, build_diffusion, noise_prediction, sample
from plait.recipes.diffusion_run import DiffusionTraining, check_digits, write_grid
from plait.recipes.ema import EMA, ema_decay

TINY = DiffusionConfig(image_size=8, channels=(8, 16), norm_groups=4, num_train_timesteps=50)


@functools.cache
def digits():
    return load_digits(size=8)[0]


def loader(dp_rank: int, dp_size: int) -> DiffusionLoader:
    return DiffusionLoader(digits(), global_batch=8, dp_rank=dp_rank, dp_size=dp_size, seed=3, num_train_timesteps=50)


def test_each_sample_draws_the_same_noise_under_any_dp_split() -> None:
    whole = loader(0, 1)
    halves = [loader(0, 2), loader(1, 2)]
    for _ in range(2):
        expected = whole.next_batch()
        parts = [half.next_batch() for half in halves]
        for key, value in expected.items():
            assert torch.equal(torch.cat([part[key] for part in parts]), value), key
    assert expected["timesteps"].min() >= 0 and expected["timesteps"].max() < 50


def test_noise_depends_on_position_and_seed_only() -> None:
    noise, steps = sample_noise(np.array([5, 6]), (1, 4, 4), seed=0, num_train_timesteps=1000)
    again, again_steps = sample_noise(np.array([6]), (1, 4, 4), seed=0, num_train_timesteps=1000)
    assert torch.equal(noise[1], again[0]) and steps[1] == again_steps[0]
    assert not torch.equal(noise[0], noise[1])  # the next step's samples sit at later positions: fresh noise
    other, _ = sample_noise(np.array([6]), (1, 4, 4), seed=1, num_train_timesteps=1000)
    assert not torch.equal(other[0], again[0])


def test_heldout_problems_are_fixed() -> None:
    first = heldout_batches(digits(), batch_size=16, seed=7, num_train_timesteps=50, limit=40)
    second = heldout_batches(digits(), batch_size=16, seed=7, num_train_timesteps=50, limit=40)
    assert [len(b["noise"]) for b in first] == [16, 16, 8]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second, strict=True) for k in a)
    assert first[0]["pixel_values"].min() >= -1 and first[0]["pixel_values"].max() <= 1


def test_ema_decay_warms_up_then_holds() -> None:
    assert ema_decay(0, decay=0.999, warmup=10) == pytest.approx(0.1)
    assert ema_decay(10_000, decay=0.999, warmup=10) == 0.999
    assert ema_decay(0, decay=0.9, warmup=0) == 0.9


class Regressor(nn.Sequential):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # y: the loss's target
        return super().forward(x)


@pytest.mark.parametrize("zero", [0, 1])
def test_ema_averages_the_stepped_weights_and_restores_them(zero: int) -> None:
    torch.manual_seed(0)
    engine = plait.boost(
        Regressor(nn.Linear(4, 3), nn.Linear(3, 1)),
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
        loss_fn=lambda out, batch: (out - batch["y"]).square().mean(),
        plan=plait.Plan(zero=zero),
    )
    ema = EMA(engine, decay=0.5, warmup=0)
    expected = {name: value.clone() for name, value in engine.model_state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        engine.train_step({"x": torch.randn(4, 4, generator=gen), "y": torch.randn(4, 1, generator=gen)})
        ema.update()
        for name, value in engine.model_state_dict().items():
            expected[name] = 0.5 * expected[name] + 0.5 * value
    trained = engine.model_state_dict()
    averaged = ema.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value)
        assert not torch.equal(averaged[name], trained[name])
    for name, value in engine.model_state_dict().items():  # the trained weights are back
        assert torch.equal(value, trained[name])


def test_ema_refuses_bad_decay() -> None:
    engine = plait.boost(nn.Linear(2, 1), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), loss_fn=noise_prediction)
    with pytest.raises(ValueError, match=r"decay=1.0: use a value in \[0, 1\)"):
        EMA(engine, decay=1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_type": "vae"}, "diffusion model type 'vae' is unknown; choose one of unet, dit"),
        ({"image_size": 17}, "image_size=17 cannot pass a UNet of 2 levels.*use a multiple of 2"),
        ({"image_size": 18, "channels": (8, 8, 8)}, "image_size=18 cannot pass a UNet of 3 levels.*multiple of 4"),
        ({"channels": (8, 12)}, r"channels=\[8, 12\] must each be a multiple of norm_groups=8"),
        ({"model_type": "dit", "image_size": 15, "patch_size": 2}, "the patch size must divide the image size"),
        ({"beta_schedule": "cosine"}, "beta_schedule='cosine': choose one of"),
    ],
)
def test_bad_configs_are_refused_in_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        DiffusionConfig(**overrides)
    assert "\n" not in str(caught.value)


def test_training_settings_and_digits_are_checked() -> None:
    with pytest.raises(ValueError, match="steps=0: use a positive number"):
        DiffusionTraining(steps=0)
    with pytest.raises(ValueError, match="in_channels=3: the digits are grayscale"):
        check_digits(DiffusionConfig(in_channels=3))


@pytest.mark.parametrize("model_type", ["unet", "dit"])
def test_the_model_predicts_noise_and_samples_images(model_type: str, tmp_path) -> None:
    config = TINY if model_type == "unet" else DiffusionConfig(model_type="dit", image_size=8, channels=(16,))
    torch.manual_seed(0)
    model = build_diffusion(config)
    batch = loader(0, 1).next_batch()
    loss_sum, count = noise_prediction(model(**batch), batch)
    assert count == batch["noise"].numel() and loss_sum.item() > 0
    images = sample(model.denoiser, config, labels=torch.arange(3), seed=1, num_inference_steps=4)
    assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, sample(model.denoiser, config, labels=torch.arange(3), seed=1, num_inference_steps=4))
    path = write_grid(images, tmp_path / "grid.png", columns=2, scale=2)
    from PIL import Image

    assert Image.open(path).size == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2))


def test_the_finetune_config_and_its_refusals() -> None:
    from plait.recipes.config import load_finetune_config
    from plait.recipes.diffusion_run import preflight

    path = "configs/finetune/diffusion.toml"
    config = load_finetune_config(path, ["train.steps=3"])
    assert config.section("diffusion").model_config().channels == [32, 64]
    preflight(config, world_size=2)  # dp=-1 x ZeRO-2 over 2 ranks: a batch of 32 splits
    with pytest.raises(ValueError, match="image_size=17 cannot pass a UNet of 2 levels"):
        load_finetune_config(path, ["diffusion.image_size=17"])
    with pytest.raises(ValueError, match="diffusion model type 'vae' is unknown"):
        load_finetune_config(path, ["diffusion.model_type=vae"])
    with pytest.raises(ValueError, match=r"plan\.pp=2: the diffusion recipe runs under dp and ZeRO 0-3"):
        preflight(load_finetune_config(path, ["plan.pp=2"]), world_size=2)


def test_dit_has_no_label_dropout_and_refuses_zero3() -> None:
    from diffusers.models.embeddings import LabelEmbedding

    from plait.recipes.diffusion_run import check_plan

    dit = DiffusionConfig(model_type="dit", image_size=8, channels=[16])
    embeddings = [m for m in build_diffusion(dit).modules() if isinstance(m, LabelEmbedding)]
    assert embeddings and all(m.dropout_prob == 0 for m in embeddings)  # drawn from a rank's generator otherwise
    check_plan(plait.Plan(zero=2), config=dit)
    with pytest.raises(ValueError, match=r"plan\.zero=3 with model_type='dit' is not available"):
        check_plan(plait.Plan(zero=3), config=dit)
