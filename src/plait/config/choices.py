"""The choices config fields take, and the one check every section's __post_init__ makes."""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where the hardware has it (plait.distributed.precision)
RECOMPUTE_MODES = ("none", "full", "selective")
COMPILE_MODES = ("off", "blocks", "full")  # plait.compile
AXES = ("pp", "dp", "cp", "tp")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
REDUCE_OPS = ("auto", "reduce_scatter", "all_reduce")
ZERO3_GATHER_MODES = ("auto", "microbatch", "step")
ZERO_SHARD_MODES = ("all", "node")
OFFLOAD_TIERS = ("none", "cpu", "disk", "auto")
OFFLOADED_STATES = ("optimizer", "gradients", "params")
NONFINITE_ACTIONS = ("stop", "skip")
LR_SCHEDULES = ("cosine", "poly", "lars")  # plait.optim.schedules.lr_schedule
OPTIMIZERS = ("adamw", "lamb", "lars")
TASKS = ("causal_lm", "masked_lm", "masked_lm_sop", "span_corruption", "image_classification")


def require(condition: bool, message: str) -> None:
    """ValueError(message) unless condition: every refusal names the field and the fix."""
    if not condition:
        raise ValueError(message)
