"""Apply context parallel to a model: ring attention in every attention layer, batches split per cp rank."""

from __future__ import annotations

from torch import nn

from plait.context.attention import RingAttention
from plait.context.batch import Batch, shard_batch
from plait.context.ring import Ring
from plait.distributed.comm import CommCounter
from plait.distributed.mesh import Mesh


class ContextParallel:
    """What the engine keeps of context parallel: the ring, and how to cut a batch for this rank."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring

    def shard(self, batch: Batch) -> Batch:
        return shard_batch(batch, rank=self.ring.rank, size=self.ring.size)


def check_context_parallel(model: nn.Module) -> list[nn.Module]:
    """The model's attention layers that take ring attention; raises for a model without them."""
    layers = [module for module in model.modules() if hasattr(module, "context_attention")]
    if not layers:
        raise ValueError(
            f"plan.cp > 1 needs plait's GPT models (attention layers with a context_attention slot); "
            f"{type(model).__name__} has none (Hugging Face models are not available under cp yet): set plan.cp=1"
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
    for layer in check_context_parallel(model):
        layer.context_attention = attention
    return ContextParallel(ring)
