"""Apply context parallel to a model: ring attention in every attention layer, batches split per cp rank."""

from __future__ import annotations

from torch import nn

from plait.context.attention import RingAttention
from plait.context.batch import Batch, shard_batch
from plait.context.hf import apply_hf, is_hf_model
from plait.context.ring import Ring
from plait.distributed.comm import CommCounter
from plait.distributed.mesh import Mesh


class ContextParallel:
    """What the engine keeps of context parallel: the ring, and how to cut a batch for this rank."""

    def __init__(self, ring: Ring, *, hf: bool = False) -> None:
        self.ring = ring
        self.hf = hf  # a Hugging Face model: (batch, seq) position ids, one sequence per row

    def shard(self, batch: Batch) -> Batch:
        if self.hf and "position_ids" in batch:
            raise ValueError(
                "packed documents (a batch with position_ids) under plan.cp are available for plait's GPT models only; "
                "for a Hugging Face model feed whole rows (no position_ids) or set plan.cp=1"
            )
        shard = shard_batch(batch, rank=self.ring.rank, size=self.ring.size)
        if self.hf:  # transformers' rotary embeddings take (batch, seq)
            shard["position_ids"] = shard["position_ids"].expand(batch["input_ids"].shape[0], -1)
        return shard


def check_context_parallel(model: nn.Module) -> list[nn.Module]:
    """The model's attention layers that take ring attention; raises for a model without them."""
    layers = [module for module in model.modules() if hasattr(module, "context_attention")]
    if not layers:
        raise ValueError(
            f"plan.cp > 1 needs plait's GPT models (attention layers with a context_attention slot) or a Hugging "
            f"Face causal LM; {type(model).__name__} is neither: set plan.cp=1"
        )
    for layer in layers:
        if getattr(layer, "attn_dropout", 0.0) > 0:
            raise ValueError(
                f"attention dropout ({layer.attn_dropout}) under plan.cp is not available yet in plait; "
                "set the model's dropout to 0 or plan.cp=1"
            )
    return layers


def apply_context_parallel(model: nn.Module, *, mesh: Mesh, counter: CommCounter | None = None) -> ContextParallel:
    """Give every attention layer of ``model`` ring attention over ``mesh``'s cp group."""
    group = mesh.group("cp")
    assert group is not None, "context parallel needs plan.cp > 1"
    ring = Ring(group=group, rank=mesh.rank("cp"), size=mesh.size("cp"), ranks=mesh.ranks("cp"), counter=counter)
    attention = RingAttention(ring)
    if is_hf_model(model):
        for axis in ("tp", "pp"):
            if mesh.size(axis) > 1:
                raise ValueError(
                    f"plan.cp with plan.{axis} > 1 on a Hugging Face model is not available yet in plait (cp is "
                    f"checked alone and with dp); set plan.{axis}=1 or plan.cp=1"
                )
        apply_hf(model, attention)
        return ContextParallel(ring, hf=True)
    for layer in check_context_parallel(model):
        layer.context_attention = attention
    return ContextParallel(ring)
