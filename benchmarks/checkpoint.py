"""plait checkpoints: save and load seconds and GB/s per rank, sync and async, against torch DCP.

Work: the `gpt2-124m` GPT (P = 124.4M, tied embeddings), fp32 AdamW, 2 ranks of
1 thread each over gloo (forked, FileStore rendezvous: common.run_ranks), one
training step on 1 x 64 tokens per rank first so Adam's state exists. Both
systems hold the same state, sharded over the 2 ranks:

- plait: `plait.boost(..., plan=Plan(dp=2, zero=3))`; `engine.save(path)`
  (each rank writes its safetensors shard, sha256 + fsync, rank 0 commits a
  manifest by an atomic rename), `engine.load(path)` (sha256 of every file
  is checked first, then each rank reads its own pieces).
- peer: FSDP2 (`fully_shard` on every block and the root) with the same
  weights and AdamW, saved with torch.distributed.checkpoint:
  `get_state_dict(model, optimizer)` -> `dcp.save({"model", "optim"})`
  (one `__R_0.distcp` file per rank, fsynced, rank 0 writes `.metadata`);
  load = `get_state_dict` -> `dcp.load` -> `set_state_dict`.

Both save weights + exp_avg + exp_avg_sq + step. Phases, in the same two rank
processes, each timed A B A B (common.run_alternating):

1. save: wall seconds per save, between barriers (entering save to the commit
   being visible on every rank); bytes each rank wrote; GB/s = those bytes /
   seconds (GB = 1e9 bytes). A synchronous save blocks training for all of it.
2. load: loading the last checkpoint back (weights zeroed first, then checked
   against the saved global sum); each rank's files are evicted from the page
   cache first (posix_fadvise DONTNEED), so reads come from disk (`--warm-cache`
   skips that). GB/s = the bytes of the rank's own shard / seconds.
3. reshard: the zero=3 checkpoint loaded into a plait engine under another plan
   (`--reshard-to`: tp2 (default: dp=1 x tp=2, so every piece is re-sliced by
   index arithmetic), zero0, zero1 or zero2), alternated with the same-plan load.
4. async: per block, `baseline_steps` training steps, then an async save
   (plait `engine.save(path, asynchronous=True)`, DCP `dcp.async_save` on a gloo
   group of its own), then `steps_after_save` steps, then the wait. Figures:
   blocked = seconds the save call held the caller (the snapshot); commit =
   seconds until the checkpoint's commit file appeared (manifest.json /
   .metadata, polled every 5 ms); lost = blocked + sum over the steps started
   before the commit of (step - baseline median) + the final wait.
5. breakdown (plait only, diagnostic): where a save's and a load's seconds go
   (state entries, snapshot copy, safetensors write, sha256, fsync, sha256
   with the fsync on a thread, checking files, reading the shard), timed on
   both ranks at once with plait's own functions.

The checkpoints go to a temporary directory on the local disk (deleted after).

    python benchmarks/checkpoint.py                 # the full run (~4-5 min)
    python benchmarks/checkpoint.py --quick         # the tiny model: a smoke check
    python benchmarks/checkpoint.py --phases save breakdown --pairs 2
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from common import (
    RESULTS_DIR,
    environment,
    finish,
    format_table,
    load_average,
    local_tensor,
    ratio_summary,
    run_alternating,
    run_ranks,
    spread,
    timed_block,
)
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import plait
from plait.checkpoint.io import check_files, complete_manifest
from plait.checkpoint.layout import writes_piece
from plait.checkpoint.sharded import sha256_of, shard_file_name, snapshot
from plait.checkpoint.training_state import rank_coords, state_entries
from plait.checkpoint.writer import fsync_path, synced_record
from plait.distributed.placement import placement_of
from plait.models import build

WORLD_SIZE = 2
PHASES = ("save", "load", "reshard", "async", "breakdown")
GB = 1e9


@dataclass(frozen=True)
class CheckpointBenchConfig:
    preset: str = "gpt2-124m"
    seq: int = 64  # tokens per sequence in the training steps
    batch: int = 1  # sequences per rank per step
    pairs: int = 5  # A/B pairs per phase
    baseline_steps: int = 3  # steps with no save in flight before each async save
    steps_after_save: int = 2  # steps run after each async save call
    reshard_to: str = "tp2"  # the plan the zero=3 checkpoint is also loaded into: tp2, zero0, zero1, zero2
    warm_cache: bool = False  # load from the page cache instead of evicting the files first
    phases: tuple[str, ...] = PHASES
    lr: float = 3e-4
    seed: int = 0
    quick: bool = False
    directory: str = ""  # where the checkpoints go (a temporary directory made by main)


def build_model(config: CheckpointBenchConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)  # the same weights in both systems
    return build(config.preset)


def make_optimizer(config: CheckpointBenchConfig) -> Callable[[Any], torch.optim.Optimizer]:
    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=config.lr)

    return optimizer


def global_sum(tensors: list[torch.Tensor]) -> float:
    """The sum of every element of the ranks' local tensors, in float64 (a checksum of sharded weights)."""
    total = torch.tensor(sum(float(local_tensor(t).detach().double().sum()) for t in tensors), dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def evict(directory: Path) -> None:
    """Drop `directory`'s files from the page cache (they are fsynced, so their pages are clean)."""
    for file in directory.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class CommitWatcher:
    """Polls for a checkpoint's commit file from a thread; `seconds` = when it appeared, from `start`."""

    def __init__(self, marker: Path, start: float) -> None:
        self.marker = marker
        self.start = start
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self.marker.exists():
                self.seconds = time.perf_counter() - self.start
                return
            time.sleep(0.005)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.seconds


# ---------------------------------------------------------------------------
# The two systems, behind one interface


class PlaitSystem:
    commit_file = "manifest.json"

    def __init__(self, config: CheckpointBenchConfig, *, zero: int, tp: int = 1) -> None:
        self.engine = plait.boost(
            build_model(config),
            optimizer=make_optimizer(config),
            loss_fn=plait.losses.causal_lm,
            plan=plait.Plan(dp=WORLD_SIZE // tp, tp=tp, zero=zero),
        )
        self.coords = rank_coords(self.engine)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        return float(self.engine.train_step(batch).loss.detach())

    def save(self, path: Path) -> None:
        self.engine.save(path)

    def save_async(self, path: Path) -> None:
        self.engine.save(path, asynchronous=True)

    def wait(self) -> None:
        self.engine.wait_for_save()

    def load(self, path: Path) -> None:
        self.engine.load(path)

    def weights(self) -> list[torch.Tensor]:
        """The weights the optimizer steps (ZeRO or tp shards), each element on one rank only."""
        params = [p for group in self.engine.optimizer.param_groups for p in group["params"]]
        return [p for p in params if writes_piece(placement_of(p), coords=self.coords)]

    def rank_files(self, path: Path, rank: int) -> list[Path]:
        main = ["trainer.pt", "config.json", "manifest.json"] if rank == 0 else []
        return [path / shard_file_name(rank), *(path / name for name in main)]

    def shard_file(self, path: Path, rank: int) -> Path:
        return path / shard_file_name(rank)


class DcpSystem:
    """FSDP2 on every block and the root, AdamW, saved and loaded with torch.distributed.checkpoint."""

    commit_file = ".metadata"

    def __init__(self, config: CheckpointBenchConfig) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.model = build_model(config)
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.optimizer = make_optimizer(config)(self.model.parameters())
        self.group = dist.new_group(backend="gloo")  # async_save's collectives, apart from training's
        self.future: Any = None

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss_sum, num_tokens = plait.losses.causal_lm(self.model(**batch), batch)
        loss = loss_sum / num_tokens
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())

    def _state(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, path: Path) -> None:
        dcp.save(self._state(), checkpoint_id=path)

    def save_async(self, path: Path) -> None:
        self.future = dcp.async_save(self._state(), checkpoint_id=path, process_group=self.group)

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None

    def load(self, path: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def weights(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def rank_files(self, path: Path, rank: int) -> list[Path]:
        return [self.shard_file(path, rank), *([path / ".metadata"] if rank == 0 else [])]

    def shard_file(self, path: Path, rank: int) -> Path:
        return path / f"__{rank}_0.distcp"


# ---------------------------------------------------------------------------
# Phases


class Bench:
    """The systems, a batch, fresh checkpoint paths, and what each phase recorded on this rank."""

    def __init__(self, rank: int, config: CheckpointBenchConfig) -> None:
        self.rank = rank
        self.config = config
        self.root = Path(config.directory)
        self.systems: dict[str, Any] = {"plait": PlaitSystem(config, zero=3), "dcp": DcpSystem(config)}
        vocab = self.systems["plait"].engine.model.config.vocab_size
        gen = torch.Generator().manual_seed(config.seed * 1000 + 17 + rank)
        tokens = torch.randint(0, vocab, (config.batch, config.seq), generator=gen)
        self.batch = {"input_ids": tokens, "labels": tokens}
        self.num_params = sum(p.numel() for p in build_model(config).parameters())
        self.counter = 0
        self.last_saved: dict[str, Path] = {}

    def fresh_path(self, name: str) -> Path:
        self.counter += 1
        return self.root / name / f"step-{self.counter:06d}"

    def forget(self, name: str) -> None:
        """Delete `name`'s previous checkpoint (disk space); rank 0 only, after a barrier."""
        dist.barrier()
        old = self.last_saved.pop(name, None)
        if old is not None and self.rank == 0:
            shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def rank_bytes(self, name: str, path: Path) -> dict[str, int]:
        system = self.systems[name]
        return {
            "files": sum(f.stat().st_size for f in system.rank_files(path, self.rank)),
            "shard": system.shard_file(path, self.rank).stat().st_size,
        }


def save_block(bench: Bench, name: str, record: dict[str, list]) -> float:
    bench.forget(name)
    path = bench.fresh_path(name)
    seconds, _ = timed_block(lambda: bench.systems[name].save(path))
    bench.last_saved[name] = path
    sizes = bench.rank_bytes(name, path)
    record["bytes"].append(sizes)
    record["gb_per_s"].append(sizes["files"] / GB / seconds)
    return seconds


def save_phase(bench: Bench) -> dict[str, Any]:
    records = {name: {"bytes": [], "gb_per_s": []} for name in bench.systems}
    timing = run_alternating(
        {name: (lambda n=name: save_block(bench, n, records[n])) for name in bench.systems},
        num_pairs=bench.config.pairs,
    )
    return {"timing": timing, **{name: records[name] for name in bench.systems}}


def load_block(bench: Bench, system: Any, path: Path, record: dict[str, list]) -> float:
    """One timed load of `path` into `system`, weights zeroed first and checked after."""
    expected = record["expected_sum"]
    with torch.no_grad():
        for weight in system.weights():
            local_tensor(weight).zero_()
    if not bench.config.warm_cache:
        evict(path)
    seconds, _ = timed_block(lambda: system.load(path))
    loaded = global_sum(system.weights())
    record["sum_rel_error"].append(abs(loaded - expected) / abs(expected))
    record["gb_per_s"].append(path.joinpath(record["shard_name"]).stat().st_size / GB / seconds)
    return seconds


def load_record(bench: Bench, name: str, path: Path) -> dict[str, Any]:
    system = bench.systems[name]
    shard = system.shard_file(path, bench.rank).name
    return {"expected_sum": global_sum(system.weights()), "shard_name": shard, "sum_rel_error": [], "gb_per_s": []}


def load_phase(bench: Bench) -> dict[str, Any]:
    records = {name: load_record(bench, name, bench.last_saved[name]) for name in bench.systems}
    blocks = {
        name: (lambda n=name: load_block(bench, bench.systems[n], bench.last_saved[n], records[n]))
        for name in bench.systems
    }
    timing = run_alternating(blocks, num_pairs=bench.config.pairs)
    return {"timing": timing, **records}


def reshard_phase(bench: Bench) -> dict[str, Any]:
    """The plait zero=3 checkpoint loaded under zero=3 and under `reshard_to`, alternated."""
    path = bench.last_saved["plait"]
    target = bench.config.reshard_to
    other = f"plait-{target}"
    plan = {"tp": 2, "zero": 0} if target == "tp2" else {"zero": int(target.removeprefix("zero"))}
    systems = {"plait-zero3": bench.systems["plait"], other: PlaitSystem(bench.config, **plan)}
    records = {name: load_record(bench, "plait", path) for name in systems}
    blocks = {name: (lambda n=name: load_block(bench, systems[n], path, records[n])) for name in systems}
    timing = run_alternating(blocks, num_pairs=bench.config.pairs)
    del systems[other]
    gc.collect()
    return {"timing": timing, "other": other, **records}


def timed_step(system: Any, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    system.step(batch)
    return time.perf_counter() - start


def async_block(bench: Bench, name: str, records: list[dict[str, Any]]) -> float:
    """Steps, an async save, steps while it is in flight, the wait; returns the seconds lost."""
    system, config = bench.systems[name], bench.config
    bench.forget(name)
    baseline = [timed_step(system, bench.batch) for _ in range(config.baseline_steps)]
    path = bench.fresh_path(name)
    dist.barrier()
    start = time.perf_counter()
    watcher = CommitWatcher(path / system.commit_file, start)
    system.save_async(path)
    blocked = time.perf_counter() - start
    steps, starts = [], []
    for _ in range(config.steps_after_save):
        starts.append(time.perf_counter() - start)
        steps.append(timed_step(system, bench.batch))
    wait_start = time.perf_counter()
    system.wait()
    wait_s = time.perf_counter() - wait_start
    dist.barrier()
    commit = watcher.stop()
    bench.last_saved[name] = path
    base = statistics.median(baseline)
    overlapped = [s for s, t in zip(steps, starts, strict=True) if commit is None or t < commit]
    lost = blocked + sum(s - base for s in overlapped) + wait_s
    records.append(
        {
            "baseline_steps_s": baseline,
            "blocked_s": blocked,
            "steps_after_save_s": steps,
            "step_starts_s": starts,
            "commit_s": commit,
            "wait_s": wait_s,
            "num_overlapped_steps": len(overlapped),
            "lost_s": lost,
        }
    )
    return lost


def async_phase(bench: Bench) -> dict[str, Any]:
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in bench.systems}
    timing = run_alternating(
        {name: (lambda n=name: async_block(bench, n, records[n])) for name in bench.systems},
        num_pairs=bench.config.pairs,
    )
    return {"timing": timing, **records}


def timed_part(run: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of `run()` on this rank, both ranks starting together."""
    dist.barrier()
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, value


def save_parts(engine: plait.Engine, scratch: Path, rank: int) -> dict[str, float]:
    """A save's parts: the sequential hash-then-fsync next to plait's `synced_record` (both on a fresh file)."""
    parts: dict[str, float] = {}
    parts["state_entries"], (entries, _) = timed_part(lambda: state_entries(engine))
    parts["snapshot_copy (async only)"], _ = timed_part(lambda: snapshot(entries))
    tensors = {e.name: e.tensor for e in entries}
    first, second = scratch / f"a-{shard_file_name(rank)}", scratch / f"b-{shard_file_name(rank)}"
    parts["safetensors_save_file"], _ = timed_part(lambda: safetensors.torch.save_file(tensors, first))
    parts["sha256"], _ = timed_part(lambda: sha256_of(first))
    parts["fsync"], _ = timed_part(lambda: fsync_path(first))
    parts["safetensors_save_file (again)"], _ = timed_part(lambda: safetensors.torch.save_file(tensors, second))
    parts["sha256 while fsync on a thread"], _ = timed_part(lambda: synced_record(second))
    return parts


def load_parts(checkpoint: Path, rank: int) -> dict[str, float]:
    """A load's reads: every file checked by every rank (before) or each rank's share (plait now), cold."""
    own = checkpoint / shard_file_name(rank)
    manifest = complete_manifest(checkpoint)
    parts: dict[str, float] = {}
    evict(checkpoint)
    parts["check all files, cold (each rank)"], _ = timed_part(
        lambda: check_files(checkpoint, manifest, manifest["files"])
    )
    evict(checkpoint)
    parts["check own shard, cold"], _ = timed_part(lambda: check_files(checkpoint, manifest, [own.name]))
    parts["read own shard's bytes, warm"], _ = timed_part(own.read_bytes)
    evict(checkpoint)
    parts["read own shard's bytes, cold"], _ = timed_part(own.read_bytes)
    return parts


def breakdown_phase(bench: Bench) -> dict[str, float]:
    """Where plait's save and load seconds go, part by part (plait's own functions, both ranks at once)."""
    scratch = bench.root / "breakdown"
    if bench.rank == 0:
        scratch.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    parts = save_parts(bench.systems["plait"].engine, scratch, bench.rank)
    parts.update(load_parts(bench.last_saved["plait"], bench.rank))
    parts["shard_bytes"] = (bench.last_saved["plait"] / shard_file_name(bench.rank)).stat().st_size
    dist.barrier()
    return parts


PHASE_RUNNERS: dict[str, Callable[[Bench], Any]] = {
    "save": save_phase,
    "load": load_phase,
    "reshard": reshard_phase,
    "async": async_phase,
    "breakdown": breakdown_phase,
}


def rank_main(rank: int, world_size: int, config: CheckpointBenchConfig) -> dict[str, Any]:
    bench = Bench(rank, config)
    out: dict[str, Any] = {"num_params": bench.num_params, "phase_wall_s": {}}
    warm = {}
    for name, system in bench.systems.items():  # Adam state exists, first-save costs are paid
        warm[f"{name}_first_step_s"] = timed_step(system, bench.batch)
        path = bench.fresh_path(name)
        warm[f"{name}_first_save_s"], _ = timed_block(lambda s=system, p=path: s.save(p))
        bench.last_saved[name] = path
    out["warmup"] = warm
    for phase in config.phases:
        start = time.perf_counter()
        out[phase] = PHASE_RUNNERS[phase](bench)
        out["phase_wall_s"][phase] = time.perf_counter() - start
        gc.collect()
    return out


# ---------------------------------------------------------------------------
# Summary and output


def per_rank(results: list[dict[str, Any]], phase: str, name: str, key: str) -> list[list[Any]]:
    """`key`'s list for system `name` in `phase`, one list per rank."""
    return [r[phase][name][key] for r in results]


def timed_summary(results: list[dict[str, Any]], phase: str, names: list[str]) -> dict[str, Any]:
    """Seconds (rank 0's: barriers make them equal), per-rank GB/s, and the ratio names[0]/names[1]."""
    seconds = results[0][phase]["timing"]["seconds"]
    out: dict[str, Any] = {"orders": results[0][phase]["timing"]["orders"]}
    for name in names:
        rates = per_rank(results, phase, name, "gb_per_s")
        out[name] = {
            "seconds": spread(seconds[name]),
            "seconds_per_pair": seconds[name],
            "gb_per_s_per_rank": [spread(r) for r in rates],
        }
        if phase == "save":
            out[name]["bytes_per_rank"] = [r[-1] for r in per_rank(results, phase, name, "bytes")]
        else:
            out[name]["max_sum_rel_error"] = max(max(r) for r in per_rank(results, phase, name, "sum_rel_error"))
    out["ratio_seconds"] = ratio_summary(seconds[names[0]], seconds[names[1]])
    return out


def async_summary(results: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per block, the slowest rank's blocked and lost seconds and rank 0's commit time."""
    out: dict[str, Any] = {"orders": results[0]["async"]["timing"]["orders"]}
    for name in names:
        blocks = list(zip(*(r["async"][name] for r in results), strict=True))  # per block, every rank's record
        worst = {key: [max(b[key] for b in block) for block in blocks] for key in ("blocked_s", "lost_s", "wait_s")}
        out[name] = {
            **{key: spread(values) for key, values in worst.items()},
            "per_block": worst,
            "commit_s": spread([block[0]["commit_s"] for block in blocks if block[0]["commit_s"] is not None]),
            "baseline_step_s": spread([s for block in blocks for s in block[0]["baseline_steps_s"]]),
            "overlapped_steps": [block[0]["num_overlapped_steps"] for block in blocks],
            "rank_records": [[dict(b) for b in block] for block in blocks],
        }
    out["ratio_blocked"] = ratio_summary(
        out[names[0]]["per_block"]["blocked_s"], out[names[1]]["per_block"]["blocked_s"]
    )
    return out


def fmt_spread(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def ratio_cell(ratio: dict[str, Any]) -> str:
    return f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})"


def print_timed(summary: dict[str, Any], names: list[str], *, title: str, labels: dict[str, str]) -> None:
    print(f"\n{title}")
    rows = []
    for name in names:
        s = summary[name]
        row = [labels[name], fmt_spread(s["seconds"])]
        row += [f"{r['median']:.3f}" for r in s["gb_per_s_per_rank"]]
        if "bytes_per_rank" in s:
            row += [f"{b['files'] / GB:.3f}" for b in s["bytes_per_rank"]]
        else:
            row += [f"{s['max_sum_rel_error']:.1e}", ""]
        rows.append(row)
    ratio = summary["ratio_seconds"]
    rows.append([f"ratio {names[0]}/{names[1]} (s)", ratio_cell(ratio), "", "", "", ""])
    second = ("GB rank0", "GB rank1") if "bytes_per_rank" in summary[names[0]] else ("sum err", "")
    headers = ["", "seconds median (min-max)", "GB/s rank0", "GB/s rank1", *second]
    print(format_table(headers, rows))


def print_async(summary: dict[str, Any], save: dict[str, Any] | None, names: list[str]) -> None:
    print("\nasync save: caller blocked, commit, training-step time lost per save (slowest rank; s, median (min-max))")
    rows = []
    for name in names:
        s = summary[name]
        rows.append(
            [
                f"{name} async",
                fmt_spread(s["baseline_step_s"]),
                fmt_spread(s["blocked_s"], 3),
                fmt_spread(s["commit_s"]),
                fmt_spread(s["wait_s"], 3),
                " ".join(str(n) for n in s["overlapped_steps"]),
                fmt_spread(s["lost_s"]),
            ]
        )
    if save is not None:
        for name in names:
            sec = save[name]["seconds"]
            rows.append([f"{name} sync", "", fmt_spread(sec), fmt_spread(sec), "", "", fmt_spread(sec)])
    rows.append([f"ratio {names[0]}/{names[1]} blocked", "", ratio_cell(summary["ratio_blocked"]), "", "", "", ""])
    headers = ["", "step s (no save)", "blocked s", "commit s", "final wait s", "steps overlapped", "lost s"]
    print(format_table(headers, rows))


def print_breakdown(results: list[dict[str, Any]]) -> None:
    print("\nplait save/load breakdown, seconds per part (both ranks at once; GB/s of the rank's shard)")
    parts = [k for k in results[0]["breakdown"] if k != "shard_bytes"]
    rows = []
    for part in parts:
        row = [part]
        for r in results:
            seconds = r["breakdown"][part]
            row += [f"{seconds:.3f}", f"{r['breakdown']['shard_bytes'] / GB / seconds:.2f}"]
        rows.append(row)
    print(format_table(["", "s rank0", "GB/s rank0", "s rank1", "GB/s rank1"], rows))


def parse_args(argv: list[str] | None = None) -> tuple[CheckpointBenchConfig, Path, Path | None, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model, 2 pairs: a smoke check")
    parser.add_argument("--preset", default=None, help="model preset (default gpt2-124m; --quick: tiny)")
    parser.add_argument("--pairs", type=int, default=None, help="A/B pairs per phase (default 5)")
    parser.add_argument("--steps-after-save", type=int, default=None, help="steps run during an async save")
    parser.add_argument("--reshard-to", default="tp2", choices=("tp2", "zero0", "zero1", "zero2"))
    parser.add_argument("--warm-cache", action="store_true", help="load from the page cache (no eviction)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=None, help="default: all")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary checkpoint directory")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/checkpoint.json)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before the ranks count as hung")
    args = parser.parse_args(argv)
    base: dict[str, Any] = {"preset": "tiny", "pairs": 2} if args.quick else {}
    chosen = {"preset": args.preset, "pairs": args.pairs, "steps_after_save": args.steps_after_save}
    chosen = {key: value for key, value in chosen.items() if value is not None}
    phases = tuple(p for p in PHASES if p in (args.phases or PHASES))
    config = CheckpointBenchConfig(
        **{**base, **chosen},
        reshard_to=args.reshard_to,
        warm_cache=args.warm_cache,
        phases=phases,
        quick=args.quick,
    )
    if config.pairs < 1:
        parser.error("--pairs must be at least 1")
    if ("reshard" in phases or "load" in phases) and "save" not in phases:
        print("note: loads read the warm-up checkpoint (no save phase)", file=sys.stderr)
    default = "checkpoint-quick.json" if config.quick else "checkpoint.json"
    return config, args.out or RESULTS_DIR / default, args.dir, args.timeout


def summarize(results: list[dict[str, Any]], config: CheckpointBenchConfig) -> dict[str, Any]:
    names = ["plait", "dcp"]
    out: dict[str, Any] = {}
    if "save" in config.phases:
        out["save"] = timed_summary(results, "save", names)
        print_timed(out["save"], names, title="sync save (s: entering save -> committed on all ranks)", labels=LABELS)
    if "load" in config.phases:
        out["load"] = timed_summary(results, "load", names)
        print_timed(out["load"], names, title=f"load ({cache_note(config)})", labels=LABELS)
    if "reshard" in config.phases:
        other = results[0]["reshard"]["other"]
        out["reshard"] = timed_summary(results, "reshard", ["plait-zero3", other])
        labels = {"plait-zero3": "plait zero3 -> zero3", other: f"plait zero3 -> {config.reshard_to}"}
        print_timed(out["reshard"], ["plait-zero3", other], title="load under another plan", labels=labels)
    if "async" in config.phases:
        out["async"] = async_summary(results, names)
        print_async(out["async"], out.get("save"), names)
    if "breakdown" in config.phases:
        out["breakdown_per_rank"] = [r["breakdown"] for r in results]
        print_breakdown(results)
    return out


LABELS = {"plait": "plait ZeRO-3", "dcp": "FSDP2 + DCP"}


def cache_note(config: CheckpointBenchConfig) -> str:
    return "page cache warm" if config.warm_cache else "files evicted from the page cache first"


def main(argv: list[str] | None = None) -> int:
    config, out_path, parent, timeout_s = parse_args(argv)
    directory = tempfile.mkdtemp(prefix="plait-ckpt-bench-", dir=parent)
    config = CheckpointBenchConfig(**{**asdict(config), "directory": directory})
    load_at_start = load_average()
    print(f"1-minute load average at start: {load_at_start}; checkpoints in {directory}", flush=True)
    started = time.time()
    try:
        results = run_ranks(rank_main, WORLD_SIZE, config, num_threads=1, timeout_s=timeout_s)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    wall_s = time.time() - started
    lead = results[0]
    print(
        f"{config.preset}: P = {lead['num_params']:,}, fp32 AdamW, {WORLD_SIZE} ranks x 1 thread, gloo, "
        f"{config.batch} x {config.seq} tokens/rank/step, {config.pairs} pairs per phase"
    )
    print("warm-up (rank 0): " + ", ".join(f"{k} {v:.2f}" for k, v in lead["warmup"].items()))
    summary = summarize(results, config)
    payload = {
        "benchmark": "checkpoint",
        "config": {**asdict(config), "world_size": WORLD_SIZE, "threads_per_rank": 1, "backend": "gloo"},
        "environment": environment(),
        "load_average_1min_at_start": load_at_start,
        "load_average_1min_at_end": load_average(),
        "wall_s": wall_s,
        "num_params": lead["num_params"],
        "warmup_per_rank": [r["warmup"] for r in results],
        "phase_wall_s": lead["phase_wall_s"],
        **summary,
    }
    finish(out_path, payload, wall_s=wall_s, phase_wall_s=lead["phase_wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
