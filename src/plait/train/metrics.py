"""Every measured quantity in plait, each computed in one place, formula in the docstring: here, or
for model-state bytes plait.distributed.memory (the engine reaches it without the loop) and for the
matmul peak plait.train.peak, re-exported here.

Throughput, model FLOPs, MFU, bytes of model state, resident memory and bytes communicated.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plait.distributed.comm import AXIS_LABELS, LINKS, CommCounter
from plait.distributed.memory import model_state_bytes as model_state_bytes  # counted there, listed here
from plait.moe import collect_stats
from plait.train.peak import PeakFlops as PeakFlops  # measured there, listed here
from plait.train.peak import cuda_bf16_peak as cuda_bf16_peak
from plait.train.peak import measure_matmul_flops as measure_matmul_flops
from plait.train.peak import measure_peak as measure_peak
from plait.train.peak import measure_peak_flops as measure_peak_flops


def model_flops_per_token(*, num_params: int, num_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder, forward and backward (PaLM, appendix B).

    flops_per_token = 6 * N + 12 * L * d * s

    6N covers the dense matmuls (2N forward, 4N backward); 12*L*d*s covers the
    attention scores (QK^T) and the weighted values (AV), which hold no parameters.
    N is the parameter count (embeddings included, as PaLM does), L the layers,
    d the model width and s the sequence length.

    >>> model_flops_per_token(num_params=1000, num_layers=2, d_model=8, seq_len=16)
    9072.0
    """
    return 6.0 * num_params + 12.0 * num_layers * d_model * seq_len


def mfu(*, tokens_per_s: float, flops_per_token: float, peak_flops: float, num_ranks: int) -> float:
    """Model FLOPs utilisation, a fraction in [0, 1] (ideally).

    mfu = tokens_per_s * flops_per_token / (peak_flops * num_ranks)

    tokens_per_s is the whole job's throughput; peak_flops is one rank's peak.
    """
    if peak_flops <= 0 or num_ranks <= 0:
        raise ValueError(
            f"mfu needs a positive peak and rank count, got peak_flops={peak_flops}, num_ranks={num_ranks}"
        )
    return tokens_per_s * flops_per_token / (peak_flops * num_ranks)


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _getrusage_max_rss_bytes() -> int:
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * 1024  # macOS reports bytes, Linux KiB


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last `reset_peak_rss()` (VmHWM)."""
    kib = _proc_status_kib("VmHWM")
    return kib * 1024 if kib is not None else _getrusage_max_rss_bytes()


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS); the peak where /proc is missing."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else _getrusage_max_rss_bytes()


def reset_peak_rss() -> None:
    """Reset the peak-RSS mark to the current RSS (Linux only; a no-op elsewhere).

    Call after set-up so `peak_rss_bytes()` reports the steady-state peak.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@dataclass(frozen=True)
class StepTiming:
    step: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Throughput:
    """Tokens per second over training steps.

    tokens_per_s = median over steps of (step tokens / step seconds), skipping the
    first `num_warmup_steps` (compilation, allocator growth, cold caches). Until a
    steady-state step exists, the warm-up steps are used.

    >>> meter = Throughput()
    >>> for step, seconds in enumerate([5.0, 1.0, 2.0, 1.0]):
    ...     meter.record(step, tokens=100, seconds=seconds)
    >>> meter.tokens_per_s()
    100.0
    """

    def __init__(self, *, num_warmup_steps: int = 1, window: int = 20) -> None:
        if num_warmup_steps < 0 or window < 1:
            raise ValueError(
                f"Throughput needs num_warmup_steps >= 0 and window >= 1, got {num_warmup_steps} and {window}"
            )
        self.num_warmup_steps = num_warmup_steps
        self.window = window
        self.timings: list[StepTiming] = []

    def record(self, step: int, tokens: int, seconds: float) -> None:
        """Record one step: the tokens it processed (all ranks together) and its wall time."""
        self.timings.append(StepTiming(step=step, tokens=int(tokens), seconds=float(seconds)))

    def _steady(self) -> list[StepTiming]:
        steady = self.timings[self.num_warmup_steps :]
        return steady if steady else self.timings

    def tokens_per_s(self) -> float:
        """Median tokens/s over all steady-state steps (0.0 before the first step)."""
        steady = self._steady()
        return statistics.median(t.tokens_per_s for t in steady) if steady else 0.0

    def recent_tokens_per_s(self) -> float:
        """Median tokens/s over the last `window` steady-state steps (0.0 before the first step)."""
        recent = self._steady()[-self.window :]
        return statistics.median(t.tokens_per_s for t in recent) if recent else 0.0

    @property
    def total_tokens(self) -> int:
        return sum(t.tokens for t in self.timings)


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages behind every tensor the garbage collector can reach."""
    import gc
    import warnings

    tensors = []
    with warnings.catch_warnings():  # probing deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            with contextlib.suppress(Exception):  # some objects raise on isinstance probes
                if isinstance(obj, torch.Tensor) and not obj.is_meta:
                    tensors.append(obj)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _events(nodes: list) -> Iterable:
    for node in nodes:
        yield node
        yield from _events(node.children)


def peak_live_tensor_bytes(run: Callable[[], object]) -> dict[str, int]:
    """Bytes held by live tensors while `run()` executes: at its start, and at their peak.

    start = bytes of the storages of every tensor alive when `run` begins
            (parameters, gradients, optimizer state, anything else)
    peak  = start + the highest running sum of allocations minus frees during `run`

    Allocations and frees are the allocator's own events (torch.profiler with
    profile_memory), so storage a collective fills or a ZeRO-3 unit resizes
    counts as well as operator outputs. Unlike RSS, the runtime and the
    allocator's caching are not in it.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    start = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted(
        (event.start_time_ns, event.extra_fields.alloc_size)
        for event in _events(tree)
        if event.tag == _EventType.Allocation
    )
    current = highest = 0
    for _, size in allocations:
        current += size
        highest = max(highest, current)
    return {"start": start, "peak": start + highest}


COMM_COLUMNS: tuple[str, ...] = tuple(  # `host` is both an axis label and a link: one column
    dict.fromkeys(["comm_bytes", *(f"comm_{label}_bytes" for label in (*AXIS_LABELS, *LINKS))])
)


def comm_metrics(counter: CommCounter) -> dict[str, float]:
    """Bytes this rank sent since `counter.reset()` (call it before each step), one key per column.

    comm_bytes        = sum over every collective and message of the bytes this rank sent
    comm_<axis>_bytes = that sum over the calls on one mesh axis (dp, tp, pp, cp, ep; `world` for
                        a group that spans several, e.g. clipping's norm under tp x pp)
    comm_<link>_bytes = that sum over the calls inside one node (intra) or between nodes (inter)
    comm_host_bytes   = bytes copied between this rank's device and host or disk (offload)

    Each call's bytes follow the table in `plait.distributed.comm` (ring all-reduce 2(N-1)/N x B,
    all-gather and reduce-scatter (N-1)/N x B, a point-to-point message B).
    """
    by_axis, by_link = counter.sent_by_axis, counter.sent_by_link
    values = {"comm_bytes": counter.sent_bytes}
    values |= {f"comm_{axis}_bytes": by_axis.get(axis, 0.0) for axis in AXIS_LABELS}
    values |= {f"comm_{link}_bytes": by_link.get(link, 0.0) for link in LINKS}
    return values


OFFLOAD_COLUMNS: tuple[str, ...] = (
    "offload_device_bytes",
    "offload_host_bytes",
    "offload_disk_bytes",
    "offload_read_bytes",
    "offload_write_bytes",
    "offload_hidden",
)


def offload_metrics(offload: Any) -> dict[str, float]:
    """Model-state bytes per tier on this rank, bytes read and written this step, and the share of
    the I/O time that compute hid (1 - time the step waited for I/O / time the I/O threads were busy)."""
    if offload is None:
        return {}
    stats = offload.stats()
    values = {f"offload_{tier}_bytes": float(n) for tier, n in stats["resident_bytes"].items()}
    values |= {"offload_read_bytes": float(stats["read_bytes"]), "offload_write_bytes": float(stats["write_bytes"])}
    if stats["io_busy_s"] > 0:
        values["offload_hidden"] = stats["hidden_share"]
    return values


MOE_COLUMNS: tuple[str, ...] = ("moe_aux_loss", "moe_z_loss", "moe_dropped", "moe_load_min", "moe_load_max")


def moe_metrics(model: torch.nn.Module) -> dict[str, float]:
    """This rank's Mixture-of-Experts routing over the last step (empty for a dense model).

    moe_aux_loss = mean over MoE layers and micro-batches of E * sum_i f_i * P_i, unweighted
                   (f_i: share of token slots routed to expert i, P_i: its mean router probability;
                   1.0 is perfectly even, E is every token on one expert)
    moe_z_loss   = mean over MoE layers and micro-batches of mean_tokens logsumexp(router logits)^2
    moe_dropped  = slots dropped for lack of capacity / slots routed (tokens x top_k), all layers
    moe_load_min = fewest token slots routed to one expert of one layer in the step (before dropping)
    moe_load_max = most token slots routed to one expert of one layer in the step (even: tokens x k / E)
    """
    stats = collect_stats(model)
    if stats is None:
        return {}
    return {
        "moe_aux_loss": stats.aux_loss,
        "moe_z_loss": stats.z_loss,
        "moe_dropped": stats.dropped_fraction,
        "moe_load_min": stats.load_min,
        "moe_load_max": stats.load_max,
    }
