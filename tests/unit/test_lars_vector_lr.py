"""LARS's vectors (biases, norm weights: not adapted) at lr x vector_lr_ratio, from the factory and the config."""

from __future__ import annotations

import pytest
import torch

from plait.config import TrainConfig
from plait.optim import lars
from plait.train.optimizers import optimizer_from_config


def one_step(ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix, bias) after one step from a fixed Linear and gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 6)
    optimizer = lars(lr=0.5, weight_decay=1e-3, vector_lr_ratio=ratio)(model.parameters())
    model.weight.grad, model.bias.grad = torch.randn(6, 5), torch.randn(6)
    optimizer.step()
    return model.weight.detach().clone(), model.bias.detach().clone()


def test_vectors_take_the_plain_step_at_the_scaled_lr() -> None:
    torch.manual_seed(0)
    reference = torch.nn.Linear(5, 6)
    _, bias_grad = torch.randn(6, 5), torch.randn(6)
    weight_one, bias_one = one_step(1.0)
    weight_small, bias_small = one_step(0.01)
    torch.testing.assert_close(bias_one, reference.bias.detach() - 0.5 * bias_grad)
    torch.testing.assert_close(bias_small, reference.bias.detach() - 0.005 * bias_grad)
    torch.testing.assert_close(weight_small, weight_one)  # the adapted matrix is untouched by the ratio


def test_the_config_passes_the_ratio_and_refuses_non_positive_ones() -> None:
    optimizer = optimizer_from_config(TrainConfig(optimizer="lars", lr=2.0, vector_lr_ratio=0.001))(
        torch.nn.Linear(3, 4).parameters()
    )
    assert sorted(group["lr"] for group in optimizer.param_groups) == pytest.approx([0.002, 2.0])
    with pytest.raises(ValueError, match=r"train\.vector_lr_ratio=0\.0: .*positive ratio"):
        TrainConfig(vector_lr_ratio=0.0)
    with pytest.raises(ValueError, match="vector_lr_ratio=-1"):
        lars(lr=1.0, vector_lr_ratio=-1)
