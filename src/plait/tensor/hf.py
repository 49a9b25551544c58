"""Tensor parallel for Hugging Face models: plans, early checks, HF's own loss, sharded loading.

    engine = plait.boost(transformers.LlamaForCausalLM(config), optimizer=..., loss_fn=plait.losses.causal_lm,
                         plan=plait.Plan(dp=1, tp=2))            # the engine calls apply_hf_tensor_parallel

    # or straight from a checkpoint, each rank reading only its own slices:
    model = load_pretrained_tp(transformers.AutoModel, "path/to/checkpoint", group=tp_group)

The plan comes from `tp_plan_for(model)` (the config's `base_model_tp_plan`, else the `tp_styles` of
the model's entry in plait's architecture registry). Attention modules get their head counts divided
by tp, and what else they read per head follows (`plait.tensor.hf_attention`: a per-rank config copy
for Phi3, this rank's heads of Falcon's alibi bias).
Sequence parallel brackets the layer stack (see `plait.tensor.hf_sequence`): the model's own forward
keeps deriving positions and masks from the whole sequence.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.tensor.apply import HEAD_ATTRIBUTES, Style, _as_style, apply_tensor_parallel
from plait.tensor.comm import tp_rank_and_size
from plait.tensor.cross_entropy import is_vocab_sharded, vocab_parallel_cross_entropy
from plait.tensor.hf_attention import shrink_attention_configs, slice_head_biases
from plait.tensor.hf_load import ReadStats, build_on_meta, checkpoint_files, materialize
from plait.tensor.hf_plans import input_features, output_features, tp_plan_for
from plait.tensor.hf_sequence import bracket_layers, sequence_parallel_plan
from plait.tensor.layers import ColumnParallelLinear, RowParallelLinear
from plait.tensor.vocab import VocabParallelEmbedding, VocabParallelHead

__all__ = ["ReadStats", "apply_hf_tensor_parallel", "check_tp", "load_pretrained_tp", "tp_plan_for"]

PARALLEL_MODULES = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead)
CAUSAL_LOSS_TYPES = (None, "ForCausalLM")  # GPT2LMHeadModel's loss_type is None: HF falls back to causal LM


def apply_hf_tensor_parallel(
    model: nn.Module, *, group: dist.ProcessGroup | None, sequence_parallel: bool = False
) -> list[str]:
    """Parallelise a Hugging Face model in place by `tp_plan_for(model)`; returns the changed module names.

    Checks divisibility before touching anything. A model that is already parallel over a group of the
    same size and rank (from `load_pretrained_tp`) is left as it is. Also gives the model a
    vocab-parallel `loss_function`, so the loss HF computes itself when the batch carries `labels`
    stays right with sharded logits. Under `sequence_parallel` the sequence length must divide by tp.
    """
    if group is None:
        return []
    done = _already_parallel(model, group, sequence_parallel=sequence_parallel)
    if done:
        return done
    tp = dist.get_world_size(group)
    plan = tp_plan_for(model)
    check_tp(model, tp, plan=plan)
    if sequence_parallel:
        plan = sequence_parallel_plan(model, plan)
    changed = apply_tensor_parallel(model, plan, group=group, sequence_parallel=sequence_parallel)
    if sequence_parallel:
        bracket_layers(model, group=group)
    shrink_attention_configs(model, plan, tp=tp)
    config = getattr(model, "config", None)
    if getattr(config, "alibi", False) is True:  # Falcon's per-head position bias, built for all heads
        slice_head_biases(model, plan, group=group, num_heads=config.num_attention_heads)
    _use_vocab_parallel_loss(model)
    return changed


def check_tp(
    model: nn.Module, tp: int, *, world_size: int | None = None, plan: Mapping[str, str | Style] | None = None
) -> None:
    """Raise ValueError, before any collective, when `model` cannot be split over `tp` ranks.

    Checks the config's head counts and sizes, then every module the plan (by default the model's
    `tp_plan()` or `tp_plan_for(model)`) shards, and names the nearest tp values that work.
    Reads only names, shapes and the config, so a meta-device model works.

        check_tp(model, 3)  # ValueError: tp=3 does not divide attention heads (num_attention_heads)=4, ...
    """
    if tp < 1:
        raise ValueError(f"tp={tp}: the tensor-parallel size must be a positive integer")
    if world_size is not None and tp > world_size:
        raise ValueError(
            f"tp={tp} is larger than the world of {world_size} ranks; use a tp that divides {world_size} "
            f"or launch at least {tp} ranks"
        )
    if tp == 1:
        return
    if plan is None:
        plan_of = getattr(model, "tp_plan", None)  # plait's models: a method; HF's: a dict of HF styles
        plan = plan_of() if callable(plan_of) else tp_plan_for(model)
    named, structural = _config_constraints(model), _plan_constraints(model, plan)
    # The config's names say it best; the modules' own sizes speak when the config has none to blame.
    bad = [f"{what}={value}" for what, value in named if value % tp]
    bad = bad or [f"{what}={value}" for what, value in structural if value % tp]
    if bad:
        valid = _divisors(math.gcd(*(value for _, value in named + structural)))
        nearest = min(valid, key=lambda d: (abs(d - tp), d))
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ValueError(
            f"tp={tp} does not divide {shown} of {type(model).__name__}; valid tp values for this model: "
            f"{', '.join(map(str, valid))} (nearest: {nearest})"
        )


CONFIG_SIZES = (
    ("attention heads", "num_attention_heads"),
    ("KV heads", "num_key_value_heads"),
    ("KV heads", "num_kv_heads"),  # Falcon's name
    ("hidden size", "hidden_size"),
    ("intermediate size", "intermediate_size"),
    ("intermediate size", "n_inner"),  # GPT-2's name; None means 4 x hidden, checked through the plan
)


def _config_constraints(model: nn.Module) -> list[tuple[str, int]]:
    config = getattr(model, "config", None)
    out = []
    for what, attr in CONFIG_SIZES:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out.append((f"{what} ({attr})", value))
    return out


def _plan_constraints(model: nn.Module, plan: Mapping[str, str | Style]) -> list[tuple[str, int]]:
    """What each plan pattern splits, read from the first module it governs."""
    out: list[tuple[str, int]] = []
    seen = set()
    for name, module in model.named_modules():
        pattern = next((p for p in plan if fnmatch.fnmatchcase(name, p)), None) if name else None
        if pattern is None or pattern in seen:
            continue  # the first pattern that matches a module governs it, as in apply_tensor_parallel
        seen.add(pattern)
        out += _module_constraints(module, pattern, _as_style(plan[pattern]))
    return out


def _module_constraints(module: nn.Module, pattern: str, style: Style) -> list[tuple[str, int]]:
    if style.kind == "colwise":
        segments = style.partition or (output_features(module),)
        return [(f"{pattern} output features", segment) for segment in segments]
    if style.kind == "rowwise":
        return [(f"{pattern} input features", input_features(module))]
    if style.kind == "experts":
        return [(f"{pattern} expert width", module.up_weight.shape[1])]
    if style.kind == "heads":
        values = [(attr, getattr(module, attr, None)) for attr in HEAD_ATTRIBUTES]
        return [(f"{pattern}.{attr}", v) for attr, v in values if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


def load_pretrained_tp(
    model_cls: Any,
    path: str | Path,
    *,
    group: dist.ProcessGroup | None,
    config: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    stats: ReadStats | None = None,
    sequence_parallel: bool = False,
) -> nn.Module:
    """An HF model from a safetensors checkpoint, split over `group`, without the full model on any rank.

    `model_cls` is a model class or an Auto class (`AutoModelForCausalLM`); `config` defaults to
    the checkpoint's (pass one to change e.g. dropout). The model is built on the meta device, the
    plan applied there, then every parameter is read as this rank's slice only; buffers are rebuilt
    by the model's own init or read from the file. `stats` (a ReadStats) counts the bytes read.
    `sequence_parallel` must match the plan the model will train under. Returns the model in eval
    mode, as `from_pretrained` does. Call it on every rank of `group`.

        model = load_pretrained_tp(AutoModel, "ckpt/", group=mesh.group("tp"))
        engine = plait.boost(model, mesh=mesh, optimizer=..., loss_fn=...)
    """
    files = checkpoint_files(path)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(Path(path).parent if Path(path).is_file() else path)
    model = build_on_meta(model_cls, config)
    if dtype is not None:
        model.to(dtype)
    apply_hf_tensor_parallel(model, group=group, sequence_parallel=sequence_parallel)
    rank, size = tp_rank_and_size(group)
    materialize(model, files, rank=rank, size=size, device=torch.device(device), stats=stats or ReadStats())
    return model.eval()


def _already_parallel(model: nn.Module, group: dist.ProcessGroup, *, sequence_parallel: bool) -> list[str]:
    names = [name for name, module in model.named_modules() if isinstance(module, PARALLEL_MODULES)]
    for name in names:
        held = tp_rank_and_size(model.get_submodule(name).group)
        if held != tp_rank_and_size(group):
            raise ValueError(
                f"{name} is already tensor-parallel as rank {held[0]} of {held[1]}, but the plan puts this process "
                f"at rank {dist.get_rank(group)} of tp={dist.get_world_size(group)}; load the model with the "
                "plan's tp group (mesh.group('tp'))"
            )
    held_sp = any(getattr(module, "hidden_states_hooks", None) for module in model.modules())
    if names and held_sp != sequence_parallel:
        raise ValueError(
            f"the model is already tensor-parallel with sequence_parallel={held_sp}, but the plan asks for "
            f"sequence_parallel={sequence_parallel}; load it with load_pretrained_tp(..., "
            f"sequence_parallel={sequence_parallel}), or change plan.sequence_parallel"
        )
    return names


def _use_vocab_parallel_loss(model: nn.Module) -> None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if not isinstance(head, VocabParallelHead) or not hasattr(type(model), "loss_function"):
        return
    if not isinstance(model.loss_function, VocabParallelHFLoss):
        causal = getattr(model, "loss_type", None) in CAUSAL_LOSS_TYPES
        model.loss_function = VocabParallelHFLoss(model.loss_function, causal=causal)


class VocabParallelHFLoss:
    """HF's causal-LM `loss_function` (`ForCausalLMLoss`) for a vocab-parallel head's local logits.

    Set on the model instance (HF's own setter), so `model(input_ids=..., labels=...)` returns the
    right `.loss` under tensor parallel; HF's loss would read the local logits as a full vocabulary.
    Unsharded logits go to HF's original loss.
    """

    def __init__(self, original: Any, *, causal: bool) -> None:
        self.original = original
        self.causal = causal

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any) -> torch.Tensor:
        shard = is_vocab_sharded(logits)
        if shard is None:
            return self.original(logits, labels, vocab_size, **kwargs)
        if not self.causal:
            raise ValueError(
                "this model's Hugging Face loss cannot read vocab-parallel logits; leave `labels` out of the "
                "batch the model sees and compute the loss in loss_fn with plait.tensor.vocab_parallel_cross_entropy"
            )
        ignore_index = kwargs.get("ignore_index", -100)
        targets = kwargs.get("shift_labels")
        if targets is None:
            targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # position t predicts label t + 1
        targets = targets.to(logits.device)
        per_token = vocab_parallel_cross_entropy(logits, targets, shard=shard, ignore_index=ignore_index)
        count = kwargs.get("num_items_in_batch")
        return per_token.sum() / (count if count is not None else (targets != ignore_index).sum())
