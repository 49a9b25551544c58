"""SFT of the demo's model on docstring -> body pairs: held-out response loss before and after (issue 19's Show).

Trains through the same code as `plait finetune configs/finetune/sft.toml` (plait.recipes.sft.run), one
process, on pairs from the corpus's training documents, and scores the held-out pairs (functions of the
validation documents `plait eval` uses; no held-out body occurs in a training document) on response tokens
only. One run per template: ``plain`` (### Instruction / ### Response, the default for plait's tokenizer,
whose format the base has never seen) and ``none`` (the header then the body, as the base saw code), so the
fall is not only the template being learnt.

    python benchmarks/finetune_sft.py [--base runs/gpt-10m/checkpoints/step-000300] [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, format_table, load_average, write_results

from plait.recipes.config import load_finetune_config
from plait.recipes.sft import run

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "finetune" / "sft.toml"
BASES = (
    "runs/gpt-10m-eval/checkpoints/step-000300",
    "runs/gpt-10m/checkpoints/step-000300",
)  # `make demo` writes the last


def default_base() -> str:
    return str(next((ROOT / base for base in BASES if (ROOT / base).is_dir()), ROOT / BASES[-1]))


def finetune(args: argparse.Namespace, *, template: str, out_dir: str) -> dict:
    overrides = [
        f"base.path={args.base}",
        f"data.template={template}",
        f"data.eval_examples={args.eval_examples}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.steps}",
        f"train.log_every={max(1, args.steps // 4)}",
        f"train.checkpoint_every={args.steps}",
        "plan.dp=1",
        f"train.out_dir={out_dir}",
    ]
    config = load_finetune_config(CONFIG, overrides)
    start = time.perf_counter()
    summary = run(config)
    return {
        "template": template,
        "held_out_loss_before": summary.first_eval_loss,
        "held_out_loss_after": summary.last_eval_loss,
        "fall": summary.first_eval_loss - summary.last_eval_loss,
        "train_loss_first": summary.losses[0],
        "train_loss_last": summary.losses[-1],
        "tokens_per_s": summary.tokens_per_s,
        "wall_s": time.perf_counter() - start,
        "overrides": overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=default_base())
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out pairs scored (all there are if fewer)")
    parser.add_argument("--templates", nargs="+", default=["plain", "none"])
    parser.add_argument("--out", default=str(RESULTS_DIR / "finetune-sft.json"))
    args = parser.parse_args()
    start, load_before = time.perf_counter(), load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="plait-sft-bench-") as scratch:
        for template in args.templates:
            rows.append(finetune(args, template=template, out_dir=f"{scratch}/{template}"))
    headers = ["template", "held-out loss before", "after", "fall", "train loss first", "last", "tokens/s"]
    table = [
        [r["template"], f"{r['held_out_loss_before']:.4f}", f"{r['held_out_loss_after']:.4f}", f"{r['fall']:.4f}",
         f"{r['train_loss_first']:.3f}", f"{r['train_loss_last']:.3f}", f"{r['tokens_per_s']:.0f}"]
        for r in rows
    ]  # fmt: skip
    print(format_table(headers, table))
    payload = {
        "base": args.base,
        "config": str(CONFIG.relative_to(ROOT)),
        "steps": args.steps,
        "runs": rows,
        "held_out_loss_falls": all(r["fall"] > 0 for r in rows),
    }
    phases = {r["template"]: r["wall_s"] for r in rows}
    write_results(args.out, payload, tag=None, load_before=load_before, started=start, phases=phases)


if __name__ == "__main__":
    main()
