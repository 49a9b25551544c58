"""LoRA and QLoRA-style SFT of the demo's model (issue 19's Show): configs/finetune/lora.toml trained on
forked ranks (default dp=2 x ZeRO-2), once with an fp32 base and once with the base's targeted layers
held as int8 (lora.quantize = "int8").

For each variant:
1. the parameters in the optimizer (summed over the dp shards) against all the model's parameters;
2. the held-out response loss (docstring -> body pairs of validation documents, prompt masked) before
   and after training;
3. the last checkpoint exported merged (`plait export`'s export_hf) and loaded with
   transformers.AutoModelForCausalLM: its logits on held-out rows against plait's model with the
   adapters (rebuilt from the base and the checkpoint), max abs difference (the issue asks <= 1e-5).

    python benchmarks/finetune_lora.py                  # make demo first (its step-300 checkpoint)
    python benchmarks/finetune_lora.py --steps 10 --variants lora

Writes benchmarks/results/finetune_lora.json (--tag: -TAG suffix).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import RESULTS_DIR, format_table, load_average, run_ranks, write_results

from plait.checkpoint.hf_export import export_hf
from plait.checkpoint.io import checkpoint_name, load_checkpoint
from plait.distributed.launch import log_file
from plait.losses import causal_lm
from plait.recipes.base import load_base
from plait.recipes.config import load_finetune_config
from plait.recipes.loop import FinetuneRun
from plait.recipes.lora import add_lora, prepare, trainable_fraction
from plait.recipes.sft import SFTData
from plait.train import metrics

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "finetune" / "lora.toml"
VARIANTS = {"lora": [], "qlora-int8": ["lora.quantize=int8"]}


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as held: parameters and buffers (int8 bases are buffers)."""
    tensors = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}
    return sum(t.untyped_storage().nbytes() for t in tensors.values())


def merged_logits_gap(config: Any, checkpoint: Path, out_dir: Path, *, batch: dict[str, torch.Tensor]) -> float:
    """Max |logits| difference between transformers on the merged export and plait's model with adapters
    (the base with fresh adapters, then the checkpoint's weights loaded)."""
    import transformers

    export_hf(checkpoint, out_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ours = add_lora(load_base(config.base.path)[0], config.section("lora"))
    ours.load_state_dict(load_checkpoint(checkpoint)[0])
    ours.eval()
    with torch.no_grad():
        return (theirs(batch["input_ids"]).logits - ours(batch["input_ids"])).abs().max().item()


def train_variant(rank: int, overrides: list[str], sft_data: SFTData) -> dict[str, Any]:
    config = load_finetune_config(CONFIG, overrides)
    model, data, record = prepare(config, sft_data=sft_data)
    trainable, total = trainable_fraction(model)
    weight_bytes = model_bytes(model)
    started = time.perf_counter()
    with log_file(Path(config.train.out_dir) / "finetune.log"):
        run = FinetuneRun(config, model, loss_fn=causal_lm, data=data, record=record)
        summary = run.run()
        run.engine.close()
    optimized = sum(p.numel() for group in run.engine.optimizer.param_groups for p in group["params"])
    result = {
        "optimized_elements": optimized,
        "trainable": trainable,
        "total": total,
        "weight_bytes": weight_bytes,
        "state_bytes": run.engine.state_bytes(),
        "peak_rss_bytes": metrics.peak_rss_bytes(),
        "heldout_before": summary.first_eval_loss,
        "heldout_after": summary.last_eval_loss,
        "tokens_per_s": summary.tokens_per_s,
        "steps": summary.steps,
        "train_s": time.perf_counter() - started,
    }
    dist.barrier()
    if rank == 0:
        checkpoint = Path(config.train.out_dir) / "checkpoints" / checkpoint_name(summary.steps)
        hf_dir = Path(config.train.out_dir) / "hf"
        batch = sft_data.eval_batches(0, 1)[0]
        result["merged_max_abs_diff"] = merged_logits_gap(config, checkpoint, hf_dir, batch=batch)
    dist.barrier()
    return result


def train_rank(rank: int, world_size: int, common: list[str], variants: dict[str, list[str]]) -> dict[str, Any]:
    """Every variant in turn on this rank, on one set of SFT rows (built once: the corpus pass is slow)."""
    config = load_finetune_config(CONFIG, common)
    model, tokenizer = load_base(config.base.path)
    started = time.perf_counter()
    sft_data = SFTData.build(config.data, tokenizer, model=model, seed=config.train.seed)
    results = {"data_s": time.perf_counter() - started}
    for name, overrides in variants.items():
        results[name] = train_variant(rank, common + overrides, sft_data)
    return results


def row(name: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    first = ranks[0]
    optimized = sum(r["optimized_elements"] for r in ranks)
    return {
        "variant": name,
        "optimized_elements": optimized,
        "total_params": first["total"],
        "optimizer_fraction": optimized / first["total"],
        "trainable_fraction": first["trainable"] / first["total"],
        "weight_bytes_per_rank": first["weight_bytes"],
        "heldout_before": first["heldout_before"],
        "heldout_after": first["heldout_after"],
        "merged_max_abs_diff": first["merged_max_abs_diff"],
        "tokens_per_s": first["tokens_per_s"],
        "train_s": first["train_s"],
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
        "state_bytes_rank0": first["state_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/gpt-10m/checkpoints/step-000300")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if not Path(args.base).is_dir():
        raise SystemExit(f"{args.base} does not exist; run `make demo` first or pass --base CHECKPOINT")
    load_before = load_average()
    start = time.perf_counter()
    common = [f"base.path={args.base}", f"plan.zero={args.zero}", f"train.steps={args.steps}"]
    common.append(f"train.checkpoint_every={args.steps}")
    with tempfile.TemporaryDirectory() as scratch:
        variants = {name: [f"train.out_dir={scratch}/{name}", *VARIANTS[name]] for name in args.variants}
        ranks = run_ranks(train_rank, args.nproc, common, variants)
    rows = [row(name, [r[name] for r in ranks]) for name in args.variants]
    phases = {"data": ranks[0]["data_s"]} | {name: ranks[0][name]["train_s"] for name in args.variants}
    headers = ["variant", "in optimizer", "of params", "base bytes", "held-out before", "after", "merged |dlogit|"]
    table = [
        [
            r["variant"],
            f"{r['optimized_elements']:,}",
            f"{100 * r['optimizer_fraction']:.2f}%",
            f"{r['weight_bytes_per_rank'] / 2**20:.1f} MiB",
            f"{r['heldout_before']:.4f}",
            f"{r['heldout_after']:.4f}",
            f"{r['merged_max_abs_diff']:.2e}",
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    payload = {"args": vars(args), "rows": rows}
    write_results(
        RESULTS_DIR / "finetune_lora.json", payload, tag=args.tag, load_before=load_before, started=start, phases=phases
    )


if __name__ == "__main__":
    main()
