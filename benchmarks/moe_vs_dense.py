"""A tiny Switch model against the dense model of the same FLOPs per token, after the same steps.

Trains configs/switch-tiny.toml and configs/switch-tiny-dense.toml with `plait train` (the same
data, batch, steps, learning rate and schedule; the configs' plan), once per seed, --jobs runs at a
time, reads each run's metrics.csv and plots every validation-loss curve in one PNG. Before training it checks
that the two models compute the same FLOPs per token (`GPTConfig.flops_per_token`, which counts an
MoE model's active parameters: its router and top_k experts), apart from the router's matmul.

The FLOPs are counted twice: `GPTConfig.flops_per_token` (training, 6N + attention) and the
planner's forward count (`ModelShape.stage_flops_per_token` + the head), which must agree too.

    python benchmarks/moe_vs_dense.py                          # 1000 steps each, seed 0
    python benchmarks/moe_vs_dense.py --steps 400 --seeds 0 1 --jobs 4   # the committed run (~7 min)
    python benchmarks/moe_vs_dense.py --steps 3000 --set train.lr=2e-3   # --set applies to both runs
    python benchmarks/moe_vs_dense.py --switch-set model.moe_capacity_factor=1.25   # the Switch run only

Writes benchmarks/results/moe_vs_dense.json and .png (a different --tag: moe_vs_dense-TAG.*).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, environment, load_average, write_json

from plait.config import load_config, model_config_for

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"switch": ROOT / "configs/switch-tiny.toml", "dense": ROOT / "configs/switch-tiny-dense.toml"}
# The router's d_model x num_experts matmul is the one FLOP the dense model lacks.
ROUTER_SHARE_LIMIT = 0.01


def run_overrides(args: argparse.Namespace, name: str, *, seed: int = 0) -> list[str]:
    out_dir = Path(args.runs) / f"{args.tag}-{name}-seed{seed}"
    common = [
        f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", f"train.log_every={args.eval_every}",
        f"train.checkpoint_every={10 * args.steps}", f"train.out_dir={out_dir}", f"train.seed={seed}",
        f"train.eval_batches={args.eval_batches}",
    ]  # fmt: skip
    return common + list(args.set) + (list(args.switch_set) if name == "switch" else [])


def flops_per_token(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each run's model: FLOPs per token (training; and the planner's forward count), parameters."""
    from plait.planner.shape import ModelShape

    out = {}
    for name, path in CONFIGS.items():
        config = load_config(path, run_overrides(args, name))
        model = model_config_for(config)
        shape, seq = ModelShape(model), config.data.seq_len
        out[name] = {
            "flops_per_token": model.flops_per_token(seq),
            "planner_forward_flops_per_token": shape.stage_flops_per_token(range(model.num_layers), seq)
            + shape.head_flops_per_token(),
            "num_parameters": model.num_parameters(),
            "num_active_parameters": model.num_active_parameters(),
            "moe_experts": model.moe_experts, "moe_every": model.moe_every, "moe_top_k": model.moe_top_k,
            "moe_capacity_factor": model.moe_capacity_factor, "d_model": model.d_model,
            "num_layers": model.num_layers, "vocab_size": model.vocab_size, "seq_len": seq,
        }  # fmt: skip
    return out


def check_equal_flops(models: dict[str, dict[str, Any]]) -> dict[str, float]:
    gaps = {}
    for key in ("flops_per_token", "planner_forward_flops_per_token"):
        switch, dense = models["switch"][key], models["dense"][key]
        gaps[key] = (switch - dense) / dense
        if not 0 <= gaps[key] < ROUTER_SHARE_LIMIT:
            raise SystemExit(f"the two configs differ in {key} by {100 * gaps[key]:.2f}%: not a like-for-like pair")
    return gaps


def train_all(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every (seed, model) run through `plait train`, up to --jobs of them at a time (the runs are independent)."""
    todo = [(name, seed) for seed in args.seeds for name in CONFIGS]
    running: dict[str, tuple[subprocess.Popen, float, float]] = {}
    runs = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            name, seed = todo.pop(0)
            command = [sys.executable, "-m", "plait.cli", "train", str(CONFIGS[name])]
            for override in run_overrides(args, name, seed=seed):
                command += ["--set", override]
            print(" ".join(command[2:]), flush=True)
            log = ROOT / args.runs / f"{args.tag}-{name}-seed{seed}.log"  # a file: a full pipe would stall the run
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as stream:
                process = subprocess.Popen(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
            running[f"{name}-seed{seed}"] = (process, time.perf_counter(), load_average())
        done = [run for run, (process, _, _) in running.items() if process.poll() is not None]
        if not done:
            time.sleep(1.0)
            continue
        run = done[0]
        process, started, load_before = running.pop(run)
        name, seed = run.rsplit("-seed", 1)
        if process.returncode:
            log = ROOT / args.runs / f"{args.tag}-{run}.log"
            raise SystemExit(f"{run} failed ({process.returncode}):\n{log.read_text()[-3000:]}")
        out_dir = load_config(CONFIGS[name], run_overrides(args, name, seed=int(seed))).train.out_dir
        runs[run] = {"wall_s": time.perf_counter() - started, "load_before": load_before,
                     "load_after": load_average(), "out_dir": out_dir, "seed": int(seed)}  # fmt: skip
    return {run: runs[run] for run in sorted(runs, key=lambda r: (int(r.rsplit("-seed", 1)[1]), r))}


def read_metrics(out_dir: str) -> dict[str, list[float]]:
    """Validation loss by step, training loss by step, MoE columns where present."""
    rows = list(csv.DictReader((ROOT / out_dir / "metrics.csv").open()))
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    loss = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    dropped = [float(r["moe_dropped"]) for r in rows if r.get("moe_dropped")]
    return {
        "val_steps": [s for s, _ in val], "val_loss": [v for _, v in val],
        "train_steps": [s for s, _ in loss], "train_loss": [v for _, v in loss],
        "moe_dropped_mean": sum(dropped) / len(dropped) if dropped else None,
    }  # fmt: skip


def plot(curves: dict[str, dict[str, list[float]]], models: dict[str, dict[str, Any]], path: Path) -> None:
    """Every run's validation curve: one colour per model, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = ["-", "--", ":", "-."]
    for index, (run, curve) in enumerate(curves.items()):
        name, seed = run.rsplit("-seed", 1)
        m = models[name]
        label = (
            f"{name} seed {seed}: {m['num_parameters'] / 1e6:.2f}M params, "
            f"{m['num_active_parameters'] / 1e6:.2f}M active, {m['flops_per_token'] / 1e6:.2f} MFLOP/token"
        )
        color = "tab:red" if name == "switch" else "tab:blue"
        style = styles[(index // 2) % len(styles)]
        ax.plot(
            curve["val_steps"][1:], curve["val_loss"][1:], style, color=color, marker="o", markersize=2.5, label=label
        )
    s = models["switch"]
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(
        f"Switch ({s['moe_experts']} experts, top-{s['moe_top_k']}, MoE in 1 of every {s['moe_every']} layers) vs dense, "
        "equal FLOPs per token",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches per evaluation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train both models once per seed")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--set", action="append", default=[], help="a config override for both runs")
    parser.add_argument("--switch-set", action="append", default=[], help="a config override for the Switch run")
    parser.add_argument("--runs", default="runs/moe_vs_dense", help="where the two runs write (under the repo)")
    parser.add_argument("--tag", default="moe_vs_dense")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = flops_per_token(args)
    gaps = check_equal_flops(models)
    runs = train_all(args)
    curves = {run: read_metrics(info["out_dir"]) for run, info in runs.items()}
    final = {run: curve["val_loss"][-1] for run, curve in curves.items()}
    winners = {
        seed: "switch" if final[f"switch-seed{seed}"] < final[f"dense-seed{seed}"] else "dense" for seed in args.seeds
    }
    for run, curve in curves.items():
        print(f"{run}: validation loss {curve['val_loss'][0]:.4f} -> {final[run]:.4f}")
    for seed, winner in winners.items():
        gap = final[f"dense-seed{seed}"] - final[f"switch-seed{seed}"]
        print(f"seed {seed}: lower validation loss after {args.steps} steps: {winner} (dense - switch = {gap:+.4f})")
    print(f"FLOPs per token differ by {100 * gaps['flops_per_token']:.3f}% (planner's forward count: "
          f"{100 * gaps['planner_forward_flops_per_token']:.3f}%)")  # fmt: skip
    png = RESULTS_DIR / f"{args.tag}.png"
    plot(curves, models, png)
    payload = {
        "steps": args.steps, "seeds": args.seeds, "overrides_both": args.set, "overrides_switch": args.switch_set,
        "configs": {name: str(path.relative_to(ROOT)) for name, path in CONFIGS.items()},
        "models": models, "flops_gap": gaps, "runs": runs, "curves": curves, "final_val_loss": final,
        "winner_by_seed": winners, "png": str(png.relative_to(ROOT)), "environment": environment(),
    }  # fmt: skip
    print(f"wrote {write_json(RESULTS_DIR / f'{args.tag}.json', payload)} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
