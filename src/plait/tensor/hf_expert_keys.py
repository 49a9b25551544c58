"""Stacked expert parameters of a checkpoint that stores one tensor per expert.

transformers 5 stacks an MoE layer's experts (``mlp.experts.gate_up_proj`` (E, 2 * d_ff, d) =
[gate; up] per expert, ``mlp.experts.down_proj`` (E, d, d_ff)) and converts, when it loads, the
per-expert files that Mixtral's and the Qwen-MoEs' checkpoints hold and its own ``save_pretrained``
writes (Mixtral's under ``block_sparse_moe``, with ``w1``/``w3``/``w2``). The tensor-parallel reader
finds those keys here and assembles the stacked tensor from them (experts are never split over tp).
"""

from __future__ import annotations

from collections.abc import Collection

# a stacked parameter -> the per-expert weights concatenated into it, in order, as each family names them
_PARTS = {
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}
_BLOCKS = (".mlp", ".block_sparse_moe")  # the model's block name; Mixtral's checkpoints' block name


def _blocks_of(base: str) -> list[str]:
    """``base`` (``...layers.0.mlp``) and its Mixtral-checkpoint spelling (``...layers.0.block_sparse_moe``)."""
    model_block, file_block = _BLOCKS
    return [base, base.removesuffix(model_block) + file_block] if base.endswith(model_block) else [base]


def per_expert_keys(name: str, keys: Collection[str]) -> list[list[str]] | None:
    """For a stacked expert parameter ``name``, each expert's checkpoint keys (``[[gate_0, up_0], ...]``),
    or None when ``name`` is not one or ``keys`` hold no per-expert tensors for it."""
    base, _, stacked = name.rpartition(".experts.")
    for block in _blocks_of(base) if stacked in _PARTS else []:
        for parts in _PARTS[stacked]:
            count = 0
            while all(f"{block}.experts.{count}.{part}.weight" in keys for part in parts):
                count += 1
            if count:
                return [[f"{block}.experts.{j}.{part}.weight" for part in parts] for j in range(count)]
    return None


def file_spellings(name: str) -> list[str]:
    """``name`` and how a Mixtral checkpoint spells it (its router ``mlp.gate`` is ``block_sparse_moe.gate``)."""
    base, dot, leaf = name.rpartition(".gate.")
    return [name] if not dot else [name, *(f"{block}.gate.{leaf}" for block in _blocks_of(base)[1:])]
