"""A tiny Switch model against the dense model of the same FLOPs per token, after the same steps.

Trains configs/switch-tiny.toml and configs/switch-tiny-dense.toml with `plait train` (the same
data, batch, steps, learning rate and schedule; the configs' plan), one after the other, reads
each run's metrics.csv and plots both validation-loss curves in one PNG. Before training it checks
that the two models compute the same FLOPs per token (`GPTConfig.flops_per_token`, which counts an
MoE model's active parameters: its router and top_k experts), apart from the router's matmul.

    python benchmarks/moe_vs_dense.py                          # 1000 steps each (~2-3 min on 2 cores)
    python benchmarks/moe_vs_dense.py --steps 3000 --set train.lr=2e-3   # --set applies to both runs
    python benchmarks/moe_vs_dense.py --switch-set model.moe_capacity_factor=2.0   # the Switch run only

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


def run_overrides(args: argparse.Namespace, name: str) -> list[str]:
    out_dir = Path(args.runs) / f"{args.tag}-{name}"
    common = [
        f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", f"train.log_every={args.eval_every}",
        f"train.checkpoint_every={10 * args.steps}", f"train.out_dir={out_dir}",
    ]  # fmt: skip
    return common + list(args.set) + (list(args.switch_set) if name == "switch" else [])


def flops_per_token(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each run's model: FLOPs per token (training), parameters, active parameters."""
    out = {}
    for name, path in CONFIGS.items():
        config = load_config(path, run_overrides(args, name))
        model = model_config_for(config)
        out[name] = {
            "flops_per_token": model.flops_per_token(config.data.seq_len),
            "num_parameters": model.num_parameters(),
            "num_active_parameters": model.num_active_parameters(),
            "out_dir": config.train.out_dir,
        }
    return out


def check_equal_flops(models: dict[str, dict[str, Any]]) -> float:
    switch, dense = models["switch"]["flops_per_token"], models["dense"]["flops_per_token"]
    gap = (switch - dense) / dense
    if not 0 <= gap < ROUTER_SHARE_LIMIT:
        raise SystemExit(f"the two configs differ in FLOPs per token by {100 * gap:.2f}%: not a like-for-like pair")
    return gap


def train(args: argparse.Namespace, name: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "plait.cli", "train", str(CONFIGS[name])]
    for override in run_overrides(args, name):
        command += ["--set", override]
    print(" ".join(command[2:]), flush=True)
    load_before = load_average()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{name} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "load_before": load_before, "load_after": load_average()}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        m = models[name]
        label = (
            f"{name}: {m['num_parameters'] / 1e6:.2f}M params, {m['num_active_parameters'] / 1e6:.2f}M active, "
            f"{m['flops_per_token'] / 1e6:.2f} MFLOP/token"
        )
        ax.plot(curve["val_steps"], curve["val_loss"], marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Switch (4 experts, top-1) vs dense, equal FLOPs per token")
    ax.set_ylim(top=min(8.0, max(max(c["val_loss"]) for c in curves.values())))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], help="a config override for both runs")
    parser.add_argument("--switch-set", action="append", default=[], help="a config override for the Switch run")
    parser.add_argument("--runs", default="runs/moe_vs_dense", help="where the two runs write (under the repo)")
    parser.add_argument("--tag", default="moe_vs_dense")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = flops_per_token(args)
    gap = check_equal_flops(models)
    runs = {name: train(args, name) for name in CONFIGS}
    curves = {name: read_metrics(models[name]["out_dir"]) for name in CONFIGS}
    final = {name: curve["val_loss"][-1] for name, curve in curves.items()}
    winner = "switch" if final["switch"] < final["dense"] else "dense"
    for name in CONFIGS:
        print(f"{name}: validation loss {curves[name]['val_loss'][0]:.4f} -> {final[name]:.4f}")
    print(f"lower validation loss after {args.steps} steps: {winner} (FLOPs per token differ by {100 * gap:.3f}%)")
    png = RESULTS_DIR / f"{args.tag}.png"
    plot(curves, models, png)
    payload = {
        "steps": args.steps, "overrides_both": args.set, "overrides_switch": args.switch_set,
        "models": models, "flops_gap": gap, "runs": runs, "curves": curves, "final_val_loss": final,
        "winner": winner, "png": str(png.relative_to(ROOT)), "environment": environment(),
    }  # fmt: skip
    print(f"wrote {write_json(RESULTS_DIR / f'{args.tag}.json', payload)} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
