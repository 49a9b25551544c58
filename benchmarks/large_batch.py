"""Large batch in miniature: BERT-tiny masked LM with LAMB at k x the base batch vs AdamW at the base batch.

Trains configs/bert-tiny.toml on one process (plan.dp=1, one thread; a large batch accumulated over
micro-batches of --micro-batch samples so memory stays small) through `plait train`, one run after another:
  - base:        AdamW at --base-batch, --base-lr, --steps steps, warmup then polynomial decay;
  - lamb-{k}x:   LAMB at k x the base batch, lr --lamb-lr x sqrt(k) (the LAMB paper's square-root
                 scaling with warmup then polynomial decay), steps / k: the same samples seen;
  - adamw-{k}x:  AdamW at k x the base batch, lr --base-lr x sqrt(k), steps / k, beside it.
Reads each run's validation loss against samples seen, plots every run in one PNG, and reports the
optimizer steps and training seconds to first reach the base run's final validation loss (plus --slack).
With --vision the vision half (benchmarks/large_batch_vision.py: ViT on digits, LARS) runs after it.

    python benchmarks/large_batch.py                     # k = 8 and 32, 320 base steps, seq 32
    python benchmarks/large_batch.py --factors 8 --steps 640 --vision

Writes benchmarks/results/large_batch.json and .png (another --tag: large_batch-TAG.*).
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, environment, format_table, load_average, write_json

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/bert-tiny.toml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=int, nargs="+", default=[8, 32], help="large batch = factor x base batch")
    parser.add_argument("--base-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=64, help="samples per accumulated micro-batch")
    parser.add_argument("--steps", type=int, default=320, help="optimizer steps of the base run")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--base-lr", type=float, default=1e-3, help="AdamW at the base batch")
    # 2e-3 (AdamW's scale) left LAMB at 8.74/8.83 after the same samples: its step is lr x ||w|| per layer
    parser.add_argument("--lamb-lr", type=float, default=2e-2, help="LAMB lr at the base batch (x sqrt(factor))")
    parser.add_argument("--evals", type=int, default=8, help="validation evaluations per run")
    parser.add_argument("--slack", type=float, default=0.0, help="target = base final validation loss + slack")
    parser.add_argument("--runs", default="runs/large_batch")
    parser.add_argument("--tag", default="")
    parser.add_argument("--vision", action="store_true", help="then run benchmarks/large_batch_vision.py")
    parser.add_argument("--set", action="append", default=[], help="section.key=value for every run")
    return parser.parse_args()


def run_specs(args: argparse.Namespace) -> dict[str, list[str]]:
    """Run name -> its --set overrides (each run sees steps x batch samples: the same for all)."""
    base = _overrides(args, batch=args.base_batch, steps=args.steps, warmup=max(1, args.steps // 16))
    specs = {"base": [*base, "train.optimizer=adamw", f"train.lr={args.base_lr}"]}
    for k in args.factors:
        steps = max(1, args.steps // k)
        common = _overrides(args, batch=k * args.base_batch, steps=steps, warmup=max(1, steps // 4))
        specs[f"lamb-{k}x"] = [*common, "train.optimizer=lamb", f"train.lr={args.lamb_lr * math.sqrt(k)}"]
        specs[f"adamw-{k}x"] = [*common, "train.optimizer=adamw", f"train.lr={args.base_lr * math.sqrt(k)}"]
    return specs


def _overrides(args: argparse.Namespace, *, batch: int, steps: int, warmup: int) -> list[str]:
    every = max(1, steps // args.evals)
    micro = max(1, batch // args.micro_batch)
    return [f"train.global_batch={batch}", f"plan.microbatches={micro}", f"train.steps={steps}",
            f"train.warmup={warmup}", f"train.eval_every={every}", f"train.log_every={every}",
            f"train.checkpoint_every={10 * steps}", f"data.seq_len={args.seq_len}", "plan.dp=1",
            "train.schedule=poly", *args.set]  # fmt: skip


def train(
    name: str,
    overrides: list[str],
    *,
    out_dir: Path,
    config: Path = CONFIG,
    metric: str = "val_loss",
    module: str = "plait.cli",
) -> dict[str, Any]:
    """One `plait train` run of ``config`` (or `python -m module train`, taking the same arguments);
    its evaluations of ``metric`` by step and samples seen."""
    command = [sys.executable, "-m", module, "train", str(config), "--set", f"train.out_dir={out_dir}"]
    for override in overrides:
        command += ["--set", override]
    print(" ".join(command[2:]), flush=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log, load_before, started = out_dir.parent / f"{out_dir.name}.log", load_average(), time.perf_counter()
    with log.open("w") as stream:  # a file: a full pipe would stall the run
        code = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{name} failed ({code}):\n{log.read_text()[-3000:]}")
    rows = list(csv.DictReader((out_dir / "metrics.csv").open()))
    batch = int(next(o.split("=")[1] for o in overrides if o.startswith("train.global_batch=")))
    evals = [(int(r["step"]), float(r[metric])) for r in rows if r.get(metric)]
    step_s = [float(r["step_s"]) for r in rows if r.get("step_s")]
    return {"global_batch": batch, "steps": [s for s, _ in evals], "samples": [s * batch for s, _ in evals],
            metric: [v for _, v in evals], "step_s": step_s, "wall_s": time.perf_counter() - started,
            "load_before": load_before, "load_after": load_average(), "overrides": overrides}  # fmt: skip


def first_reaching(run: dict[str, Any], target: float, *, metric: str = "val_loss") -> dict[str, Any]:
    """Optimizer steps, samples and training seconds (sum of step times) at the first evaluation that
    reaches ``target``: at or below it for a loss, at or above it for an accuracy."""
    lower_is_better = metric.endswith("loss")
    for step, samples, value in zip(run["steps"], run["samples"], run[metric], strict=True):
        if (value <= target) if lower_is_better else (value >= target):
            return {"steps": step, "samples": samples, "train_s": sum(run["step_s"][:step])}
    return {"steps": None, "samples": None, "train_s": None}


def plot(runs: dict[str, dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, run in runs.items():
        ax.plot(run["samples"], run["val_loss"], marker="o", label=f"{name} (batch {run['global_batch']})")
    ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.3f}")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("validation MLM loss")
    ax.set_title("BERT-tiny MLM: LAMB and AdamW at large batch vs AdamW at the base batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    stem = "large_batch" + (f"-{args.tag}" if args.tag else "")
    started = time.perf_counter()
    runs = {
        name: train(name, sets, out_dir=ROOT / args.runs / f"{stem}-{name}") for name, sets in run_specs(args).items()
    }
    target = runs["base"]["val_loss"][-1] + args.slack
    reached = {name: first_reaching(run, target) for name, run in runs.items()}
    rows = [[name, run["global_batch"], run["steps"][-1], f"{run['val_loss'][-1]:.3f}",
             "not reached" if reached[name]["steps"] is None else reached[name]["steps"],
             "-" if reached[name]["train_s"] is None else f"{reached[name]['train_s']:.0f}",
             f"{run['wall_s']:.0f}", f"{run['load_before']:.1f}"]
            for name, run in runs.items()]  # fmt: skip
    print(format_table(["run", "batch", "steps", "final val", "steps to target", "train s to target", "wall s",
                        "load"], rows))  # fmt: skip
    png = RESULTS_DIR / f"{stem}.png"
    plot(runs, target, png)
    payload = {"environment": environment(), "args": vars(args), "target_val_loss": target, "runs": runs,
               "reached": reached, "wall_s": time.perf_counter() - started, "png": str(png)}  # fmt: skip
    print(f"wrote {write_json(RESULTS_DIR / f'{stem}.json', payload)} and {png}")
    if args.vision:
        subprocess.run([sys.executable, str(Path(__file__).with_name("large_batch_vision.py"))], check=True)


if __name__ == "__main__":
    main()
