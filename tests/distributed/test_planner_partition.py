"""The planner's pipeline layout against plait's runtime partition under tensor and expert parallel.

The runtime splits the model into stages after ep and tp have sharded it (engine order EP -> TP ->
recompute -> PP split), so it balances what one rank holds. Forked ranks shard the model as the
engine does and run the runtime's partition for pp stages (no pipeline is built); the planner's
layers per stage and each stage's parameters on one rank must equal them, whatever the workload's
sequence length (the runtime builds its stages before it sees a batch and weighs attention at the
model's max_seq_len).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import plait
from plait.config import Plan
from plait.models.architectures import present_paths
from plait.models.gpt_config import GPTConfig
from plait.moe.all_to_all import Exchange
from plait.moe.expert_parallel import apply_expert_parallel
from plait.pipeline.partition import decoder_layout, partition_layers
from plait.planner import Cluster, Estimator, ModelShape, Workload
from plait.tensor.apply import apply_tensor_parallel
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.timeout(60)

# benchmarks/planner.py's reference model, where tp2 x pp2 showed the planner 2 layers short on stage 0.
REFERENCE = GPTConfig(vocab_size=4096, max_seq_len=128, d_model=256, num_layers=4, num_heads=4)
LLAMA_STYLE = dataclasses.replace(
    REFERENCE, num_layers=6, norm="rmsnorm", activation="swiglu", position="rope", bias=False,
    tied_embeddings=False, num_kv_heads=2,
)  # fmt: skip
MOE_TOP1 = dataclasses.replace(REFERENCE, moe_experts=4, moe_every=1, moe_top_k=1)
MOE_WIDE_VOCAB = dataclasses.replace(MOE_TOP1, vocab_size=16384, moe_experts=8)
# Attention at max_seq_len weighs enough to split 2 | 2; at the workload's 32 tokens it would be 3 | 1.
LONG_CONTEXT = GPTConfig(vocab_size=2048, max_seq_len=512, d_model=128, num_layers=4, num_heads=4)
WORKLOAD = Workload(global_batch=8, seq_len=32)
CASES = {  # (model, pp, tp, ep)
    "reference-tp2-pp2": (REFERENCE, 2, 2, 1),
    "llama-style-6-layers-tp2-pp3": (LLAMA_STYLE, 3, 2, 1),
    # The runtime weighs every expert a layer holds, not the top_k a token runs: 2 | 2, not 3 | 1 at tp1.
    "moe-top1-tp1-pp2": (MOE_TOP1, 2, 1, 1),
    "moe-top1-tp2-pp2": (MOE_TOP1, 2, 2, 1),
    # ... and only the experts its ep rank keeps: 3 | 1 at ep2 where ep1 splits 2 | 2.
    "moe-wide-vocab-ep2-pp2": (MOE_WIDE_VOCAB, 2, 1, 2),
    "long-context-tp2-pp2": (LONG_CONTEXT, 2, 2, 1),
}


def runtime_stages(rank: int, world_size: int, config: GPTConfig, pp: int, ep: int) -> list[tuple[int, int]]:
    """(layers, parameters on this rank) of each stage the runtime's partition makes after ep or tp
    (all the ranks form one ep or one tp group)."""
    torch.manual_seed(0)
    model = plait.models.build(config)
    if ep > 1:
        apply_expert_parallel(model, exchange=Exchange(group=dist.group.WORLD, rank=rank, size=world_size))
    else:
        apply_tensor_parallel(model, model.tp_plan(), group=dist.group.WORLD, sequence_parallel=False)
    layout = decoder_layout(model)
    ranges = partition_layers(model, pp=pp, seq_len=config.max_seq_len)
    layers = model.get_submodule(layout.layers)
    stages = []
    for stage, layer_range in enumerate(ranges):
        paths = [f"{layout.layers}.{index}" for index in layer_range]
        paths += layout.first_paths() if stage == 0 else []
        paths += layout.last_paths() if stage == pp - 1 else []
        modules = [model.get_submodule(path) for path in present_paths(model, paths)]
        # A tied head on the last stage is its copy of the first stage's embedding: both hold it.
        num_params = sum(param.numel() for module in modules for param in module.parameters())
        stages.append((len(layer_range), num_params))
    assert sum(len(r) for r in ranges) == len(layers)
    return stages


def planner_stages(config: GPTConfig, *, pp: int, tp: int, ep: int) -> list[tuple[int, int]]:
    shape = ModelShape(config)
    plan = Plan(dp=ep, tp=tp, pp=pp, ep=ep, microbatches=pp)
    estimator = Estimator(shape, WORKLOAD, cluster=Cluster.preset("h100", devices_per_node=tp * ep))
    layout = estimator.memory.layouts.get(plan)
    stages = []
    for stage in range(pp):
        indices = layout.layer_indices(stage)
        units = shape.stage_units(stage, num_layers=len(indices), pp=pp, tp=tp, ep=ep, layers=indices)
        stages.append((len(indices), sum(unit.local(tp) for unit in units)))
    return stages


@pytest.mark.parametrize("name", CASES)
def test_planner_splits_stages_as_the_runtime_does(name: str) -> None:
    config, pp, tp, ep = CASES[name]
    assert tp == 1 or ep == 1
    results = run_ranks(runtime_stages, tp * ep, config, pp, ep, timeout_s=45)
    assert all(result == results[0] for result in results)
    assert planner_stages(config, pp=pp, tp=tp, ep=ep) == results[0]
