"""The DeepSpeed ZeRO peer of benchmarks/zero.py's speed phase: the same model (a copy of plait's
initial weights), batches and fp32 AdamW, trained by `deepspeed.initialize` at the same ZeRO stage
on the forked ranks' gloo group, A B alternated with plait like the PyTorch peer.

DeepSpeed is not a dependency of plait: install it where the benchmark runs (`pip install
deepspeed`, or `pip install --target DIR --no-deps deepspeed hjson msgpack ninja psutil py-cpuinfo
einops nvidia-ml-py` and PYTHONPATH=DIR; `plait bench --peer-path DIR` does the latter). Without it
the speed phase records why it did not run.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from moe_deepspeed import join_deepspeed

import plait

INSTALL_HINT = (
    "pip install --target DIR --no-deps deepspeed hjson msgpack ninja psutil py-cpuinfo einops nvidia-ml-py, "
    "then PYTHONPATH=DIR (plait bench --peer-path DIR)"
)


def deepspeed_missing() -> str | None:
    """Why DeepSpeed cannot run in this process (None when it can)."""
    if importlib.util.find_spec("deepspeed") is None:
        return f"not run: deepspeed is not importable here ({INSTALL_HINT})"
    return None


def ds_config(*, stage: int, batch: int, world_size: int, lr: float, eps: float) -> dict[str, Any]:
    return {
        "train_batch_size": batch * world_size,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        # torch's AdamW, as plait's and the PyTorch peer's runs use (not DeepSpeed's fused kernels)
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "eps": eps, "weight_decay": 0.01, "torch_adam": True}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedSystem:
    """DeepSpeed ZeRO-`stage` training `model`; its step returns the local mean loss as the peers' do.

    The engine is held as `ds_engine`, not `engine`: zero.py's Runner reads plait's comm counter
    from an `engine` attribute, which DeepSpeed's engine does not have.
    """

    def __init__(self, model: torch.nn.Module, *, stage: int, rank: int, world_size: int, config: Any) -> None:
        threads = torch.get_num_threads()
        deepspeed = join_deepspeed(rank, world_size)
        settings = ds_config(stage=stage, batch=config.batch, world_size=world_size, lr=config.lr, eps=config.eps)
        self.ds_engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=settings)
        torch.set_num_threads(threads)  # one thread per rank, as plait's and the PyTorch peer's steps run
        self.version = deepspeed.__version__
        self.states = None  # DeepSpeed's partitions are not plain tensors of the module: not counted

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": tokens, "labels": tokens}
        loss_sum, num_tokens = plait.losses.causal_lm(self.ds_engine(**batch), batch)
        loss = loss_sum / num_tokens  # the local mean; DeepSpeed averages gradients over ranks
        self.ds_engine.backward(loss)
        self.ds_engine.step()
        return loss.detach()
