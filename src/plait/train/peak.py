"""The matmul peak MFU is measured against: a large matmul in the run's precision on this machine.

On CPU it runs on the rank's torch threads (one per rank under `plait train`), so it is the
peak of what the rank can use; on GPU the measured rate is shown beside the data-sheet figure,
which the tensor cores rarely reach (an H200 measures ~790 of its 989 bf16 TFLOP/s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s.
# Variants come before their family name so the first substring match wins.
_CUDA_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def measure_matmul_flops(size: int, *, dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """FLOP/s of a size x size x size matmul on `device` in `dtype`: 2 * size^3 / seconds, best of `repeats`.

    On CUDA each timing covers ten back-to-back products between synchronisations, so launch
    latency and the host's timer do not enter a ~1 ms kernel's time; on CPU one product each.
    """
    device = torch.device(device)
    per_timing = 10 if device.type == "cuda" else 1
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3 if device.type == "cuda" else 1):  # warm-up: allocation, kernel choice, clocks, threads
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(per_timing):
            torch.mm(a, b)
        _synchronize(device)
        best = min(best, (time.perf_counter() - start) / per_timing)
    return 2.0 * size**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_bf16_peak(name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU by its device name, or None when unknown."""
    for key, peak in _CUDA_BF16_PEAKS:
        if key.lower() in name.lower():
            return peak
    return None


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class PeakFlops:
    """One rank's matmul peak in the run's precision, the denominator of MFU, and where it came from.

    `flops` is measured (2 * size^3 / seconds); `datasheet_flops` is the vendor's dense figure for
    that precision where one is known (16-bit on the GPUs of the table), shown beside it.
    """

    flops: float
    dtype: str
    size: int
    device_name: str
    threads: int | None = None  # CPU: the torch threads the product ran on (one per rank under plait train)
    datasheet_flops: float | None = None

    def line(self) -> str:
        """The measurement in one log line, e.g. `MFU peak: 8192^3 bf16 matmul 790.2 TFLOP/s measured on
        NVIDIA H200 (data sheet 989.0 TFLOP/s dense bf16)`."""
        where = self.device_name + (f", {self.threads} thread{'s' * (self.threads != 1)}" if self.threads else "")
        text = f"MFU peak: {self.size}^3 {self.dtype} matmul {_flops_text(self.flops)} measured on {where}"
        if self.datasheet_flops is not None:
            text += f" (data sheet {_flops_text(self.datasheet_flops)} dense {self.dtype})"
        return text


def _flops_text(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def default_peak_size(device_type: str) -> int:
    """The matmul size the peak is measured at: 8192 on a GPU (a ~1 ms product, near the tensor cores'
    rate), 2048 on a CPU (~0.1 s in fp32 on one AVX-512 thread)."""
    return 8192 if device_type == "cuda" else 2048


def measure_peak(device: torch.device, *, dtype: torch.dtype = torch.float32, size: int | None = None) -> PeakFlops:
    """Measure one rank's matmul peak in `dtype` (the run's precision): a size x size matmul, warmed up,
    best of 3, on the current torch thread count (plait train sets one thread per rank on CPU).

    peak = 2 * size^3 / seconds
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"cannot measure peak FLOP/s on device type {device.type!r}; use a cpu or cuda device")
    size = size if size is not None else default_peak_size(device.type)
    flops = measure_matmul_flops(size, dtype=dtype, device=device)
    name = _DTYPE_NAMES.get(dtype, str(dtype))
    if device.type == "cpu":
        return PeakFlops(flops, name, size, _cpu_name(), threads=torch.get_num_threads())
    device_name = torch.cuda.get_device_name(device)
    datasheet = cuda_bf16_peak(device_name) if dtype in (torch.bfloat16, torch.float16) else None
    return PeakFlops(flops, name, size, device_name, datasheet_flops=datasheet)


def measure_peak_flops(device: torch.device, *, size: int | None = None, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of one rank's device in `dtype`, measured (see `measure_peak`)."""
    return measure_peak(device, dtype=dtype, size=size).flops


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
