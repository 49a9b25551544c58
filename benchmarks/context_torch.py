"""torch's own context parallel (``torch.distributed.tensor.experimental.context_parallel``) on the
work of ``benchmarks/context.py``: the same model and rows, cp over all ranks of a gloo DeviceMesh.

Imported by context.py, which records what happened: tokens/s when it runs, else the exact error.
On this torch (2.13) it cannot run on CPU: context_parallel wraps SDPA's q/k/v as sequence-sharded
DTensors and handles only the CUDA kernels' ops (``_sdpa_handler``: aten._scaled_dot_product_
flash/efficient/cudnn_attention and their backwards); on CPU SDPA dispatches to
aten._scaled_dot_product_flash_attention_for_cpu, which has neither a CP handler nor a DTensor
sharding strategy. Forcing SDPA's MATH backend decomposes it into ops on DTensors beside a plain
causal-mask tensor, which DTensor refuses ("aten.add.Tensor got mixed torch.Tensor and DTensor").
torch's other CP style, ``_ContextParallel`` with flex_attention (K/V all-gathered, no ring), cannot
train here either: "FlexAttention does not support backward on CPU".
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import timed_block

import plait

REASON = (
    "context_parallel's SDPA handler (torch/distributed/tensor/experimental/_context_parallel/_attention.py, "
    "_sdpa_handler / custom_ops) covers aten._scaled_dot_product_flash_attention, _efficient_attention and "
    "_cudnn_attention (+ backward), the CUDA kernels; on CPU F.scaled_dot_product_attention dispatches to "
    "aten._scaled_dot_product_flash_attention_for_cpu, which has no CP handler and no DTensor sharding strategy"
)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...], mesh: Any) -> None:
    from torch.distributed.tensor.experimental import context_parallel

    ids, labels, positions = (t.clone() for t in batch)  # context_parallel shards its buffers in place
    with context_parallel(mesh, buffers=[ids, labels, positions], buffer_seq_dims=[1, 1, 0]):
        logits = model(ids, position_ids=positions)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
    for param in model.parameters():  # cp peers hold replicas: average their gradients
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()
    optimizer.step()
    optimizer.zero_grad()


def torch_cp_main(rank: int, world_size: int, args: argparse.Namespace, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """tokens/s of torch's context_parallel over 2 rows of ``args.seq`` tokens, or the error it raised."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = plait.models.build("tiny-llama", max_seq_len=args.seq, **model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6)
    ids = torch.randint(0, model_kwargs["vocab_size"], (2, args.seq), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # shifted before the split
    batch = (ids, labels, torch.arange(args.seq))
    try:
        _step(model, optimizer, batch, mesh)  # warm-up
    except Exception as error:  # what torch raises is the finding
        return {"ran": False, "error": f"{type(error).__name__}: {error}", "reason": REASON}
    seconds = [
        timed_block(lambda: [_step(model, optimizer, batch, mesh) for _ in range(args.steps)])[0] / args.steps
        for _ in range(args.pairs)
    ]
    return {"ran": True, "seconds": seconds, "tokens_per_s": 2 * args.seq / statistics.median(seconds)}
