"""What a Hugging Face attention module needs under tensor parallel besides smaller head counts.

Each rank runs the attention on its own contiguous block of heads (the column layers split q/k/v,
or a fused projection, head-aligned). Two things the module reads from outside must follow:

- its config, when its forward reads head counts there (Phi3 splits its fused `qkv_proj` by
  `self.config.num_attention_heads`): the module gets its own shallow copy with this rank's
  counts (an instance attribute; set the attention implementation before tensor parallel, since
  a later `set_attn_implementation` updates the model's config, not the copies);
- per-head inputs the model's forward builds for all heads (Falcon's alibi bias, and the
  attention mask it is folded into): a forward pre-hook hands the module this rank's heads.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from plait.tensor.apply import Style, _as_style
from plait.tensor.comm import ProcessGroup, tp_rank_and_size

CONFIG_HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads", "num_kv_heads")


def attention_modules(model: nn.Module, plan: Mapping[str, str | Style]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module the plan gives "heads" (the first matching pattern governs)."""
    out = []
    for name, module in model.named_modules():
        pattern = next((p for p in plan if name and fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None and _as_style(plan[pattern]).kind == "heads":
            out.append((name, module))
    return out


def shrink_attention_configs(model: nn.Module, plan: Mapping[str, str | Style], *, tp: int) -> None:
    """Give each attention module that holds a config its own copy with this rank's head counts."""
    copies: dict[int, Any] = {}  # one copy per shared config
    for _, module in attention_modules(model, plan):
        config = getattr(module, "config", None)
        if any(isinstance(getattr(config, attr, None), int) for attr in CONFIG_HEAD_COUNTS):
            if id(config) not in copies:
                copies[id(config)] = _per_rank_config(config, tp=tp)
            module.config = copies[id(config)]


def _per_rank_config(config: Any, *, tp: int) -> Any:
    local = copy.copy(config)
    for attr in CONFIG_HEAD_COUNTS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value % tp == 0:
            setattr(local, attr, value // tp)
    return local


def slice_head_biases(
    model: nn.Module, plan: Mapping[str, str | Style], *, group: ProcessGroup | None, num_heads: int
) -> None:
    """Hand each attention module this rank's heads of the `alibi` bias it is called with (and of the
    attention mask when the bias is folded into it, one (query, key) plane per head)."""
    for name, module in attention_modules(model, plan):
        module.register_forward_pre_hook(_HeadSlicer(group, num_heads=num_heads, name=name), with_kwargs=True)


class _HeadSlicer:
    def __init__(self, group: ProcessGroup | None, *, num_heads: int, name: str) -> None:
        rank, size = tp_rank_and_size(group)
        self.num_heads, self.name = num_heads, name
        self.start, self.count = rank * num_heads // size, num_heads // size

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        mask = kwargs.get("attention_mask")
        if kwargs.get("alibi") is None:
            if len(args) > 1 and args[1] is not None:
                raise ValueError(f"{self.name} got its alibi bias positionally; plait slices it only as alibi=")
            # newer transformers fold the bias into a per-head mask before the layers and pass no alibi
            return args, {**kwargs, "attention_mask": self._own_heads(mask)} if "attention_mask" in kwargs else kwargs
        alibi = kwargs["alibi"]
        if alibi.dim() == 3:  # (batch * heads, 1, key)
            alibi = alibi.unflatten(0, (-1, self.num_heads)).narrow(1, self.start, self.count).flatten(0, 1)
        else:  # (batch, heads, 1, key)
            alibi = self._own_heads(alibi)
        return args, {**kwargs, "alibi": alibi, "attention_mask": self._own_heads(mask)}

    def _own_heads(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's heads of a (batch, heads, query, key) tensor; one plane for all heads stays."""
        if tensor is None or tensor.dim() != 4 or tensor.shape[1] != self.num_heads:
            return tensor
        return tensor.narrow(1, self.start, self.count)
