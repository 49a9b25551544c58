"""Large batch in miniature, vision half: ViT on digits with LARS at k x the base batch vs the base batch.

Trains configs/vit-digits.toml (model.preset and everything else as there, unless --set) through
`plait train`, one run after another (the machine is shared):
  - base:        AdamW at --base-batch, --base-lr, --steps steps;
  - lars-{k}x:   LARS at k x base batch, learning rate --lars-lr x k (linear scaling, You et al. 2017),
                 biases and norm weights at that lr x --vector-lr-ratio, the LARS schedule (warmup,
                 then power-2 decay), steps x --samples / k steps: --samples x the base run's samples;
  - adamw-{k}x:  AdamW at k x base batch, learning rate base-lr x sqrt(k), the same steps, beside it.
Reads each run's test top-1 (val_acc in metrics.csv) against samples seen and optimizer steps,
plots accuracy vs samples seen and vs steps for every run in one PNG, and reports, per run, the optimizer steps
and wall time to first reach the base run's final accuracy (minus --slack).

    python benchmarks/large_batch_vision.py                         # k = 8, 800 base steps, 400 at 8x
    python benchmarks/large_batch_vision.py --factors 4 16 --steps 1600 --set task.image_size=32
    python benchmarks/large_batch_vision.py --factors 8 --lars-warmup 0.25 --tag lars-warmup-quarter

LARS's recipe here (lr 0.5 x k, vectors at 1e-3 of it, warmup a quarter of the steps) was chosen on
287 training images held out as a validation split, never on the test images. In
results/large_batch_vision.json (--factors 8 32, warmup an eighth) LARS stays below the base run;
in results/large_batch_vision-lars-warmup-quarter.json LARS-8x reaches it at step 300 of its 400.
At 32x (--factors 32 --lars-warmup 0.125 --samples 16 --tag lars-32x: lr 16, warmup an eighth, 16x the
base run's samples, chosen with --select; the trials are results/large_batch_vision-select-*.json)
LARS-32x and AdamW-32x both reach the base run's accuracy at step 200 of their 400.

--select scores every run on the last 287 training images instead of the test images (they are then
held out of training: benchmarks/vision_heldout.py), for choosing a recipe; --only runs a subset:

    python benchmarks/large_batch_vision.py --select --only lars-32x --factors 32 --lars-lr 0.25 --tag lr8

Writes benchmarks/results/large_batch_vision.json and .png (another --tag: large_batch_vision-TAG.*;
--select: large_batch_vision-select-TAG.*).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, environment, format_table, write_json
from large_batch import first_reaching, train

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/vit-digits.toml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=int, nargs="+", default=[8], help="large batch = factor x base batch")
    parser.add_argument("--base-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps of the base run")
    parser.add_argument("--base-lr", type=float, default=2e-3, help="AdamW at the base batch")
    parser.add_argument("--lars-lr", type=float, default=0.5, help="LARS lr per base batch (scaled by the factor)")
    parser.add_argument("--vector-lr-ratio", type=float, default=0.001, help="LARS: biases/norms at lr x this")
    parser.add_argument("--samples", type=float, default=4.0, help="large runs' samples / the base run's samples")
    parser.add_argument("--lars-warmup", type=float, default=0.125, help="LARS warmup, a share of its steps")
    parser.add_argument("--evals", type=int, default=8, help="test evaluations per run")
    parser.add_argument("--slack", type=float, default=0.005, help="target = base final accuracy - slack")
    parser.add_argument("--runs", default="runs/large_batch_vision")
    parser.add_argument("--tag", default="")
    parser.add_argument("--set", action="append", default=[], help="section.key=value for every run")
    parser.add_argument(
        "--select",
        action="store_true",
        help="score on the last 287 training images (held out, benchmarks/vision_heldout.py), not test",
    )
    parser.add_argument("--only", nargs="+", default=[], help="run only these (e.g. lars-32x); no target without base")
    return parser.parse_args()


def run_specs(args: argparse.Namespace) -> dict[str, list[str]]:
    """Run name -> its --set overrides (the large-batch runs see --samples x the base run's samples)."""
    base_warmup = max(1, args.steps // 16)
    specs = {"base": _overrides(args, batch=args.base_batch, steps=args.steps, warmup=base_warmup)}
    specs["base"] += ["train.optimizer=adamw", f"train.lr={args.base_lr}", "train.schedule=cosine"]
    for k in args.factors:
        steps = max(1, round(args.steps * args.samples / k))
        batch = k * args.base_batch  # a larger share of warmup at large batch, as the LARS recipe has:
        common = _overrides(args, batch=batch, steps=steps, warmup=max(1, steps // 8))
        lars = _overrides(args, batch=batch, steps=steps, warmup=max(1, round(steps * args.lars_warmup)))
        specs[f"lars-{k}x"] = [*lars, "train.optimizer=lars", f"train.lr={args.lars_lr * k}", "train.schedule=lars",
                               "train.weight_decay=1e-4", f"train.vector_lr_ratio={args.vector_lr_ratio}"]  # fmt: skip
        specs[f"adamw-{k}x"] = [*common, "train.optimizer=adamw", f"train.lr={args.base_lr * math.sqrt(k)}",
                                "train.schedule=cosine"]  # fmt: skip
    return specs


def _overrides(args: argparse.Namespace, *, batch: int, steps: int, warmup: int) -> list[str]:
    every = max(1, steps // args.evals)
    return [f"train.global_batch={batch}", f"train.steps={steps}", f"train.warmup={warmup}",
            f"train.eval_every={every}", f"train.log_every={every}", f"train.checkpoint_every={10 * steps}",
            "train.min_lr_ratio=0.0", *args.set]  # fmt: skip


def plot(runs: dict[str, dict[str, Any]], target: float, path: Path, *, split: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for axis, x, label in ((axes[0], "samples", "training samples seen"), (axes[1], "steps", "optimizer steps")):
        for name, run in runs.items():
            accuracy = [100 * a for a in run["val_acc"]]
            axis.plot(run[x], accuracy, marker="o", label=f"{name} (batch {run['global_batch']})")
        if target <= 1:
            axis.axhline(100 * target, color="grey", linestyle=":", label=f"target {100 * target:.1f}%")
        axis.set_xlabel(label)
    axes[0].set_ylabel(f"{split} top-1 accuracy (%)")
    axes[0].legend()
    fig.suptitle("ViT on digits: LARS and AdamW at large batch vs AdamW at the base batch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _reached_cells(reached: dict[str, Any]) -> list[str]:
    if reached["steps"] is None:
        return ["not reached", "-"]
    return [str(reached["steps"]), f"{reached['train_s']:.1f}"]


def main() -> None:
    args = parse_args()
    stem = "large_batch_vision" + ("-select" if args.select else "") + (f"-{args.tag}" if args.tag else "")
    started = time.perf_counter()
    specs = {name: sets for name, sets in run_specs(args).items() if not args.only or name in args.only}
    module = "benchmarks.vision_heldout" if args.select else "plait.cli"
    runs = {
        name: train(
            name, sets, out_dir=ROOT / args.runs / f"{stem}-{name}", config=CONFIG, metric="val_acc", module=module
        )
        for name, sets in specs.items()
    }
    # without the base run (--only) nothing counts as reached: an accuracy above 1 is never met
    target = runs["base"]["val_acc"][-1] - args.slack if "base" in runs else 2.0
    reached = {name: first_reaching(run, target, metric="val_acc") for name, run in runs.items()}
    rows = [[name, run["global_batch"], run["steps"][-1], f"{100 * run['val_acc'][-1]:.1f}%",
             *_reached_cells(reached[name]), f"{run['wall_s']:.0f}", f"{run['load_before']:.1f}"]
            for name, run in runs.items()]  # fmt: skip
    split = "held-out" if args.select else "test"
    header = ["run", "batch", "steps", f"final {split} top-1", "steps to target", "train s to target", "wall s", "load"]
    print(format_table(header, rows))
    png = RESULTS_DIR / f"{stem}.png"
    plot(runs, target, png, split=split)
    payload = {"environment": environment(), "args": vars(args), "scored_on": split, "target_accuracy": target, "runs": runs,
               "reached": reached, "wall_s": time.perf_counter() - started, "png": str(png)}  # fmt: skip
    print(f"wrote {write_json(RESULTS_DIR / f'{stem}.json', payload)} and {png}")


if __name__ == "__main__":
    main()
