"""Run `plait bench`'s cases: each case's script from benchmarks/ with its options (the A/B alternation,
timing and counting happen there, through plait.bench.harness), then read its JSON into rows and add
MFU against the matmul peak measured here, in the case's precision, on one thread (one per rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plait.bench.harness import environment, load_average
from plait.bench.read import READERS
from plait.bench.suites import SUITES, Case, select_cases

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_benchmarks_dir() -> Path:
    """benchmarks/ of the source checkout this package runs from (src/plait/bench -> the repo root)."""
    return Path(__file__).resolve().parents[3] / "benchmarks"


@dataclass
class BenchOptions:
    """What `plait bench` runs; checked before anything runs."""

    suite: str = "quick"
    cases: list[str] = field(default_factory=list)
    device: str = "cpu"
    out: Path = Path("bench-results")
    repeats: int | None = None  # A/B pairs per case; None: the script's own default
    benchmarks_dir: Path = field(default_factory=default_benchmarks_dir)
    timeout_s: float = 1800.0
    peer_paths: list[Path] = field(default_factory=list)  # put first on the cases' PYTHONPATH

    def __post_init__(self) -> None:
        self.peer_paths = [Path(path) for path in self.peer_paths]
        missing = [str(path) for path in self.peer_paths if not path.is_dir()]
        if missing:
            raise ValueError(
                f"--peer-path {missing[0]} is not a directory; pass the DIR of `pip install --target DIR deepspeed ...`"
            )
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "--device cuda: no CUDA GPU on this machine (torch.cuda.is_available() is False); run --device cpu"
            )
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1 (A/B pairs per case), got {self.repeats}")
        self.selected: list[Case] = select_cases(self.suite, self.cases, device=self.device)
        if not self.selected:
            raise ValueError(f"suite {self.suite!r} has no {self.device} cases; valid suites: {', '.join(SUITES)}")
        if not self.benchmarks_dir.is_dir():
            raise ValueError(
                f"no benchmarks/ directory at {self.benchmarks_dir}: run plait bench from a source "
                "checkout (pip install -e .)"
            )
        self.out = Path(self.out)
        check_writable(self.out)


def check_writable(out: Path) -> None:
    """Create `out` and prove a file can be written there, or raise ValueError naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"--out {out} is not writable ({err.strerror}); choose another directory") from None


def case_command(case: Case, *, benchmarks_dir: Path, raw_json: Path, repeats: int | None) -> list[str]:
    command = [sys.executable, str(benchmarks_dir / case.script), *case.args, "--out", str(raw_json)]
    if repeats is not None and case.pairs_flag:
        command += [case.pairs_flag, str(repeats)]
    return command


def run_case(case: Case, options: BenchOptions) -> dict[str, Any]:
    """Run one case's script, its output in OUT/raw/CASE.log, and read its JSON."""
    raw = options.out / "raw"
    raw.mkdir(exist_ok=True)
    raw_json, log = raw / f"{case.name}.json", raw / f"{case.name}.log"
    command = case_command(case, benchmarks_dir=options.benchmarks_dir, raw_json=raw_json, repeats=options.repeats)
    load_start, started = load_average(), time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run(
            command,
            stdout=stream,
            stderr=subprocess.STDOUT,
            timeout=options.timeout_s,
            cwd=options.benchmarks_dir.parent,
            env=case_environment(options.peer_paths),
        )
    record = {
        "case": case_record(case),
        "command": command,
        "returncode": done.returncode,
        "wall_s": time.perf_counter() - started,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "log": str(log),
    }
    if done.returncode != 0 or not raw_json.exists():
        record["rows"] = [{"system": "plait", "status": f"failed (exit {done.returncode}; see {log})"}]
        return record

    record["raw_json"] = str(raw_json)
    record["rows"] = READERS[case.reader](json.loads(raw_json.read_text()))
    return record


def case_environment(peer_paths: list[Path]) -> dict[str, str]:
    """This process's environment with the peers' directories first on PYTHONPATH (the scripts import
    DeepSpeed from there; each script records whether it could)."""
    env = os.environ.copy()
    paths = [str(path.resolve()) for path in peer_paths]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def case_record(case: Case) -> dict[str, Any]:
    return {
        "name": case.name,
        "script": f"benchmarks/{case.script}",
        "args": list(case.args),
        "model": case.model,
        "plan": case.plan,
        "world": case.world,
        "precision": case.precision,
        "device": case.device,
        "reader": case.reader,
    }


def flops_per_token(case: Case) -> float | None:
    """The case's model FLOPs per token (plait.train.metrics' formula), from the model the script builds."""
    from plait.models import build
    from plait.train.metrics import model_flops_per_token

    if case.device != "cpu" or not case.mfu:
        return None
    preset = case.model.split()[0]
    model = build(preset, **case.model_overrides)
    config = model.config
    return model_flops_per_token(
        num_params=sum(p.numel() for p in model.parameters()),
        num_layers=config.num_layers,
        d_model=config.d_model,
        seq_len=config.max_seq_len,
    )


def add_mfu(record: dict[str, Any], case: Case, peaks: dict[str, Any]) -> None:
    from plait.train.metrics import mfu

    per_token = flops_per_token(case)
    peak = peaks.get(case.precision)
    for row in record["rows"]:
        if row.get("mfu") is not None:
            continue  # the script measured it (the GPU case)
        rate = row.get("tokens_per_s")
        if per_token is None or peak is None or not rate:
            row["mfu"] = None
            continue
        row["mfu"] = mfu(
            tokens_per_s=rate["median"], flops_per_token=per_token, peak_flops=peak.flops, num_ranks=case.world
        )


def measure_peaks(cases: list[Case]) -> dict[str, Any]:
    """One rank's matmul peak per precision the CPU cases use, on one thread (as each rank runs)."""
    from plait.train.metrics import measure_peak

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wanted = sorted({case.precision for case in cases if case.device == "cpu"})
        return {name: measure_peak(torch.device("cpu"), dtype=DTYPES[name]) for name in wanted}
    finally:
        torch.set_num_threads(threads)


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run the selected cases one after another and return the whole record (JSON-ready)."""
    started = time.perf_counter()
    env = environment(backend="nccl" if options.device == "cuda" else "gloo")
    load_start = load_average()
    peaks = measure_peaks(options.selected)
    records = []
    for case in options.selected:
        print(f"plait bench: {case.name} ({case.plan}, world {case.world}, {case.precision}) ...", flush=True)
        record = run_case(case, options)
        add_mfu(record, case, peaks)
        print(f"  done in {record['wall_s']:.0f} s, exit {record['returncode']}", flush=True)
        records.append(record)
    return {
        "suite": options.suite,
        "device": options.device,
        "repeats": options.repeats,
        "peer_paths": [str(path) for path in options.peer_paths],
        "environment": env,
        "peaks": {name: {"flops": p.flops, "line": p.line()} for name, p in peaks.items()},
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "wall_s": time.perf_counter() - started,
        "cases": records,
    }
