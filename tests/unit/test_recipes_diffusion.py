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


def tiny_engine(**train_keys):
    """The tiny UNet's engine from a [train] table (through training_from, as `plait finetune` maps it)."""
    from plait.config import TrainConfig
    from plait.recipes.diffusion import DiffusionSection
    from plait.recipes.diffusion_run import boost_diffusion
    from plait.recipes.diffusion_training import training_from

    section = DiffusionSection(image_size=8, channels=(8, 16), norm_groups=4, num_train_timesteps=50)
    training = training_from(section, TrainConfig(**train_keys))
    return boost_diffusion(section.model_config(), training, plan=plait.Plan())


@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_train_optimizer_is_the_engines(optimizer: str) -> None:
    engine = tiny_engine(optimizer=optimizer, lr=1e-3, beta2=0.98, momentum=0.8, weight_decay=0.01)
    expected = {"lamb": plait.optim.Lamb, "lars": plait.optim.Lars}[optimizer]
    assert type(engine.optimizer) is expected
    group = engine.optimizer.param_groups[0]
    assert group["initial_lr"] == 1e-3 and group["weight_decay"] == 0.01  # the matrices' group, before warmup
    assert group["betas"] == (0.9, 0.98) if optimizer == "lamb" else group["momentum"] == 0.8


def test_train_schedule_sets_the_lr_sequence() -> None:
    from plait.optim.schedules import warmup_cosine_factor, warmup_poly_factor

    steps, warmup, ratio = 4, 1, 0.0
    engine = tiny_engine(schedule="poly", min_lr_ratio=ratio, steps=steps, warmup=warmup, lr=1e-3, global_batch=8)
    data = loader(0, 1)
    lrs = []
    for _ in range(steps - 1):
        engine.train_step(data.next_batch())
        lrs.append(engine.optimizer.param_groups[0]["lr"])  # the lr of the next step
    poly = [1e-3 * warmup_poly_factor(k, warmup=warmup, total=steps, end_ratio=ratio) for k in range(1, steps)]
    cosine = [1e-3 * warmup_cosine_factor(k, warmup=warmup, total=steps, min_ratio=ratio) for k in range(1, steps)]
    assert lrs == pytest.approx(poly, rel=1e-12) and lrs != pytest.approx(cosine, rel=1e-3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.eval_every=10", r"train\.eval_every=10 does not apply to the diffusion recipe: it scores held-out"),
        ("train.checkpoint_every=5", r"train\.checkpoint_every=5 does not apply to the diffusion recipe: it writes"),
        ("train.hang_timeout_s=60", r"train\.hang_timeout_s=60(\.0)? does not apply to the diffusion recipe: its loop"),
    ],
)
def test_train_keys_the_recipe_does_not_read_are_refused_in_one_line(override: str, message: str) -> None:
    from plait.recipes.config import load_finetune_config
    from plait.recipes.diffusion_run import preflight

    with pytest.raises(ValueError, match=message) as caught:
        preflight(load_finetune_config("configs/finetune/diffusion.toml", [override]), world_size=2)
    assert "\n" not in str(caught.value)


def test_the_shipped_config_keeps_the_recipes_optimisation() -> None:
    """configs/finetune/diffusion.toml trains as DiffusionTraining's defaults (the benchmark's figures) do."""
    from plait.recipes.config import load_finetune_config
    from plait.recipes.diffusion_training import training_from

    config = load_finetune_config("configs/finetune/diffusion.toml")
    shipped, default = training_from(config.section("diffusion"), config.train), DiffusionTraining()
    names = ("optimizer", "schedule", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta2", "eps", "max_grad_norm")
    assert {n: getattr(shipped, n) for n in names} == {n: getattr(default, n) for n in names}
    with pytest.raises(ValueError, match=r"train\.optimizer='sgd': choose one of adamw, lamb, lars"):
        DiffusionTraining(optimizer="sgd")
