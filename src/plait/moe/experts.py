"""The experts of one MoE layer: MLPs whose weights are stacked along a leading expert dim.

Stacked tensors (rather than a list of MLP modules) keep a layer one unit for ZeRO,
give every expert a gradient each step (an expert that got no token gets zeros, so
gradient hooks fire the same on every rank), and make expert parallel a slice: a rank
holding experts ``first .. first + count - 1`` holds rows ``[first, first + count)``
of each stacked tensor, under the same names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.moe.config import MoEConfig

EXPERT_PARAM_NAMES = ("up_weight", "gate_weight", "down_weight", "up_bias", "gate_bias", "down_bias")


class Experts(nn.Module):
    """``num_local_experts`` MLPs in the style of the model's own (tanh-GELU, or SwiGLU).

    Weights use ``nn.Linear``'s (out, in) layout per expert: ``up_weight`` and
    ``gate_weight`` (SwiGLU only) are (n, d_ff, d_model), ``down_weight`` (n, d_model, d_ff),
    ``up_bias``, ``gate_bias`` (n, d_ff) and ``down_bias`` (n, d_model) when the model has biases.
    Global expert ``first_expert + i`` is row ``i``.
    """

    def __init__(self, config: MoEConfig, *, first_expert: int = 0, num_local_experts: int | None = None) -> None:
        super().__init__()
        count = config.num_experts - first_expert if num_local_experts is None else num_local_experts
        if first_expert < 0 or count < 1 or first_expert + count > config.num_experts:
            raise ValueError(
                f"experts {first_expert}..{first_expert + count - 1} are not within the layer's "
                f"{config.num_experts} experts; choose 0 <= first_expert and first_expert + count <= num_experts"
            )
        self.first_expert, self.num_local_experts = first_expert, count
        self.num_experts = config.num_experts
        self.init_std, self.out_init_std = config.init_std, config.out_init_std
        d, d_ff = config.d_model, config.d_ff
        self.up_weight = nn.Parameter(torch.empty(count, d_ff, d))
        swiglu = config.activation == "swiglu"
        self.gate_weight = nn.Parameter(torch.empty(count, d_ff, d)) if swiglu else None
        self.down_weight = nn.Parameter(torch.empty(count, d, d_ff))
        self.up_bias = nn.Parameter(torch.empty(count, d_ff)) if config.bias else None
        self.gate_bias = nn.Parameter(torch.empty(count, d_ff)) if swiglu and config.bias else None
        self.down_bias = nn.Parameter(torch.empty(count, d)) if config.bias else None

    @torch.no_grad()
    def _normal_rows(self, weight: torch.Tensor, *, std: float) -> None:
        if self.num_local_experts == self.num_experts:
            nn.init.normal_(weight, mean=0.0, std=std)
            return
        whole = weight.new_empty((self.num_experts, *weight.shape[1:]))
        nn.init.normal_(whole, mean=0.0, std=std)
        weight.copy_(whole[self.first_expert : self.first_expert + self.num_local_experts])

    @property
    def local_experts(self) -> range:
        """The global indices of the experts this module holds."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, out_init_std for ``down_weight``, zero biases (the dense MLP's rules).

        A slice of the layer's experts (expert parallel) draws the whole layer's weights and keeps its
        rows, so it holds what the whole layer's reset would (lazy initialisation reproduces a plain build).
        """
        if self.gate_weight is not None:
            self._normal_rows(self.gate_weight, std=self.init_std)
        self._normal_rows(self.up_weight, std=self.init_std)
        self._normal_rows(self.down_weight, std=self.out_init_std)
        for bias in (self.up_bias, self.gate_bias, self.down_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Outputs (S, d_model) for ``tokens`` (S, d_model) sorted by local expert, ``tokens_per_expert[i]`` each."""
        if len(tokens_per_expert) != self.num_local_experts:
            raise ValueError(
                f"got token counts for {len(tokens_per_expert)} experts, but this module holds "
                f"{self.num_local_experts}; a dispatch must give one count per local expert"
            )
        chunks = tokens.split(tokens_per_expert)
        return torch.cat([self.expert_forward(i, chunk) for i, chunk in enumerate(chunks)])

    def expert_forward(self, local_index: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert ``local_index`` on ``x`` (n, d_model); an empty ``x`` still gives every weight a gradient."""
        hidden = self.expert_hidden(local_index, x)
        return F.linear(hidden, self.down_weight[local_index], _row(self.down_bias, local_index))

    def expert_hidden(self, local_index: int, x: torch.Tensor) -> torch.Tensor:
        """The activation (n, d_ff) local expert ``local_index`` feeds its down projection."""
        up = F.linear(x, self.up_weight[local_index], _row(self.up_bias, local_index))
        if self.gate_weight is not None:
            return F.silu(F.linear(x, self.gate_weight[local_index], _row(self.gate_bias, local_index))) * up
        return F.gelu(up, approximate="tanh")

    def split_over_tp(self, *, group: dist.ProcessGroup, name: str) -> nn.Module:
        """This tp rank's share of every expert (``plait.moe.expert_tp``; the tp plan's style "experts")."""
        from plait.moe.expert_tp import TensorParallelExperts  # it subclasses this class

        return TensorParallelExperts.from_experts(self, group=group, name=name)


def _row(bias: torch.Tensor | None, index: int) -> torch.Tensor | None:
    return None if bias is None else bias[index]
