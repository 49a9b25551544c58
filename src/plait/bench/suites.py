"""The named cases of `plait bench`: each is one of the side-by-side scripts in benchmarks/ with fixed
options, so the suite's figures and the script's come from the same code (plait.bench.harness)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    """One benchmark case: a model x plan x world size x precision, plait against its peers.

    `script` is a file of benchmarks/ and `args` its options; `pairs_flag` is the option that sets
    the A/B pairs (the repeats); `reader` names the function of plait.bench.read that turns the
    script's JSON into table rows.
    """

    name: str
    script: str
    args: tuple[str, ...]
    model: str
    plan: str
    world: int
    precision: str
    peers: tuple[str, ...]
    reader: str
    device: str = "cpu"
    pairs_flag: str = "--pairs"
    mfu: bool = True  # False where 6 x params does not count the work (MoE: only top-k experts run)
    model_overrides: dict[str, int] = field(default_factory=dict)


DP_DDP = Case(
    name="dp2-zero0-ddp",
    script="dp.py",
    args=("--quick",),
    model="bench-dp d128 L4 seq64",
    plan="dp=2 zero=0",
    world=2,
    precision="fp32",
    peers=("ddp",),
    reader="read_dp",
    model_overrides={"d_model": 128, "num_layers": 4, "max_seq_len": 64},
)
DP_ZERO3_FSDP2 = Case(
    name="dp2-zero3-fsdp2",
    script="zero.py",
    args=("--quick", "--phases", "speed", "--stages", "3", "--no-wait"),
    model="tiny seq64",
    plan="dp=2 zero=3",
    world=2,
    precision="fp32",
    peers=("fsdp2-reshard", "deepspeed"),
    reader="read_zero",
    model_overrides={"max_seq_len": 64},
)
DP_ZERO2_FSDP2 = Case(
    name="dp2-zero2-fsdp2",
    script="zero.py",
    args=("--quick", "--phases", "speed", "--stages", "2", "--no-wait"),
    model="tiny seq64",
    plan="dp=2 zero=2",
    world=2,
    precision="fp32",
    peers=("fsdp2-noreshard", "deepspeed"),
    reader="read_zero",
    model_overrides={"max_seq_len": 64},
)
PP_TORCH = Case(
    name="pp2-1f1b-torch",
    script="pipeline.py",
    args=("--quick", "--parts", "torch"),
    model="bench-dp d128 L4 vocab2048 seq64",
    plan="pp=2 microbatches=8",
    world=2,
    precision="fp32",
    peers=("torch",),
    reader="read_pipeline",
    model_overrides={"d_model": 128, "num_layers": 4, "num_heads": 4, "vocab_size": 2048, "max_seq_len": 64},
)
DP_DDP_FULL = Case(
    name="dp2-zero0-ddp-bench-dp",
    script="dp.py",
    args=(),
    model="bench-dp d512 L8 seq128",
    plan="dp=2 zero=0",
    world=2,
    precision="fp32",
    peers=("ddp",),
    reader="read_dp",
    model_overrides={"max_seq_len": 128},
)
GPU_LLAMA = Case(
    name="gpu-llama-1b",
    script="gpu_bench.py",
    args=("--device", "cuda"),
    model="llama-1b seq4096",
    plan="dp=1 compile=blocks",
    world=1,
    precision="bf16",
    peers=(),
    reader="read_gpu",
    device="cuda",
    pairs_flag="",
)
MOE_EP2 = Case(
    name="moe-ep2-deepspeed",
    script="moe.py",
    args=("--quick", "--world", "2", "--ep", "2"),
    model="moe-100m d128 L2 (8 experts, top-2)",
    plan="dp=2 ep=2",
    world=2,
    precision="fp32",
    peers=("deepspeed",),
    reader="read_moe",
    pairs_flag="",  # moe.py alternates rounds of whole runs; --quick runs one
    mfu=False,
)

SUITES: dict[str, tuple[Case, ...]] = {
    "quick": (DP_DDP, DP_ZERO3_FSDP2, PP_TORCH, MOE_EP2),
    "full": (DP_DDP_FULL, DP_ZERO3_FSDP2, DP_ZERO2_FSDP2, PP_TORCH, MOE_EP2, GPU_LLAMA),
}


def all_cases() -> dict[str, Case]:
    """Every case of every suite, by name."""
    return {case.name: case for cases in SUITES.values() for case in cases}


def select_cases(suite: str, names: list[str] | None, *, device: str) -> list[Case]:
    """The suite's cases on `device`, or the named ones; unknown names raise ValueError listing the valid ones."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
    if names:
        known = all_cases()
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"unknown case {', '.join(map(repr, unknown))}; valid cases: {', '.join(known)}")
        return [known[name] for name in names]
    return [case for case in SUITES[suite] if case.device == device]
