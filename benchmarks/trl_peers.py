"""plait's fine-tuning recipes against TRL's trainers on the same model and data, one process each
(issue 19's peer Show): tokens/s and peak memory side by side, blocks alternated, ratios.

SFT: the demo's model (a plait checkpoint; TRL trains its Hugging Face export, the same weights as a
GPT2LMHeadModel) on the first --examples docstring -> body pairs of the corpus's training documents, the
prompt (### Instruction / ### Response template) masked from the loss on both sides, AdamW at a constant lr,
batches of --batch sequences, one thread. Systems:

- ``plait``: plait's SFT recipe as `plait finetune` runs it: pairs packed into --seq-len rows, each pair
  attending only to itself (position ids per pair);
- ``plait-unpacked``: the same recipe with data.pack=false, one pair per row (TRL's layout);
- ``trl``: TRL's SFTTrainer on prompt/completion records, completion-only loss, no packing (TRL's packing
  keeps pairs apart only with FlashAttention, which this CPU has not: padding_free needs it).

Each block trains over the same examples in a forked child (fresh peak-RSS mark after set-up); blocks run in
rounds whose order rotates (A B C, B C A, C A B, ...). tokens/s counts the pairs' own tokens (no padding),
so packing's gain shows.

DPO (``--only dpo``): plait's DPO recipe against TRL's DPOTrainer on the first --examples corpus preference
pairs (true body chosen, corrupted body rejected) of training documents, --dpo-batch pairs a step, beta 0.1;
each with its reference a frozen copy of the base evaluated every step; tokens/s counts prompt + response
tokens of both rows of every pair (no padding).

    python benchmarks/trl_peers.py [--rounds 4] [--examples 96] [--only sft]
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    current_rss_bytes,
    format_bytes,
    format_table,
    load_average,
    peak_rss_bytes,
    ratio_summary,
    reset_peak_rss,
    spread,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent
BASES = ("runs/gpt-10m-eval/checkpoints/step-000300", "runs/gpt-10m/checkpoints/step-000300")
LR = 1e-4


def default_base() -> str:
    return str(next((ROOT / base for base in BASES if (ROOT / base).is_dir()), ROOT / BASES[-1]))


def trl_records(examples: list) -> list[dict[str, str]]:
    """plait's pairs as TRL's prompt/completion records, the prompt in plait's plain template (TRL ends the
    completion with the end-of-sequence token, as plait's template does)."""
    from plait.recipes.data.instructions import PLAIN_PROMPT

    return [
        {"prompt": PLAIN_PROMPT.format(content=e.turns[0].content), "completion": e.turns[1].content} for e in examples
    ]


def plait_sft_block(args: argparse.Namespace, *, pack_rows: bool) -> dict[str, float]:
    """Train plait's SFT recipe over the pairs; seconds of the steps, tokens trained, steady peak RSS."""
    import plait
    from plait.recipes.base import load_base
    from plait.recipes.data.instructions import pack, render
    from plait.recipes.sft import LOSS_FN, SFTData

    model, tokenizer = load_base(args.base)
    rendered = [render(e, tokenizer, template="plain") for e in args.pairs]
    rows = pack(rendered, seq_len=args.seq_len, pack=pack_rows)
    data = SFTData(train_rows=rows, eval_rows=[], seq_len=args.seq_len, pad_id=tokenizer.eot_id, positions=True)
    engine = plait.boost(
        model,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0),
        loss_fn=LOSS_FN,
        plan=plait.Plan(),
        max_grad_norm=1.0,
    )
    steps = math.ceil(len(rows) / args.batch)
    batches = [data.train_batch(s, 0, 1, global_batch=args.batch) for s in range(steps)]
    tokens = sum(len(t.ids) for s in range(steps) for row in data.step_rows(s, global_batch=args.batch) for t in row)
    reset_peak_rss()
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    for batch in batches:
        engine.train_step(batch)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "steps": steps, **memory(rss_before)}


def trl_sft_block(args: argparse.Namespace) -> dict[str, float]:
    """TRL's SFTTrainer over the same pairs (the base's Hugging Face export)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = hf_model(args.hf_dir)
    records = trl_records(args.pairs)
    with tempfile.TemporaryDirectory(prefix="trl-sft-") as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch, num_train_epochs=1, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            max_length=args.seq_len, packing=False, completion_only_loss=True, save_strategy="no",
            report_to=[], logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
            disable_tqdm=True, optim="adamw_torch",
        )  # fmt: skip
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer
        )
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        return {"tokens": tokens, **timed_train(trainer)}


def memory(rss_before: int | None) -> dict[str, float]:
    """Peak RSS over the training steps, and its growth over the RSS the block had set up (the forked
    children share the parent's pages, which both peaks count alike)."""
    peak = peak_rss_bytes() or 0
    return {"peak_rss": peak, "peak_rss_growth": peak - (rss_before or 0)}


def hf_model(hf_dir: str) -> tuple[Any, Any]:
    """The base's Hugging Face export in fp32 and its tokenizer, padding with the end-of-sequence token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), tokenizer


def timed_train(trainer: Any) -> dict[str, float]:
    """A TRL trainer's whole train(), timed, from a fresh peak-RSS mark."""
    reset_peak_rss()
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": result.global_step, **memory(rss_before)}


def _child(block: Callable[[], dict], queue: Any) -> None:
    torch.set_num_threads(1)
    queue.put(block())


def forked(block: Callable[[], dict]) -> dict[str, float]:
    """Run `block` in a forked child (its own peak-RSS mark, nothing left behind) and return its result."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(block, queue))
    child.start()
    result = queue.get(timeout=1800)
    child.join()
    return result


def rotated(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def run_sft(args: argparse.Namespace) -> dict[str, Any]:
    from plait.recipes.data.instructions import corpus_examples

    args.pairs = corpus_examples("stdlib", val_fraction=0.01, held=False)[: args.examples]
    blocks = {
        "plait": lambda: plait_sft_block(args, pack_rows=True),
        "plait-unpacked": lambda: plait_sft_block(args, pack_rows=False),
        "trl": lambda: trl_sft_block(args),
    }
    return rounds(args, blocks, label="")


def rounds(args: argparse.Namespace, blocks: dict[str, Callable[[], dict]], *, label: str) -> dict[str, Any]:
    """Export the base for TRL (args.hf_dir), then run every block once a round in rotated order, each in a
    forked child; the summary of all rounds."""
    from plait.checkpoint.hf_export import export_hf

    scratch = tempfile.TemporaryDirectory(prefix="trl-peer-hf-")
    export_hf(args.base, scratch.name)
    args.hf_dir = scratch.name
    runs: dict[str, list[dict]] = {name: [] for name in blocks}
    orders = []
    for index in range(args.rounds):
        order = rotated(list(blocks), index)
        orders.append(order)
        for name in order:
            runs[name].append(forked(blocks[name]))
            print(f"round {index + 1}/{args.rounds} {label}{name}: {runs[name][-1]}", flush=True)
    scratch.cleanup()
    return summarise(runs, orders)


def summarise(runs: dict[str, list[dict]], orders: list[list[str]]) -> dict[str, Any]:
    rates = {name: [r["tokens"] / r["seconds"] for r in results] for name, results in runs.items()}
    peaks = {name: [r["peak_rss"] for r in results] for name, results in runs.items()}
    growth = {name: [r["peak_rss_growth"] for r in results] for name, results in runs.items()}
    return {
        "runs": runs,
        "orders": orders,
        "tokens_per_s": {name: spread(values) for name, values in rates.items()},
        "peak_rss_bytes": {name: spread(values) for name, values in peaks.items()},
        "peak_rss_growth_bytes": {name: spread(values) for name, values in growth.items()},
        "ratio_tokens_per_s_vs_trl": {n: ratio_summary(rates[n], rates["trl"]) for n in rates if n != "trl"},
        "ratio_peak_rss_vs_trl": {n: ratio_summary(peaks[n], peaks["trl"]) for n in peaks if n != "trl"},
    }


def plait_dpo_block(args: argparse.Namespace) -> dict[str, float]:
    """plait's DPO recipe over the preference pairs: the reference a frozen copy of the base, its log-probs
    computed each step under no_grad (as `plait finetune` does), rows cut to the batch's longest."""
    import plait
    from plait.recipes.base import load_base
    from plait.recipes.dpo import DPOLoss, with_reference_logps
    from plait.recipes.preference_run import PreferenceData

    model, tokenizer = load_base(args.base)
    data = PreferenceData(args.dpo_pairs, [], tokenizer, seq_len=args.seq_len)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    engine = plait.boost(
        model,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=DPO_LR, weight_decay=0.0),
        loss_fn=DPOLoss(beta=DPO_BETA),
        plan=plait.Plan(),
        max_grad_norm=1.0,
    )
    steps = math.ceil(len(args.dpo_pairs) / args.dpo_batch)
    batches = [data.train_batch(s, 0, 1, global_batch=2 * args.dpo_batch) for s in range(steps)]
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    reset_peak_rss()
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    for batch in batches:
        engine.train_step(with_reference_logps(reference, batch))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "steps": steps, **memory(rss_before)}


def trl_dpo_block(args: argparse.Namespace) -> dict[str, float]:
    """TRL's DPOTrainer over the same pairs (the base's Hugging Face export; its reference a frozen copy of the
    model evaluated each step, TRL's default; TRL appends EOS to each response)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = hf_model(args.hf_dir)
    records = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in args.dpo_pairs]
    with tempfile.TemporaryDirectory(prefix="trl-dpo-") as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.dpo_batch, num_train_epochs=1, learning_rate=DPO_LR,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=DPO_BETA,
            max_length=args.seq_len, truncation_mode="keep_start", save_strategy="no", report_to=[],
            logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
            optim="adamw_torch",
        )  # fmt: skip
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer
        )
        data = trainer.train_dataset
        tokens = sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
        )
        return {"tokens": tokens, **timed_train(trainer)}


def run_dpo(args: argparse.Namespace) -> dict[str, Any]:
    """plait DPO vs TRL's DPOTrainer: the first --examples corpus preference pairs of training documents,
    --dpo-batch pairs a step, AdamW at a constant lr, beta 0.1, one thread each."""
    from plait.recipes.data.preferences import corpus_pairs

    args.dpo_pairs = corpus_pairs("stdlib", split="train", per_function=1)[: args.examples]
    blocks = {"plait": lambda: plait_dpo_block(args), "trl": lambda: trl_dpo_block(args)}
    return rounds(args, blocks, label="dpo ")


DPO_LR = 5e-5
DPO_BETA = 0.1
PEERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"sft": run_sft, "dpo": run_dpo}


def print_table(name: str, result: dict[str, Any]) -> None:
    rows = []
    for system, rate in result["tokens_per_s"].items():
        ratio = result["ratio_tokens_per_s_vs_trl"].get(system, {}).get("median", 1.0)
        peak = result["peak_rss_bytes"][system]["median"]
        memory = result["ratio_peak_rss_vs_trl"].get(system, {}).get("median", 1.0)
        grown = format_bytes(result["peak_rss_growth_bytes"][system]["median"])
        rows.append([system, f"{rate['median']:.0f}", f"{ratio:.2f}", format_bytes(peak), f"{memory:.2f}", grown])
    print(f"\n{name}")
    headers = ["system", "tokens/s (median)", "x trl", "peak RSS (median)", "x trl", "growth in steps"]
    print(format_table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=default_base())
    parser.add_argument("--only", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dpo-batch", type=int, default=4, help="dpo: pairs per step (2 rows each)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "trl-peers.json"))
    args = parser.parse_args()
    start, load_before = time.perf_counter(), load_average()
    results, walls = {}, {}
    for name in args.only:
        began = time.perf_counter()
        results[name] = PEERS[name](args)
        walls[name] = time.perf_counter() - began
        print_table(name, results[name])
    settings = {k: v for k, v in vars(args).items() if k not in ("pairs", "dpo_pairs", "hf_dir")}
    payload = {"settings": settings, "results": results}
    write_results(args.out, payload, tag=None, load_before=load_before, started=start, phases=walls)


if __name__ == "__main__":
    main()
