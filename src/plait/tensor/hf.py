"""Tensor parallel for Hugging Face models: plans, early checks, HF's own loss, sharded loading.

    engine = plait.boost(transformers.LlamaForCausalLM(config), optimizer=..., loss_fn=plait.losses.causal_lm,
                         plan=plait.Plan(dp=1, tp=2))            # the engine calls apply_hf_tensor_parallel

    # or straight from a checkpoint, each rank reading only its own slices:
    model = load_pretrained_tp(transformers.AutoModel, "path/to/checkpoint", group=tp_group)

The plan comes from `tp_plan_for(model)` (the config's `base_model_tp_plan`, else recognised layer
names). Sequence parallel is not offered for HF models: their forward builds position ids, rotary
tables and attention masks from the sequence length it sees, which would be the local chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.tensor.apply import apply_tensor_parallel
from plait.tensor.comm import tp_rank_and_size
from plait.tensor.cross_entropy import is_vocab_sharded, vocab_parallel_cross_entropy
from plait.tensor.hf_load import ReadStats, build_on_meta, checkpoint_files, materialize
from plait.tensor.hf_plans import check_tp, tp_plan_for
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
    stays right with sharded logits.
    """
    if group is None:
        return []
    if sequence_parallel:
        raise ValueError(
            "sequence parallel is not available for Hugging Face models (their forward builds positions and "
            "attention masks from the sequence length, which would be the local chunk); set plan.sequence_parallel=False"
        )
    done = _already_parallel(model, group)
    if done:
        return done
    plan = tp_plan_for(model)
    check_tp(model, dist.get_world_size(group), plan=plan)
    changed = apply_tensor_parallel(model, plan, group=group, sequence_parallel=False)
    _use_vocab_parallel_loss(model)
    return changed


def load_pretrained_tp(
    model_cls: Any,
    path: str | Path,
    *,
    group: dist.ProcessGroup | None,
    config: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    stats: ReadStats | None = None,
) -> nn.Module:
    """An HF model from a safetensors checkpoint, split over `group`, without the full model on any rank.

    `model_cls` is a model class or an Auto class (`AutoModelForCausalLM`); `config` defaults to
    the checkpoint's (pass one to change e.g. dropout). The model is built on the meta device, the
    plan applied there, then every parameter is read as this rank's slice only; buffers are rebuilt
    by the model's own init or read from the file. `stats` (a ReadStats) counts the bytes read.
    Returns the model in eval mode, as `from_pretrained` does. Call it on every rank of `group`.

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
    apply_hf_tensor_parallel(model, group=group, sequence_parallel=False)
    rank, size = tp_rank_and_size(group)
    materialize(model, files, rank=rank, size=size, device=torch.device(device), stats=stats or ReadStats())
    return model.eval()


def _already_parallel(model: nn.Module, group: dist.ProcessGroup) -> list[str]:
    names = [name for name, module in model.named_modules() if isinstance(module, PARALLEL_MODULES)]
    for name in names:
        held = tp_rank_and_size(model.get_submodule(name).group)
        if held != tp_rank_and_size(group):
            raise ValueError(
                f"{name} is already tensor-parallel as rank {held[0]} of {held[1]}, but the plan puts this process "
                f"at rank {dist.get_rank(group)} of tp={dist.get_world_size(group)}; load the model with the "
                "plan's tp group (mesh.group('tp'))"
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

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        shard = is_vocab_sharded(logits)
        if shard is None:
            options = {"ignore_index": ignore_index, "shift_labels": shift_labels, **kwargs}
            return self.original(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch, **options)
        if not self.causal:
            raise ValueError(
                "this model's Hugging Face loss cannot read vocab-parallel logits; leave `labels` out of the "
                "batch the model sees and compute the loss in loss_fn with plait.tensor.vocab_parallel_cross_entropy"
            )
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = shift_labels.to(logits.device)
        per_token = vocab_parallel_cross_entropy(logits, targets, shard=shard, ignore_index=ignore_index)
        count = num_items_in_batch if num_items_in_batch is not None else (targets != ignore_index).sum()
        return per_token.sum() / count
