"""Merging LoRA adapters into their base weights: a checkpoint of a LoRA run exports as a plain model.

A LoRA layer saves ``<module>.base_layer.weight`` (and ``.bias``) beside its factors
``<module>.lora_A.<adapter>.weight`` (rank, in) and ``<module>.lora_B.<adapter>.weight`` (out, rank);
the merged ``<module>.weight`` is ``W + scaling * B @ A`` (transposed for the layers the record lists
under ``conv1d``: transformers' GPT-2 Conv1D keeps its weight as (in, out)). A base held as int8 (``.base_layer.weight_scale`` beside it) is dequantized first.
Every other int8-held layer (``<module>.weight`` beside ``<module>.weight_scale``) is dequantized too.
The trainer state's ``lora`` record (written by plait.recipes.lora) gives the scaling and adapter name.
"""

from __future__ import annotations

from typing import Any

import torch

BASE = ".base_layer."
SCALE = ".weight_scale"


def _dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Int8 weights (plait.recipes.quantize: one scale per output row) as fp32; their scales dropped."""
    out = {name: t for name, t in state.items() if not name.endswith(SCALE)}
    for name, scale in state.items():
        if name.endswith(SCALE):
            weight = f"{name.removesuffix(SCALE)}.weight"
            out[weight] = (state[weight].double() * scale.double()[:, None]).float()
    return out


def _merged_weight(
    state: dict[str, torch.Tensor], module: str, *, adapter: str, scaling: float, transposed: bool
) -> torch.Tensor:
    weight = state[f"{module}{BASE}weight"]
    a = state[f"{module}.lora_A.{adapter}.weight"].double()
    b = state[f"{module}.lora_B.{adapter}.weight"].double()
    delta = scaling * (b @ a)  # (out, in)
    if transposed:
        delta = delta.T
    if delta.shape != weight.shape:
        raise ValueError(f"{module}: LoRA update {tuple(delta.shape)} does not fit its base {tuple(weight.shape)}")
    return (weight.double() + delta).to(weight.dtype)


def merge_lora(state: dict[str, torch.Tensor], record: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """`state` with every LoRA layer merged into a plain ``<module>.weight``/``.bias``; unchanged without a record."""
    if not record:
        return state
    adapter, scaling = record.get("adapter", "default"), float(record["scaling"])
    conv1d = set(record.get("conv1d", ()))
    state = _dequantized(state)
    modules = [name.removesuffix(f"{BASE}weight") for name in state if name.endswith(f"{BASE}weight")]
    if not modules:
        raise ValueError(
            "the checkpoint has a LoRA record but no LoRA layers ('.base_layer.weight'); is it a LoRA run?"
        )
    merged = {name: t for name, t in state.items() if not _is_lora_entry(name)}
    for module in modules:
        transposed = module in conv1d
        merged[f"{module}.weight"] = _merged_weight(
            state, module, adapter=adapter, scaling=scaling, transposed=transposed
        )
        if f"{module}{BASE}bias" in state:
            merged[f"{module}.bias"] = state[f"{module}{BASE}bias"]
    return merged


def _is_lora_entry(name: str) -> bool:
    return BASE in name or ".lora_A." in name or ".lora_B." in name
