"""What one training step processes, and the per-stage layout a plan implies."""

from __future__ import annotations

from dataclasses import dataclass

PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Workload:
    """`global_batch` sequences of `seq_len` tokens per optimizer step, all ranks together; `clips`: the
    step clips the gradient norm (plait train's default `max_grad_norm=1.0`), which decides when an
    offloaded optimizer can update (see `plait.planner.offload`)."""

    global_batch: int
    seq_len: int
    clips: bool = True

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.seq_len < 2:
            raise ValueError(
                f"workload global_batch={self.global_batch}, seq_len={self.seq_len}: use at least one "
                "sequence per step and two tokens per sequence"
            )

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    def micro_batch(self, *, dp: int, microbatches: int) -> int:
        """Sequences per micro-batch on one rank (the caller has checked that they divide)."""
        return self.global_batch // dp // microbatches
