"""Tensor parallel inside the experts: every expert's MLP split Megatron-style over the tp group.

Each tp rank holds a 1/tp slice of every local expert's hidden width (d_ff): ``up_weight`` and
``gate_weight`` (n, d_ff/tp, d_model) and their biases split along the width (column-parallel),
``down_weight`` (n, d_model, d_ff/tp) split along its input (row-parallel). The tokens a rank's
experts get are the same on every tp rank (routing runs whole, on the same tokens, and the
all-to-all of expert parallel pairs ranks of the same tp position), so the experts' outputs are
partial sums, all-reduced over tp once per MoE layer for all experts together; the down bias
(whole on every tp rank) is added after that sum, once. The input's gradient, a partial sum too,
is all-reduced backward (``copy_to_tp``). Routers and shared experts stay whole.

Placement records append ``("tp", dim)`` to the expert-parallel record, if any, so norms,
optimizers, ZeRO and checkpoints see a slice of dim 1 (2 for ``down_weight``) of the tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.distributed.placement import Placement, placement_of, set_placement
from plait.moe.experts import EXPERT_PARAM_NAMES, Experts
from plait.tensor.comm import copy_to_tp, reduce_from_tp, tp_rank_and_size

# The dim each stacked expert tensor is split along over tp; the down bias is whole (added after the sum).
TP_DIMS = {"up_weight": 1, "gate_weight": 1, "up_bias": 1, "gate_bias": 1, "down_weight": 2}
COPIED_ATTRIBUTES = ("first_expert", "num_local_experts", "num_experts", "init_std", "out_init_std")


class TensorParallelExperts(Experts):
    """This tp rank's slice of every expert of an ``Experts`` (see the module docstring)."""

    counts_tp_collectives = True  # plait.tensor.count_collectives hands it the engine's counter

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("build TensorParallelExperts with TensorParallelExperts.from_experts(experts, group=, name=)")

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts, *, group: dist.ProcessGroup, name: str) -> TensorParallelExperts:
        """Slice ``experts`` (whole, or an expert-parallel slice of a layer) for this tp rank; ``name``
        is its module name in the model."""
        rank, size = tp_rank_and_size(group)
        d_ff = experts.up_weight.shape[1]
        if d_ff % size:
            raise ValueError(
                f"{name}: the experts' width d_ff={d_ff} does not split over tp={size}; choose a tp that "
                f"divides {d_ff} (moe_d_ff)"
            )
        part = cls.__new__(cls)
        nn.Module.__init__(part)
        for attr in COPIED_ATTRIBUTES:
            setattr(part, attr, getattr(experts, attr))
        part.group, part.tp_size = group, size
        part.counter = None  # CommCounter | None, set by count_collectives
        for param_name in EXPERT_PARAM_NAMES:
            param = getattr(experts, param_name)
            if param is None:
                part.register_parameter(param_name, None)
                continue
            setattr(part, param_name, _slice(param, name=f"{name}.{param_name}", rank=rank, size=size))
        return part

    def reset_parameters(self) -> None:
        raise ValueError(
            "tensor-parallel experts hold a slice of each expert's width and cannot redraw the layer's "
            "weights; initialise the model before plait.boost splits it"
        )

    def forward(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Outputs (S, d_model) for ``tokens`` (S, d_model) sorted by local expert, summed over tp."""
        if len(tokens_per_expert) != self.num_local_experts:
            raise ValueError(
                f"got token counts for {len(tokens_per_expert)} experts, but this module holds "
                f"{self.num_local_experts}; a dispatch must give one count per local expert"
            )
        entered = copy_to_tp(tokens, self.group, counter=self.counter)
        chunks = entered.split(tokens_per_expert)
        partial = torch.cat(
            [F.linear(self.expert_hidden(i, chunk), self.down_weight[i]) for i, chunk in enumerate(chunks)]
        )
        out = reduce_from_tp(partial, self.group, counter=self.counter)
        if self.down_bias is None:
            return out
        counts = torch.tensor(tokens_per_expert, device=out.device)
        return out + self.down_bias.repeat_interleave(counts, dim=0, output_size=out.shape[0])

    def extra_repr(self) -> str:
        return f"experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1}, tp={self.tp_size}"


def _slice(param: nn.Parameter, *, name: str, rank: int, size: int) -> nn.Parameter:
    """This rank's slice along the parameter's tp dim (none for the down bias), with its placement."""
    dim = TP_DIMS.get(name.rpartition(".")[2])
    local = param if dim is None else param.chunk(size, dim=dim)[rank]
    sliced = nn.Parameter(local.detach().clone(), requires_grad=param.requires_grad)
    if dim is None and placement_of(param) is None:
        return sliced  # whole and replicated
    base = placement_of(param) or Placement(name=name, global_shape=tuple(param.shape))
    global_shape = list(base.global_shape)
    dim_shards = base.dim_shards
    if dim is not None:
        global_shape[dim] = param.shape[dim]
        dim_shards = (*dim_shards, ("tp", dim))
    set_placement(sliced, Placement(name=base.name, global_shape=tuple(global_shape), dim_shards=dim_shards))
    return sliced
