"""The planner's Mixture-of-Experts model: expert units per rank under expert parallel (against the
runtime's own partition of a model built from the preset), model states and activations by formula,
active FLOPs, all-to-all bytes and seconds, and ep in the search."""

from __future__ import annotations

import pytest
import torch

from plait.cli import main
from plait.config import Plan
from plait.models import build
from plait.models.presets import get_preset
from plait.moe.expert_parallel import slice_experts
from plait.moe.model import expert_parameters, moe_layers
from plait.planner import Cluster, ModelShape, SearchSpace, TimeModel, Workload, search
from plait.planner.comm import all_to_all_bytes, collective_seconds
from plait.planner.memory import MemoryModel, unit_state_bytes
from plait.planner.search import is_valid
from plait.zero.partition import plan_units

MOE_PRESETS = ("switch-tiny", "mixtral-tiny", "moe-100m")


def ep_rank_model(name: str, ep: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The preset on the meta device as ep rank 0 holds it: E / ep experts per MoE layer, and those
    expert parameters (which the runtime puts in units of their own only when ep > 1)."""
    with torch.device("meta"):
        model = build(name)
    for _, layer in moe_layers(model):
        count = layer.config.num_experts // ep
        layer.experts = slice_experts(layer.experts, config=layer.config, first=0, count=count)
    experts = [param for _, param in expert_parameters(model)] if ep > 1 else []
    return model, experts


def runtime_units(name: str, ep: int) -> list[tuple[int, int, bool]]:
    """(elements, tensors, expert) of each unit plait's ZeRO builds for ep rank 0."""
    model, experts = ep_rank_model(name, ep)
    specs, _ = plan_units(model, expert_params=experts)
    return [(sum(p.numel() for _, p in spec.named_params), len(spec.named_params), spec.expert) for spec in specs]


def planner_units(name: str, ep: int) -> list:
    shape = ModelShape(get_preset(name))
    return shape.stage_units(0, num_layers=shape.num_layers, pp=1, tp=1, ep=ep)


@pytest.mark.parametrize("ep", [1, 2, 4])
@pytest.mark.parametrize("name", MOE_PRESETS)
def test_units_are_the_runtimes_with_num_experts_over_ep_per_rank(name: str, ep: int) -> None:
    model, _ = ep_rank_model(name, ep)
    assert all(layer.experts.num_local_experts == layer.config.num_experts // ep for _, layer in moe_layers(model))
    planned = [(unit.local(1), unit.num_tensors, unit.expert) for unit in planner_units(name, ep)]
    assert planned == runtime_units(name, ep)
    assert sum(n for n, _, _ in planned) == sum(p.numel() for p in model.parameters())
    if ep > 1:  # the expert units are smaller by ep than at ep=1, the rest unchanged
        whole = sum(n for n, _, expert in runtime_units(name, 1))
        assert sum(n * (ep if expert else 1) for n, _, expert in planned) == whole == get_preset(name).num_parameters()


# Model states per element on N ranks (memory.py's docstring); + 4-byte Adam steps per flat piece.
FORMULAS = {
    "fp32": {0: lambda p, n: 16 * p, 1: lambda p, n: 8 * p + 8 * p / n, 2: lambda p, n: 4 * p + 12 * p / n,
             3: lambda p, n: 16 * p / n},
    "bf16": {0: lambda p, n: 20 * p, 1: lambda p, n: 4 * p + 16 * p / n, 2: lambda p, n: 2 * p + 16 * p / n,
             3: lambda p, n: 16 * p / n},
}  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_model_state_bytes_per_rank_against_the_built_model(ep: int, zero: int, precision: str) -> None:
    """moe-100m on dp=4: expert units (E / ep experts each) shard over edp = 4 / ep ranks, the rest over dp."""
    dp = 4
    units = runtime_units("moe-100m", ep)
    expected = 0.0
    for numel, tensors, expert in units:
        ranks = dp // ep if expert else dp
        shards = ranks if zero else 1
        assert numel % shards == 0  # no padding at this size: the formulas hold to the byte
        expected += FORMULAS[precision][zero](numel, ranks)
        if zero == 0 and precision == "fp32":
            expected += 4 * tensors  # bucketed data parallel: one step per tensor
        else:
            expected += 4 * (tensors / shards + (1 if shards > 1 else 0))
    states = unit_state_bytes(planner_units("moe-100m", ep), Plan(dp=dp, ep=ep, zero=zero, precision=precision))
    assert states.params + states.master + states.grads + states.optimizer == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("tp", [1, 2])
def test_memory_per_rank_equals_the_formula(tp: int) -> None:
    """switch-tiny (2 MoE layers: d 64, 4 heads, 4 experts of width 256, top-1, capacity 1.25) on dp=2, ep=2,
    fp32, 4 sequences of 64 tokens per rank: the activations each layer keeps, by hand (tp splits the
    attention and each expert's width)."""
    shape = ModelShape(get_preset("switch-tiny"))
    plan = Plan(dp=2, ep=2, tp=tp, zero=1, precision="fp32")
    memory = MemoryModel(shape, Workload(8, 64)).estimate(plan)
    n, h, f, e, experts = 4 * 64, 64, 256, 4, 4
    slots = n * 1 * 1.25
    layer = (
        2 * n * h * e + 2 * n * h * e  # residual stream, norm outputs
        + (4 * n * h * e + 4 * 4 * 4 * 64) / tp  # q, k, v, attention output; fp32 log-sum-exp per head and token
        + slots * (2 * f / tp + 2 * h) * e  # per token slot: GELU's input and output, gathered input, expert output
        + 2 * n * experts * 4  # router logits and probabilities, fp32
        + 2 * n * 2 * 4  # LayerNorm mean and rstd, fp32, two norms
    )  # fmt: skip
    head_input = 2 * n * h * e
    assert memory.activations == pytest.approx(2 * layer + head_input, rel=1e-12)
    states = unit_state_bytes(shape.stage_units(0, num_layers=shape.num_layers, pp=1, tp=tp, ep=2), plan)
    assert memory.model_states == states.params + states.master + states.grads + states.optimizer
    dropless = MemoryModel(ModelShape(get_preset("mixtral-tiny")), Workload(8, 64)).estimate(plan)
    assert dropless.activations > 0


def test_moe_layer_flops_count_the_active_experts_and_the_router() -> None:
    config = get_preset("moe-100m")
    shape = ModelShape(config)
    d, f, s = config.d_model, config.resolved_moe_d_ff, 256
    kv = config.resolved_num_kv_heads * config.head_dim
    attention = d * (d + 2 * kv) + d * d
    expert = 3 * d * f  # SwiGLU, no biases
    expected = 2 * (attention + d * config.moe_experts + config.moe_top_k * expert) + 4 * s * d
    assert shape.layer_flops_per_token(s, moe=True) == expected
    # tp splits the attention and every expert, not the router
    split = 2 * (attention + config.moe_top_k * expert) + 4 * s * d
    assert shape.layer_flops_per_token(s, tp=2, moe=True) == split / 2 + 2 * d * config.moe_experts
    # forward + backward of every layer and the head: the model's 6 x active parameters + attention, less norms
    planned = 3 * (shape.stage_flops_per_token(range(config.num_layers), s) + shape.head_flops_per_token())
    assert planned == pytest.approx(config.flops_per_token(s), rel=1e-3)
    assert planned < 0.5 * 6 * config.num_parameters()  # far below what all 8 experts would cost


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("name", ["switch-tiny", "mixtral-tiny"])
def test_expert_units_under_tp_hold_each_experts_share_of_its_width(name: str, ep: int, tp: int) -> None:
    """What a tp rank holds of an ep rank's experts is the experts of a model whose expert width is d_ff / tp
    (the down bias stays whole): the planner's expert unit at tp against such a model built from the preset."""
    config = get_preset(name)
    with torch.device("meta"):
        narrow = build(name, moe_d_ff=config.resolved_moe_d_ff // tp)
    _, layer = moe_layers(narrow)[0]
    local = slice_experts(layer.experts, config=layer.config, first=0, count=config.moe_experts // ep)
    shape = ModelShape(config)
    assert shape.expert_unit(ep).local(tp) == sum(p.numel() for p in local.parameters())


def test_tp_all_reduces_of_moe_layers_per_step() -> None:
    """moe-100m (every layer MoE) at tp=2: per layer and micro-batch, forward the attention output's and the
    experts' all-reduce, backward the attention entry's and the experts' entry (tokens x top_k slots of
    d_model, dropless); plus the vocab-parallel ends."""
    config = get_preset("moe-100m")
    shape = ModelShape(config)
    cluster = Cluster.preset("h100", nodes=1)
    plan = Plan(dp=4, tp=2, ep=2, zero=1, microbatches=2, precision="bf16")
    workload = Workload(64, 256)
    tokens = 64 // 4 // 2 * 256
    link = cluster.link(2)

    def all_reduce(num_bytes: float) -> float:
        return collective_seconds(num_bytes, ranks=2, link=link, kind="all_reduce")

    hidden = all_reduce(tokens * config.d_model * 2)
    experts = all_reduce(tokens * config.moe_top_k * config.d_model * 2)
    ends = 2 * hidden + 3 * all_reduce(4 * tokens)  # embedding; head input's gradient and the loss
    assert config.num_moe_layers == config.num_layers
    layers = config.num_layers * 2 * (hidden + experts)
    expected = plan.microbatches * (layers + 2 * ends)  # the ends charged to forward and backward (_tp_ends)
    assert TimeModel(shape, workload, cluster=cluster).estimate(plan).tp_comm == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("name", "ep", "precision"), [("switch-tiny", 2, "fp32"), ("moe-100m", 4, "bf16")])
def test_all_to_all_bytes(name: str, ep: int, precision: str) -> None:
    config = get_preset(name)
    shape = ModelShape(config)
    tokens = 4 * 64
    element = 4 if precision == "fp32" else 2
    expected = tokens * config.moe_top_k * (config.moe_capacity_factor or 1.0) * config.d_model * element
    plan = Plan(dp=4, ep=ep, precision=precision)
    assert all_to_all_bytes(shape, plan, tokens=tokens) == pytest.approx(expected * (ep - 1) / ep, rel=1e-12)
    assert all_to_all_bytes(shape, Plan(dp=4, ep=1), tokens=tokens) == 0


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_all_to_all_seconds_per_step(recompute: str) -> None:
    """Per MoE layer and micro-batch: dispatch and combine forward, their reverses backward (and the forward's
    again under full recomputation), each after an exchange of 8-byte counts, on the ring model's link."""
    config = get_preset("moe-100m")
    shape = ModelShape(config)
    cluster = Cluster.preset("h100", nodes=1)
    plan = Plan(dp=8, ep=4, zero=1, microbatches=2, recompute=recompute)
    workload = Workload(64, 256)
    tokens = 64 // 8 // 2 * 256
    link = cluster.link(4, stride=1)
    one = collective_seconds(all_to_all_bytes(shape, plan, tokens=tokens) * 4 / 3, ranks=4, link=link,
                             kind="all_to_all")  # fmt: skip
    counts = collective_seconds(8 * config.moe_experts, ranks=4, link=link, kind="all_to_all")
    exchanges, count_exchanges = (4, 1) if recompute == "none" else (6, 2)
    expected = plan.microbatches * config.num_moe_layers * (exchanges * one + count_exchanges * counts)
    time = TimeModel(shape, workload, cluster=cluster).estimate(plan)
    assert time.ep_comm == pytest.approx(expected, rel=1e-9)
    assert TimeModel(shape, workload, cluster=cluster).estimate(Plan(dp=8, ep=1, zero=1)).ep_comm == 0


def test_search_offers_every_ep_that_divides_dp_and_the_experts() -> None:
    shape = ModelShape(get_preset("moe-100m"))  # 8 experts
    workload = Workload(48, 256)
    result = search(shape, workload, cluster=Cluster.preset("h100", nodes=1).replace(devices_per_node=6))
    assert {e.plan.ep for e in result.estimates} == {1, 2}  # dp 6 or 3 at most: 3 and 6 do not divide 8
    result = search(shape, Workload(64, 256), cluster=Cluster.preset("h100", nodes=1))
    assert {e.plan.ep for e in result.estimates} == {1, 2, 4, 8}
    for est in result.estimates:
        assert est.plan.dp % est.plan.ep == 0 and not est.plan.sequence_parallel
        assert is_valid(est.plan, shape, Workload(64, 256))
    dense = search(ModelShape(get_preset("gpt2-124m")), Workload(64, 256), cluster=Cluster.preset("h100", nodes=1))
    assert {e.plan.ep for e in dense.estimates} == {1}
    fixed = search(shape, Workload(64, 256), cluster=Cluster.preset("h100", nodes=1), space=SearchSpace(ep=(2,)))
    assert {e.plan.ep for e in fixed.estimates} == {2}


def test_model_states_shrink_with_ep() -> None:
    shape = ModelShape(get_preset("moe-100m"))
    memory = MemoryModel(shape, Workload(64, 256))
    states = [memory.estimate(Plan(dp=8, ep=ep, zero=1, precision="bf16")).model_states for ep in (1, 2, 4, 8)]
    assert states == sorted(states, reverse=True) and states[-1] < 0.6 * states[0]


def test_plan_command_shows_ep_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "moe-100m", "--gpus-per-node", "8", "--top", "40"]) == 0
    table = capsys.readouterr().out
    assert " ep2 " in table and " ep4 " in table and "active" in table
