"""How much faster this machine multiplies in bf16 than in fp32: what plan.precision="auto" bets on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.distributed.precision import PrecisionChoice, resolve_precision
from plait.train.peak import measure_matmul_flops


@dataclass(frozen=True)
class PrecisionGain:
    """A square matmul's rate in fp32 and bf16 on `threads` CPU threads, and what auto picks here."""

    size: int
    threads: int
    fp32_flops: float
    bf16_flops: float
    choice: PrecisionChoice

    @property
    def gain(self) -> float:
        """bf16's rate over fp32's (above 1: bf16 runs faster)."""
        return self.bf16_flops / self.fp32_flops

    def line(self) -> str:
        """e.g. `bf16 vs fp32 here (1 thread, 2048^3 matmul): 905 vs 148 GFLOP/s, x6.11; plan.precision=auto
        -> bf16 (the CPU has amx_bf16 and avx512_bf16)`."""
        return (
            f"bf16 vs fp32 here ({self.threads} thread{'s' * (self.threads != 1)}, {self.size}^3 matmul): "
            f"{self.bf16_flops / 1e9:.0f} vs {self.fp32_flops / 1e9:.0f} GFLOP/s, x{self.gain:.2f}; "
            f"plan.precision=auto -> {self.choice.precision} ({self.choice.reason})"
        )


def measure_precision_gain(*, size: int = 2048, threads: int = 1) -> PrecisionGain:
    """Time a size^3 matmul in fp32 and in bf16 on `threads` threads (one, as each CPU rank runs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu = torch.device("cpu")
        fp32 = measure_matmul_flops(size, dtype=torch.float32, device=cpu)
        bf16 = measure_matmul_flops(size, dtype=torch.bfloat16, device=cpu)
    finally:
        torch.set_num_threads(previous)
    choice = resolve_precision("auto", device_type="cpu")
    return PrecisionGain(size=size, threads=threads, fp32_flops=fp32, bf16_flops=bf16, choice=choice)
