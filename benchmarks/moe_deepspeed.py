"""The DeepSpeed-MoE peer of benchmarks/moe.py: plait's MoE GPT with each MoE MLP replaced by
`deepspeed.moe.layer.MoE` over the same experts (the model's SwiGLU MLP at the expert width),
top_k and capacity (dropless: drop_tokens=False), trained by `deepspeed.initialize` on gloo.

DeepSpeed is not a dependency of plait: install it where the benchmark runs (`pip install
deepspeed`, or `pip install --target DIR --no-deps deepspeed hjson msgpack ninja psutil py-cpuinfo
einops nvidia-ml-py` and PYTHONPATH=DIR). Without it a run records why it did not start.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

import plait
from plait.models import build
from plait.models.gpt_config import GPTConfig
from plait.models.layers import build_mlp
from plait.moe.model import moe_layers


class DeepSpeedMoEMLP(nn.Module):
    """DeepSpeed's MoE in place of plait's MoELayer: returns the output, keeps the layer's aux loss."""

    def __init__(self, config: GPTConfig, *, ep: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        expert = build_mlp(dataclasses.replace(config, moe_experts=0, d_ff=config.resolved_moe_d_ff))
        self.moe = MoE(
            hidden_size=config.d_model, expert=expert, num_experts=config.moe_experts, ep_size=ep,
            k=config.moe_top_k, capacity_factor=config.moe_capacity_factor or 1.0,
            eval_capacity_factor=config.moe_capacity_factor or 1.0, min_capacity=0,
            drop_tokens=config.moe_capacity_factor is not None, use_rts=False,
        )  # fmt: skip
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux_loss, _ = self.moe(x)
        self.aux_loss = aux_loss
        return out


def deepspeed_model(
    preset: str, *, seq: int, ep: int, overrides: dict[str, Any]
) -> tuple[nn.Module, list[DeepSpeedMoEMLP]]:
    model = build(preset, max_seq_len=seq, **overrides)
    swapped = []
    for name, _ in moe_layers(model):
        parent_name, _, child = name.rpartition(".")
        layer = DeepSpeedMoEMLP(model.config, ep=ep)
        setattr(model.get_submodule(parent_name), child, layer)
        swapped.append(layer)
    return model, swapped


def join_deepspeed(rank: int, world_size: int) -> Any:
    """DeepSpeed on the forked ranks' existing gloo group (it reads the usual launcher variables)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def deepspeed_system(
    preset: str,
    *,
    seq: int,
    ep: int,
    rank: int,
    world_size: int,
    micro_batch: int,
    lr: float,
    overrides: dict[str, Any],
) -> tuple[Any, Any]:
    """(engine, step function) of DeepSpeed training the preset with DeepSpeed-MoE at expert parallel `ep`."""
    deepspeed = join_deepspeed(rank, world_size)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)
    model, swapped = deepspeed_model(preset, seq=seq, ep=ep, overrides=overrides)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    weight = model.config.moe_aux_loss_weight

    def step(tokens: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": tokens, "labels": tokens}
        loss = plait.losses.causal_lm_mean(engine(tokens), batch)
        engine.backward(loss + weight * sum(layer.aux_loss for layer in swapped))
        engine.step()
        return loss.detach()

    return engine, step
