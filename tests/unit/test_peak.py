"""The MFU peak: a matmul measured in the run's precision, described in one log line."""

from __future__ import annotations

import pytest
import torch

from plait.train.peak import PeakFlops, cuda_bf16_peak, default_peak_size, measure_peak


def test_the_line_shows_the_measured_rate_and_the_data_sheet_beside_it() -> None:
    gpu = PeakFlops(790.2e12, "bf16", 8192, "NVIDIA H200", datasheet_flops=cuda_bf16_peak("NVIDIA H200"))
    assert gpu.line() == (
        "MFU peak: 8192^3 bf16 matmul 790.2 TFLOP/s measured on NVIDIA H200 (data sheet 989.0 TFLOP/s dense bf16)"
    )
    cpu = PeakFlops(739.1e9, "bf16", 2048, "Xeon", threads=1)
    assert cpu.line() == "MFU peak: 2048^3 bf16 matmul 739.1 GFLOP/s measured on Xeon, 1 thread"
    assert PeakFlops(1e11, "fp32", 2048, "Xeon", threads=2).line().endswith("on Xeon, 2 threads")


def test_sizes_by_device() -> None:
    assert default_peak_size("cuda") == 8192 and default_peak_size("cpu") == 2048


@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_the_cpu_peak_is_measured_in_the_given_dtype_on_the_current_threads(dtype: torch.dtype, name: str) -> None:
    peak = measure_peak(torch.device("cpu"), dtype=dtype, size=128)
    assert peak.dtype == name and peak.size == 128 and peak.flops > 1e6
    assert peak.threads == torch.get_num_threads() and peak.datasheet_flops is None


def test_an_unsupported_device_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="use a cpu or cuda device"):
        measure_peak(torch.device("meta"))
