"""Generation with and without the KV cache, side by side in one run: tokens/s of `plait generate`'s
sampler (batch 1, `plait.train.generate.sample`) and of an RL rollout group (batch > 1, rows sharing
the prompt, `plait.recipes.rollout.sample_group`), uncached (the whole prefix each token) against
cached (`plait.train.decoding.IncrementalDecoder`), alternating which runs first in each pair.

Models (random weights, fp32): plait's gpt-10m preset (its context raised to 512 so that a 64-token
prompt and 256 new tokens fit) and a tiny Hugging Face Llama (transformers' LlamaForCausalLM, 4 layers,
d 256, GQA 4/2, vocab 8192). Each case also checks that both ways drew the same tokens.

    python benchmarks/generate_kv.py
    python benchmarks/generate_kv.py --cases 1x64 8x256 --pairs 5

Writes benchmarks/results/generate_kv.json (--tag: -TAG suffix).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from common import RESULTS_DIR, format_table, load_average, ratio_summary, run_alternating, write_results

import plait
from plait.recipes.rollout import SamplingConfig, sample_group
from plait.train.generate import sample

PROMPT_TOKENS = 64


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    gpt = plait.models.build("gpt-10m", max_seq_len=512)
    llama = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return {"gpt-10m": gpt.eval(), "hf-llama-tiny": transformers.LlamaForCausalLM(llama).eval()}


def generate_once(model: torch.nn.Module, *, batch: int, new: int, cache: bool) -> tuple[float, list]:
    """Seconds to draw ``new`` tokens for ``batch`` rows, and the tokens drawn."""
    prompt = torch.randint(0, 8192, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(7)).tolist()
    start = time.perf_counter()
    if batch == 1:
        ids = sample(model, prompt, max_new_tokens=new, temperature=1.0, top_k=50, seed=1, kv_cache=cache)
    else:
        sampling = SamplingConfig(max_new_tokens=new, temperature=1.0, top_k=50, seed=1, kv_cache=cache)
        ids = sample_group(model, prompt, num_samples=batch, first_index=0, sampling=sampling, eos_id=-1)[0].tolist()
    return time.perf_counter() - start, ids


def run_case(model: torch.nn.Module, *, batch: int, new: int, num_pairs: int) -> dict[str, Any]:
    drawn: dict[str, list] = {}

    def block(name: str, cache: bool) -> Callable[[], float]:
        def run() -> float:
            seconds, drawn[name] = generate_once(model, batch=batch, new=new, cache=cache)
            return seconds

        return run

    timings = run_alternating(
        {"uncached": block("uncached", False), "cached": block("cached", True)}, num_pairs=num_pairs
    )
    seconds = timings["seconds"]
    tokens = batch * new
    speedup = ratio_summary(seconds["uncached"], seconds["cached"])
    return {
        "batch": batch,
        "new_tokens": new,
        "prompt_tokens": PROMPT_TOKENS,
        "seconds": seconds,
        "orders": timings["orders"],
        "tokens_per_s": {name: tokens / statistics.median(values) for name, values in seconds.items()},
        "speedup": speedup,
        "same_tokens": drawn["uncached"] == drawn["cached"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["1x64", "1x256", "8x64", "8x256"], help="BATCHxNEW")
    parser.add_argument("--pairs", type=int, default=3, help="uncached/cached pairs per case (order alternates)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    cases = [tuple(int(n) for n in case.split("x")) for case in args.cases]
    torch.set_num_threads(args.threads)
    load_before, start = load_average(), time.perf_counter()
    rows, phases = [], {}
    for name, model in build_models().items():
        phase_start = time.perf_counter()
        for batch, new in cases:
            rows.append({"model": name, **run_case(model, batch=batch, new=new, num_pairs=args.pairs)})
            print(f"{name} batch {batch} new {new}: done (load {load_average():.1f})", flush=True)
        phases[name] = time.perf_counter() - phase_start
    headers = ["model", "batch", "new", "uncached tok/s", "cached tok/s", "speedup (median [min, max])", "same"]
    table = [
        [
            r["model"],
            r["batch"],
            r["new_tokens"],
            f"{r['tokens_per_s']['uncached']:.1f}",
            f"{r['tokens_per_s']['cached']:.1f}",
            f"{r['speedup']['median']:.2f}x [{r['speedup']['min']:.2f}, {r['speedup']['max']:.2f}]",
            r["same_tokens"],
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    payload = {
        "args": vars(args),
        "note": "tokens/s from each way's median block; speedup = uncached s / cached s per pair",
        "rows": rows,
    }
    write_results(
        RESULTS_DIR / "generate_kv.json", payload, tag=args.tag, load_before=load_before, started=start, phases=phases
    )


if __name__ == "__main__":
    main()
