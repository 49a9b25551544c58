"""Diffusion training (tiny diffusers UNet and DiT, class-conditional, epsilon MSE) under dp=2 and ZeRO against
one plain process: fp32, 10 steps, losses within 1e-5 relative, final weights and EMA weights allclose(1e-5, 1e-6).

Each rank draws its own share of the batches from its own DiffusionLoader: the noise and timesteps
come from the samples' global positions, so the plan sees what one process sees."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch

import plait
from plait.data.images import load_digits
from plait.recipes.data.diffusion import DiffusionLoader
from plait.recipes.diffusion import DiffusionConfig, build_diffusion, noise_prediction
from plait.recipes.ema import EMA, ema_decay
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import assert_parity

pytestmark = pytest.mark.timeout(180)

STEPS = 10
GLOBAL_BATCH = 8
CONFIGS = {
    "unet": DiffusionConfig(image_size=16, channels=[16, 32], norm_groups=8, num_train_timesteps=100),
    "dit": DiffusionConfig(
        model_type="dit", image_size=16, channels=[32], layers_per_block=2, patch_size=4, num_train_timesteps=100
    ),
}
DECAY, WARMUP = 0.9, 3
# Adam's step for a gradient element near eps moves by lr / (4 eps) per unit of float noise in it, and a
# conv weight's gradient, summed over batch and pixels, differs by ~1e-8 between batch splits: at eps 1e-6
# a handful of 150k weights missed atol 1e-6 by up to 2.7x (lr 2e-3); eps 1e-5 leaves a 4x margin at lr 1e-3.
EPS = 1e-5


@functools.cache
def digits():
    return load_digits(size=16)[0]


def loader(*, dp_rank: int, dp_size: int) -> DiffusionLoader:
    return DiffusionLoader(
        digits(), global_batch=GLOBAL_BATCH, dp_rank=dp_rank, dp_size=dp_size, seed=0, num_train_timesteps=100
    )


def fresh_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_diffusion(CONFIGS[model_type])


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, eps=EPS, weight_decay=0.01)


def train_plan(rank: int, world_size: int, model_type: str, plan: dict) -> tuple[list[float], dict, dict]:
    engine = plait.boost(
        fresh_model(model_type),
        optimizer=optimizer,
        loss_fn=noise_prediction,
        plan=plait.Plan(bucket_mb=0.01, **plan),
        max_grad_norm=1.0,
    )
    ema = EMA(engine, decay=DECAY, warmup=WARMUP)
    data = loader(dp_rank=engine.dp_rank, dp_size=engine.dp_size)
    losses = []
    for _ in range(STEPS):
        losses.append(engine.train_step(data.next_batch()).loss.item())
        ema.update()
    return losses, engine.model_state_dict(), ema.state_dict()


def with_ema(batches: list, model: torch.nn.Module, averages: list[torch.Tensor]) -> Iterator:
    """Hand out the batches; each request after the first follows an optimizer step: average it in."""
    for step, batch in enumerate(batches):
        yield batch
        weight = 1.0 - ema_decay(step, decay=DECAY, warmup=WARMUP)
        with torch.no_grad():
            for average, param in zip(averages, model.parameters(), strict=True):
                average.lerp_(param, weight)


@functools.cache
def reference(model_type: str) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = fresh_model(model_type)
    data = loader(dp_rank=0, dp_size=1)
    batches = [data.next_batch() for _ in range(STEPS)]
    averages = [param.detach().clone() for param in model.parameters()]
    losses = train_reference(
        model, with_ema(batches, model, averages), optimizer=optimizer, loss_fn=noise_prediction, max_grad_norm=1.0
    )
    state = model.state_dict()
    ema_state = dict(state)
    ema_state.update({name: average for (name, _), average in zip(model.named_parameters(), averages, strict=True)})
    return losses, state, ema_state


CASES = {  # ZeRO-2 on the DiT, whose blocks ZeRO-3 cannot gather on their own (plait.recipes.diffusion_run)
    "unet-dp2": ("unet", {"dp": 2}),
    "unet-dp2-zero3-2mb": ("unet", {"dp": 2, "zero": 3, "microbatches": 2}),
    "dit-dp2-zero2": ("dit", {"dp": 2, "zero": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_diffusion_under_dp_and_zero_matches_one_process(case: str) -> None:
    model_type, plan = CASES[case]
    results = run_ranks(train_plan, 2, model_type, plan, timeout_s=150)
    losses, state, ema_state = reference(model_type)
    assert losses[-1] < losses[0]  # it learns: the comparison is not between two idle runs
    assert_parity([(r[0], r[1]) for r in results], (losses, state))
    assert_parity([(r[0], r[2]) for r in results], (losses, ema_state))
    assert any(not torch.allclose(ema_state[name], state[name]) for name in state)  # the EMA is its own
