"""Swap a Hugging Face MoE model's sparse blocks for plait ``MoELayer``s and back, by the registry.

The registry entry's ``moe_block`` names the block inside each layer (Mixtral's, Qwen2-MoE's and
Qwen3-MoE's ``mlp``); layers whose block is dense (Qwen2-MoE's ``mlp_only_layers``) keep it.
After ``use_plait_moe`` the model computes the same logits and gradients, and is a plait MoE
model to every strand: its routing runs through ``MoELayer.dispatch`` (expert parallel), its
statistics reach the metrics line, and ``plait.moe.hf`` says how the load-balancing loss maps.

Example:
    >>> model = transformers.MixtralForCausalLM(config)  # doctest: +SKIP
    >>> use_plait_moe(model)  # doctest: +SKIP
    2
    >>> use_hf_moe(model)  # the HF blocks again, with the trained weights  # doctest: +SKIP
    2
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plait.models.architectures import architecture_of, find_architecture
from plait.moe.hf import hf_tensors_from_plait, is_hf_moe_block, to_hf_block, to_moe_layer
from plait.moe.layer import MoELayer


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(qualified name, layer, block) for each layer's ``moe_block``, as the registry names it."""
    arch = architecture_of(model, purpose="swapping Mixture-of-Experts blocks")
    if arch.moe_block is None:
        raise ValueError(
            f"{type(model).__name__} has no Mixture-of-Experts blocks in plait's architecture registry "
            f"(entry {arch.name!r} has no moe_block); use a Mixtral, Qwen2-MoE or Qwen3-MoE model"
        )
    layers = model.get_submodule(arch.layers)
    return [
        (f"{arch.layers}.{i}.{arch.moe_block}", layer, layer.get_submodule(arch.moe_block))
        for i, layer in enumerate(layers)
    ]


def use_plait_moe(model: nn.Module) -> int:
    """Replace every HF sparse-MoE block of ``model`` by an equivalent ``MoELayer``; return how many.
    Call it before ``plait.boost``, which then sees an MoE model (expert parallel, MoE metrics).

    ``output_router_logits`` becomes a per-layer load-balancing loss (``plait.moe.hf``), and the
    config's flag is cleared: the HF forward would pool router logits from blocks that are gone.
    """
    found = [(layer, block) for _, layer, block in _blocks(model) if is_hf_moe_block(block, model.config)]
    name = architecture_of(model).moe_block
    for layer, block in found:
        setattr(layer, name, to_moe_layer(block, model.config, num_moe_layers=len(found)))
    if found:
        model.config.output_router_logits = False
    return len(found)


def use_hf_moe(model: nn.Module) -> int:
    """Put back the HF sparse blocks, with the MoELayers' current weights; return how many.

    ``output_router_logits`` is set again when the layers trained a load-balancing loss.
    """
    found = [(layer, block) for _, layer, block in _blocks(model) if isinstance(block, MoELayer)]
    name = architecture_of(model).moe_block
    aux = _trains_aux_loss(model)
    for layer, block in found:
        setattr(layer, name, to_hf_block(block, model.config))
    if aux:
        model.config.output_router_logits = True
    return len(found)


def _trains_aux_loss(model: nn.Module) -> bool:
    return any(module.config.aux_loss_weight > 0 for module in model.modules() if isinstance(module, MoELayer))


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """``model.config.to_dict()`` as the model without the swap has it (``output_router_logits`` set again
    when the swapped layers train a load-balancing loss): what a checkpoint records for export."""
    values = model.config.to_dict()
    if _trains_aux_loss(model):
        values["output_router_logits"] = True
    return values


def hf_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (weights or gradients) under the names the HF model has without the swap.

    ``model`` may be swapped or not (an export builds the HF model afresh): every block whose
    MoELayer names appear in ``tensors`` is renamed; other names and models pass unchanged.
    """
    arch = find_architecture(model)
    if arch is None or arch.moe_block is None:
        return dict(tensors)
    out = dict(tensors)
    for prefix, _, _ in _blocks(model):
        if f"{prefix}.router.weight" not in out:
            continue
        own = {name.removeprefix(f"{prefix}."): out.pop(name) for name in list(out) if name.startswith(f"{prefix}.")}
        out |= {f"{prefix}.{name}": tensor for name, tensor in hf_tensors_from_plait(own).items()}
    return out
