"""Expert parallel's pieces that need no process group: checks, slicing, units, norms, checkpoint ranges."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plait.checkpoint.layout import RankCoords, global_indices, layout_of, writes_piece
from plait.distributed.placement import placement_of
from plait.models import build
from plait.moe import expert_parameters, moe_layers
from plait.moe.all_to_all import Exchange
from plait.moe.expert_parallel import apply_expert_parallel, check_expert_parallel
from plait.optim.clip import num_replicas
from plait.zero.partition import plan_units


def test_ep_needs_moe_layers_whose_experts_it_divides() -> None:
    with pytest.raises(ValueError, match=r"the model has none; set plan\.ep=1"):
        check_expert_parallel(build("tiny"), 2)
    with pytest.raises(ValueError, match=r"4 experts, which do not split over plan\.ep=3"):
        check_expert_parallel(build("switch-tiny"), 3)
    check_expert_parallel(build("switch-tiny"), 4)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_ep_rank_keeps_its_rows_of_the_stacked_experts(rank: int) -> None:
    torch.manual_seed(0)
    model = build("mixtral-tiny")
    whole = {name: param.detach().clone() for name, param in expert_parameters(model)}
    apply_expert_parallel(model, exchange=Exchange(group=None, rank=rank, size=2))  # type: ignore[arg-type]
    for name, param in expert_parameters(model):
        torch.testing.assert_close(param, whole[name][2 * rank : 2 * rank + 2], rtol=0, atol=0)
        record = placement_of(param)
        assert record is not None and record.global_shape == tuple(whole[name].shape)
        assert record.dim_shards == (("ep", 0),)
    for _, layer in moe_layers(model):
        assert list(layer.experts.local_experts) == [2 * rank, 2 * rank + 1]


def test_expert_parameters_get_units_of_their_own() -> None:
    model = build("switch-tiny")
    experts = [param for _, param in expert_parameters(model)]
    units, sites = plan_units(model, expert_params=experts)
    expert_units = [unit for unit in units if unit.expert]
    assert len(expert_units) == len(moe_layers(model))
    assert {id(p) for unit in expert_units for _, p in unit.named_params} == {id(p) for p in experts}
    assert all(id(p) not in {id(e) for e in experts} for unit in units if not unit.expert for _, p in unit.named_params)
    block = next(site for site in sites if site.name == "blocks.0")
    assert len(block.unit_indices) == 2  # ZeRO-3 gathers both before the block runs


def test_a_shard_counts_once_per_replica_in_the_norm() -> None:
    sizes = {"pp": 1, "dp": 4, "cp": 1, "tp": 1, "ep": 2, "edp": 2}
    mesh = SimpleNamespace(size=lambda axis: sizes[axis])
    assert num_replicas(set(), mesh=mesh) == 4  # dense: every dp rank holds it
    assert num_replicas({"dp"}, mesh=mesh) == 1  # a ZeRO shard of a dense parameter
    assert num_replicas({"ep"}, mesh=mesh) == 2  # one ep rank's experts: held by its edp group
    assert num_replicas({"ep", "edp"}, mesh=mesh) == 1  # a ZeRO shard of them


def test_an_ep_rank_writes_its_experts_as_a_range_of_the_whole_tensor() -> None:
    model = build("switch-tiny")
    apply_expert_parallel(model, exchange=Exchange(group=None, rank=1, size=2))  # type: ignore[arg-type]
    name, param = expert_parameters(model)[0]
    record = placement_of(param)
    coords = RankCoords({"dp": (3, 4), "ep": (1, 2), "edp": (1, 2)})
    layout = layout_of(record, shape=tuple(param.shape), coords=coords)
    half = param.numel()
    assert torch.equal(global_indices(layout), torch.arange(half, 2 * half)), name
    assert not writes_piece(record, coords=coords)  # edp rank 1 holds a replica of edp rank 0's experts
    assert writes_piece(record, coords=RankCoords({"dp": (1, 4), "ep": (1, 2), "edp": (0, 2)}))
