"""Hugging Face sparse-MoE blocks <-> plait's ``MoELayer``, with the same weights and the same routing.

Mixtral's, Qwen2-MoE's and Qwen3-MoE's blocks route each token to the top ``k`` of a softmax
over the experts (Mixtral always renormalises the ``k`` weights, the Qwens when
``norm_topk_prob``), drop nothing, and run SwiGLU experts stacked as ``gate_up_proj``
(E, 2 * d_ff, d) = [gate; up] and ``down_proj`` (E, d, d_ff). Qwen2-MoE adds a shared expert
scaled by ``sigmoid(shared_expert_gate(x))``. A ``MoELayer`` computes the same with its own
router, capacity and dispatch seam, which is where expert parallel plugs in; the swap is a
module replacement (``plait.models.use_plait_moe``), never a patch of transformers. In fp32 the two
compute the same logits; in bf16 plait's router projects in fp32 where HF's projects in the model's
dtype (both take the softmax in fp32), so a near tie may route otherwise.

The load-balancing loss: the HF model adds ``router_aux_loss_coef`` times one loss pooled over
all layers and the whole batch, only when ``output_router_logits`` is set, and only to
``outputs.loss``/``outputs.aux_loss``, which plait's loss functions do not read. A swapped layer
instead adds ``router_aux_loss_coef / number of MoE layers`` times its own per-layer loss
(``plait.moe.router.load_balancing_loss``, per routing group, so a data-parallel run can
reproduce it), when the config sets ``output_router_logits``; otherwise none.

Example:
    >>> layer = to_moe_layer(model.model.layers[0].mlp, model.config, num_moe_layers=2)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from plait.moe.config import MoEConfig
from plait.moe.layer import MoELayer


@dataclass(frozen=True)
class HFMoEFamily:
    """What differs between the HF families' blocks: names of the class and of config attributes."""

    block: str  # the sparse block's class in transformers.models.<model_type>.modeling_<model_type>
    d_ff: str  # config attribute: one expert's width
    normalize_topk: str | None = None  # config attribute; None: always renormalised (Mixtral)
    shared: bool = False  # a sigmoid-gated shared expert (Qwen2-MoE)


HF_MOE_FAMILIES: Mapping[str, HFMoEFamily] = MappingProxyType(
    {
        "mixtral": HFMoEFamily("MixtralSparseMoeBlock", d_ff="intermediate_size"),
        "qwen2_moe": HFMoEFamily(
            "Qwen2MoeSparseMoeBlock", d_ff="moe_intermediate_size", normalize_topk="norm_topk_prob", shared=True
        ),
        "qwen3_moe": HFMoEFamily(
            "Qwen3MoeSparseMoeBlock", d_ff="moe_intermediate_size", normalize_topk="norm_topk_prob"
        ),
    }
)


class GatedSharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: ``sigmoid(gate(x)) * expert(x)``, holding the HF block's own modules."""

    def __init__(self, expert: nn.Module, gate: nn.Linear) -> None:
        super().__init__()
        self.expert, self.gate = expert, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * self.expert(x)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


def hf_moe_family(config: Any) -> HFMoEFamily:
    """The family entry for an HF config; ValueError naming the known ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_MOE_FAMILIES:
        raise ValueError(
            f"plait.moe.hf has no entry for model_type={model_type!r}; it converts the sparse-MoE blocks of "
            f"{', '.join(sorted(HF_MOE_FAMILIES))}. Add an HFMoEFamily for it, or train the model as it is"
        )
    return HF_MOE_FAMILIES[model_type]


def is_hf_moe_block(module: nn.Module, config: Any) -> bool:
    """Whether ``module`` is the sparse-MoE block of ``config``'s family (dense layers are not)."""
    return type(module).__name__ == hf_moe_family(config).block


def moe_config_from_hf(config: Any, *, num_moe_layers: int) -> MoEConfig:
    """The MoEConfig of one of ``config``'s sparse blocks; ValueError for what a MoELayer cannot compute."""
    family = hf_moe_family(config)
    _require(config.hidden_act == "silu", f"hidden_act={config.hidden_act!r}", "a MoELayer's SwiGLU gates with silu")
    jitter = getattr(config, "router_jitter_noise", 0.0) or 0.0
    _require(jitter == 0, f"router_jitter_noise={jitter}", "set it to 0: plait's router adds no noise")
    normalize = True if family.normalize_topk is None else bool(getattr(config, family.normalize_topk))
    aux_weight = config.router_aux_loss_coef / num_moe_layers if config.output_router_logits else 0.0
    return MoEConfig(
        d_model=config.hidden_size,
        d_ff=getattr(config, family.d_ff),
        num_experts=config.num_experts if hasattr(config, "num_experts") else config.num_local_experts,
        top_k=config.num_experts_per_tok,
        capacity_factor=None,
        normalize_topk=normalize,
        aux_loss_weight=aux_weight,
        activation="swiglu",
        bias=False,
        init_std=config.initializer_range,
        out_init_std=config.initializer_range,
    )


def _require(condition: bool, found: str, fix: str) -> None:
    if not condition:
        raise ValueError(f"cannot convert this Hugging Face MoE block to a plait MoELayer: {found}; {fix}")


def to_moe_layer(block: nn.Module, config: Any, *, num_moe_layers: int) -> MoELayer:
    """A ``MoELayer`` computing what the HF sparse ``block`` does, with its weights (shared experts: its modules)."""
    moe_config = moe_config_from_hf(config, num_moe_layers=num_moe_layers)
    shared = GatedSharedExpert(block.shared_expert, block.shared_expert_gate) if hf_moe_family(config).shared else None
    weight = block.gate.weight
    with torch.device(weight.device):
        layer = MoELayer(moe_config, shared=shared).to(weight.dtype)
    layer.load_state_dict(plait_tensors_from_hf(dict(block.state_dict())), strict=True)
    return layer


def to_hf_block(layer: MoELayer, config: Any) -> nn.Module:
    """The HF sparse block of ``config``'s family holding ``layer``'s weights (the inverse of ``to_moe_layer``)."""
    family = hf_moe_family(config)
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    weight = layer.router.weight
    with torch.device(weight.device):
        block = getattr(module, family.block)(config).to(weight.dtype)
    block.load_state_dict(hf_tensors_from_plait(dict(layer.state_dict())), strict=True)
    return block


def plait_tensors_from_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sparse block's tensors (its state dict, or its parameters' gradients) under MoELayer names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == "experts.gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)  # (E, 2 * d_ff, d) = [gate; up]
            out["experts.gate_weight"], out["experts.up_weight"] = gate.contiguous(), up.contiguous()
        else:
            out[_renamed(name, _HF_TO_PLAIT)] = tensor
    return out


def hf_tensors_from_plait(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MoELayer's tensors (its state dict, or its gradients) under the HF sparse block's names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == "experts.gate_weight":
            out["experts.gate_up_proj"] = torch.cat([tensor, tensors["experts.up_weight"]], dim=1)
        elif name != "experts.up_weight":
            out[_renamed(name, _PLAIT_TO_HF)] = tensor
    return out


# Prefixes (HF block -> MoELayer); the stacked gate_up_proj is split above.
_HF_TO_PLAIT = (
    ("gate.weight", "router.weight"),
    ("experts.down_proj", "experts.down_weight"),
    ("shared_expert_gate.", "shared.gate."),
    ("shared_expert.", "shared.expert."),
)
_PLAIT_TO_HF = tuple((plait, hf) for hf, plait in _HF_TO_PLAIT)


def _renamed(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for source, target in prefixes:
        if name.startswith(source):
            return target + name[len(source) :]
    raise ValueError(f"no counterpart for MoE tensor {name!r}; is this a block of a family plait.moe.hf knows?")
