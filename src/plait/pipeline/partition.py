"""Split a decoder model's layers into contiguous pipeline stages balanced by cost.

The units are the model's transformer layers, found through plait's architecture registry. The embedding's cost is charged to the
first layer and the final norm + LM head's to the last, because those parts always
live on the first and the last stage; a large vocabulary then pushes layers off the
last stage. Every stage holds at least one layer and no layer is ever dropped; only an
explicit split may leave the first stage with the embedding alone and the last with the
final norm + head alone (Llama 3's interleaved layout), never a stage in between.

Example:
    >>> ranges = partition_layers(model, pp=2, seq_len=128)   # 4 layers
    >>> ranges
    [range(0, 2), range(2, 4)]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from plait.models.architectures import Architecture, architecture_of, present_paths

__all__ = [
    "LayerCost",
    "balanced_split",
    "decoder_layout",
    "layer_costs",
    "partition_layers",
    "ranges_from_split_points",
]


@dataclass(frozen=True)
class LayerCost:
    """One unit of the layer sequence: its name, parameter count and forward FLOPs per token."""

    name: str
    num_params: int
    flops_per_token: float


def decoder_layout(model: nn.Module) -> Architecture:
    """Where ``model`` keeps its layers, embeddings, final norm and head (plait's architecture registry)."""
    layout = architecture_of(model, purpose="pipeline parallelism")
    config = getattr(model, "config", None)
    for attribute, reason in layout.pp_refusals.items():
        if getattr(config, attribute, None):
            raise ValueError(f"pipeline parallelism cannot split {type(model).__name__}: {reason}")
    return layout


def layer_costs(model: nn.Module, *, seq_len: int) -> list[LayerCost]:
    """Costs of ``[embedding, layer 0, ..., layer L-1, final norm + LM head]``.

    FLOPs per token: 2 per weight for every layer's matmuls (norms and biases are
    counted too, negligibly) plus ``4 * seq_len * d_model`` for attention scores and
    their weighted sum; the head costs ``2 * d_model * vocab``; the embedding is a
    lookup (parameters only, no FLOPs).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive number of tokens per sequence")
    layout = decoder_layout(model)
    d_model = next(model.get_submodule(layout.embed).parameters()).shape[-1]  # (vocab, d_model)
    costs = [LayerCost("embeddings", _num_params(model, layout.first_paths()), 0.0)]
    layers = model.get_submodule(layout.layers)
    for index, layer in enumerate(layers):
        num_params = sum(param.numel() for param in layer.parameters())
        flops = 2.0 * num_params + 4.0 * seq_len * d_model
        costs.append(LayerCost(f"{layout.layers}.{index}", num_params, flops))
    head_params = _num_params(model, layout.last_paths())
    costs.append(LayerCost("head", head_params, 2.0 * head_params))
    return costs


def _num_params(model: nn.Module, paths: Sequence[str]) -> int:
    return sum(
        param.numel() for path in present_paths(model, paths) for param in model.get_submodule(path).parameters()
    )


def balanced_split(costs: Sequence[float], num_stages: int) -> list[range]:
    """Split ``costs`` into ``num_stages`` contiguous non-empty ranges minimising the largest sum.

    Exact (dynamic programming, O(num_stages * n^2)). Among optimal splits, later stages
    take as many units as they can: earlier stages hold more micro-batches' activations
    in flight under 1F1B.

    Example:
        >>> balanced_split([1, 1, 1, 1, 1], 2)
        [range(0, 2), range(2, 5)]
    """
    _check_split_arguments(costs, num_stages)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    best = _best_max_costs(prefix, num_stages)
    return _reconstruct(prefix, best, num_stages)


def _check_split_arguments(costs: Sequence[float], num_stages: int) -> None:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r} must be a positive int")
    if num_stages > len(costs):
        raise ValueError(
            f"cannot split {len(costs)} layers into {num_stages} non-empty stages; use at most {len(costs)} stages"
        )
    bad = [cost for cost in costs if not (math.isfinite(cost) and cost >= 0)]
    if bad:
        raise ValueError(f"layer costs must be finite and non-negative, got {bad[:3]}")


def _best_max_costs(prefix: list[float], num_stages: int) -> list[list[float]]:
    """best[s][j]: the smallest possible largest stage cost for units [0, j) in s stages."""
    num_units = len(prefix) - 1
    best = [[math.inf] * (num_units + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for stage in range(1, num_stages + 1):
        for end in range(stage, num_units - (num_stages - stage) + 1):
            best[stage][end] = min(
                max(best[stage - 1][start], prefix[end] - prefix[start]) for start in range(stage - 1, end)
            )
    return best


def _reconstruct(prefix: list[float], best: list[list[float]], num_stages: int) -> list[range]:
    target = best[num_stages][len(prefix) - 1]
    ranges, end = [], len(prefix) - 1
    for stage in range(num_stages, 0, -1):
        start = min(
            start
            for start in range(stage - 1, end)
            if best[stage - 1][start] <= target and prefix[end] - prefix[start] <= target
        )
        ranges.append(range(start, end))
        end = start
    return ranges[::-1]


def ranges_from_split_points(split_points: Sequence[int], *, num_layers: int, num_stages: int) -> list[range]:
    """Stage ranges from the layer indices where stages 1, 2, ... start.

    The first point may be 0 (the first stage holds only the embedding) and the last
    ``num_layers`` (the last stage holds only the final norm and head), as Llama 3's
    interleaved layout does; every stage in between needs a layer: it would only pass
    its input on. Megatron's ``--pipeline-model-parallel-layout`` writes these as ``E|`` and ``|L``.

    Example:
        >>> ranges_from_split_points([3], num_layers=8, num_stages=2)
        [range(0, 3), range(3, 8)]
        >>> ranges_from_split_points([0, 4, 8], num_layers=8, num_stages=4)
        [range(0, 0), range(0, 4), range(4, 8), range(8, 8)]
    """
    points = list(split_points)
    if len(points) != num_stages - 1:
        raise ValueError(
            f"split_points={points} gives {len(points) + 1} stages but {num_stages} are needed: "
            f"pass {num_stages - 1} layer indices, where stages 1..{num_stages - 1} start"
        )
    if any(isinstance(p, bool) or not isinstance(p, int) for p in points):
        raise ValueError(f"split_points={points} must be ints (layer indices where stages start)")
    bounds = [0, *points, num_layers]
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        layerless_end = start == end and index in (0, num_stages - 1) and num_stages > 1
        if not (start < end or layerless_end):
            raise ValueError(
                f"split_points={points} leaves stage {index} empty: the points must increase strictly "
                f"and lie in 1..{num_layers - 1} (the model has {num_layers} layers); only the first point may be "
                f"0 (a first stage with the embedding alone) and only the last {num_layers} (a last stage with "
                "the final norm and head alone)"
            )
    return [range(start, end) for start, end in itertools.pairwise(bounds)]


def partition_layers(
    model: nn.Module,
    *,
    pp: int,
    seq_len: int,
    num_chunks: int = 1,
    split_points: Sequence[int] | None = None,
) -> list[range]:
    """Layer ranges of the ``pp * num_chunks`` (virtual) stages, balanced by forward FLOPs.

    With ``num_chunks > 1`` (interleaved schedules) range ``v`` is virtual stage ``v``,
    which runs on rank ``v % pp`` as its chunk ``v // pp``. ``split_points`` overrides
    the balancing: the layer indices where stages 1, 2, ... start.
    """
    costs = layer_costs(model, seq_len=seq_len)
    num_layers = len(costs) - 2
    if split_points is not None:
        _check_positive(pp=pp, num_chunks=num_chunks)
        return ranges_from_split_points(split_points, num_layers=num_layers, num_stages=pp * num_chunks)
    num_stages = _num_stages(num_layers, pp=pp, num_chunks=num_chunks)
    layer_flops = [cost.flops_per_token for cost in costs[1:-1]]
    layer_flops[0] += costs[0].flops_per_token
    layer_flops[-1] += costs[-1].flops_per_token
    return balanced_split(layer_flops, num_stages)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")


def _num_stages(num_layers: int, *, pp: int, num_chunks: int) -> int:
    """Without an explicit split every stage needs a layer; more stages than layers is refused, as
    Megatron refuses virtual stages that get no layer unless a layout string places them."""
    _check_positive(pp=pp, num_chunks=num_chunks)
    if pp > num_layers:
        raise ValueError(
            f"pp={pp} is larger than the model's {num_layers} layers: every stage needs at least one layer; "
            f"use pp <= {num_layers}"
        )
    if pp * num_chunks > num_layers:
        raise ValueError(
            f"pp={pp} x {num_chunks} virtual stages per rank = {pp * num_chunks} stages, but the model has only "
            f"{num_layers} layers; use num_chunks <= {num_layers // pp} (pp x num_chunks <= {num_layers})"
        )
    return pp * num_chunks
