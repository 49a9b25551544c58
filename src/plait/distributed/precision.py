"""plan.precision="auto": bf16 where the hardware computes in it natively, fp32 elsewhere.

Native means matrix units that take bf16: on x86 CPUs AMX tiles (``amx_bf16``) or AVX-512's bf16
dot products (``avx512_bf16``); on NVIDIA GPUs compute capability 8.0 (Ampere) or later. Without them
bf16 is emulated and slower than fp32 (an AVX2 EPYC ran a bf16 matmul at ~1.3 GFLOP/s against ~25 in
fp32), so auto keeps fp32 there. fp16 is never picked: it needs loss scaling. An explicit precision
always wins.

    >>> resolve_precision("auto", device_type="cpu", cpu_flags={"avx512f", "amx_bf16"}).precision
    'bf16'
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

AUTO = "auto"
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo's names for the bf16 matrix/dot units
CUDA_BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores


@dataclass(frozen=True)
class PrecisionChoice:
    """What plan.precision asked for, what runs, and why."""

    requested: str
    precision: str
    reason: str

    def line(self) -> str:
        """One log line, e.g. `precision: auto -> bf16 (the CPU has amx_bf16)`."""
        if self.requested != AUTO:
            return f"precision: {self.precision} (set explicitly)"
        return f"precision: auto -> {self.precision} ({self.reason})"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo's first `flags` line (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _torch_cpu_bf16_units() -> tuple[str, ...]:
    """The bf16 units torch's own CPU probe (cpuinfo) reports, where /proc/cpuinfo is missing (macOS, some
    containers); torch keeps the probes private (torch.cpu._is_*), so a torch without them reports none.
    AMX tiles stand for amx_bf16: every CPU with the tiles has the bf16 tile instructions."""
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return tuple(name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)())


def cpu_bf16_units(flags: Iterable[str] | None = None) -> tuple[str, ...]:
    """The bf16 units of this CPU (or of the given /proc/cpuinfo `flags`), in CPU_BF16_FLAGS' order."""
    if flags is None:
        found = cpu_flags()
        return tuple(f for f in CPU_BF16_FLAGS if f in found) if found else _torch_cpu_bf16_units()
    given = set(flags)
    return tuple(f for f in CPU_BF16_FLAGS if f in given)


def resolve_precision(
    requested: str,
    *,
    device_type: str,
    cpu_flags: Iterable[str] | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> PrecisionChoice:
    """The precision a run uses: `requested` unless it is "auto", which picks by the hardware.

    `cpu_flags` (/proc/cpuinfo names) and `cuda_capability` stand in for this machine's in tests.
    """
    if requested != AUTO:
        return PrecisionChoice(requested, requested, "set explicitly")
    if device_type == "cuda":
        capability = cuda_capability if cuda_capability is not None else torch.cuda.get_device_capability()
        version = f"compute capability {capability[0]}.{capability[1]}"
        if tuple(capability) >= CUDA_BF16_CAPABILITY:
            return PrecisionChoice(AUTO, "bf16", f"the GPU has bf16 tensor cores, {version}")
        return PrecisionChoice(AUTO, "fp32", f"the GPU has no bf16 tensor cores ({version} < 8.0)")
    if device_type == "cpu":
        units = cpu_bf16_units(cpu_flags)
        if units:
            return PrecisionChoice(AUTO, "bf16", f"the CPU has {' and '.join(units)}")
        return PrecisionChoice(AUTO, "fp32", "the CPU has neither amx_bf16 nor avx512_bf16: bf16 would be emulated")
    return PrecisionChoice(AUTO, "fp32", f"no bf16 rule for device type {device_type!r}")


def agree_on_precision(choice: PrecisionChoice, *, device_type: str) -> PrecisionChoice:
    """Every rank's "auto" choice made one: fp32 if any rank resolved fp32 (a machine of another kind
    among the nodes), since ranks that exchange activations or gradients must hold one dtype. Collective
    over the default group on CPU ranks (gloo), whose machines differ from day to day; a no-op for an
    explicit precision, without a process group, and on GPUs (one job's GPUs are one kind in practice,
    and an NCCL collective here would need each rank's device set before the mesh exists)."""
    if choice.requested != AUTO or not dist.is_initialized() or dist.get_world_size() == 1:
        return choice
    if device_type != "cpu" or dist.get_backend() != "gloo":
        return choice
    flag = torch.tensor([int(choice.precision == "bf16")])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if choice.precision == "bf16" and not flag.item():
        return PrecisionChoice(
            AUTO, "fp32", f"another rank's {device_type} has no bf16 units (this one: {choice.reason})"
        )
    return choice
