"""Context parallel (plan.cp): throughput and ring overlap; memory per rank is benchmarks/context_memory.py.

Work: a Llama-style GPT (d_model 128, 4 heads, 2 kv heads, 4 layers, vocab 512), fp32 AdamW,
forked gloo ranks of one thread each.
- tokens/s: 2 rows of `--seq` tokens per step on 2 ranks, cp=2 (each rank two chunks of both rows)
  against cp=1 (dp=2: each rank one row), both engines in the same processes, A B A B;
- overlap: one attention layer's ring (forward + backward, cp=2) timed whole, its block
  computations alone (a ring of one that hands blocks straight back) and its p2p alone (the same
  shifts without compute); share of p2p hidden = (compute + p2p - ring) / p2p, in [0, 1] (with two
  one-thread ranks on 2 cores, gloo's transfer threads take the cores the blocks compute on).

    python benchmarks/context.py            # ~1-2 min on 2 cores
    python benchmarks/context.py --quick    # a smoke check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import (
    RESULTS_DIR,
    environment,
    finish,
    format_table,
    load_average,
    ratio_summary,
    run_alternating,
    run_ranks,
    timed_block,
)
from context_torch import torch_cp_main

import plait
from plait.context.layout import chunk_size
from plait.context.ring import Masks, Pending, Ring, ring_backward, ring_forward

MODEL = {"d_model": 128, "num_heads": 4, "num_kv_heads": 2, "num_layers": 4, "vocab_size": 512}


def build_engine(*, cp: int, seq: int) -> plait.Engine:
    torch.manual_seed(0)
    model = plait.models.build("tiny-llama", max_seq_len=seq, **MODEL)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-4, eps=1e-6)  # noqa: E731
    plan = plait.Plan(dp=-1, cp=cp, zero=1)
    return plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan)


def make_rows(num_rows: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, MODEL["vocab_size"], (num_rows, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


def throughput_main(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    rows = make_rows(2, args.seq)
    engines = {"cp1": build_engine(cp=1, seq=args.seq), "cp2": build_engine(cp=2, seq=args.seq)}
    batches = {"cp1": {k: v[rank : rank + 1] for k, v in rows.items()}, "cp2": rows}  # dp=2 vs cp peers share rows
    for name, engine in engines.items():  # warm-up
        engine.train_step(batches[name])

    def block(name: str) -> float:
        return timed_block(lambda: [engines[name].train_step(batches[name]) for _ in range(args.steps)])[0] / args.steps

    timed = run_alternating({name: (lambda n=name: block(n)) for name in engines}, num_pairs=args.pairs)
    tokens = 2 * args.seq
    return {
        "seconds": timed["seconds"],
        "tokens_per_s": {name: tokens / statistics.median(s) for name, s in timed["seconds"].items()},
        "cp2_over_cp1": ratio_summary(timed["seconds"]["cp1"], timed["seconds"]["cp2"]),
        "overlap": measure_overlap(rank, world_size, args),
    }


class LocalRing(Ring):
    """The blocks a ring would bring, handed straight back: the ring's compute without its p2p."""

    def shift(self, tensor: torch.Tensor) -> Pending:
        return Pending(tensor, [])


def measure_overlap(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    heads, head_dim = MODEL["num_heads"], MODEL["d_model"] // MODEL["num_heads"]
    chunk = chunk_size(args.seq, world_size)
    gen = torch.Generator().manual_seed(rank)
    q, d_out, out = (torch.randn(2, heads, 2 * chunk, head_dim, generator=gen) for _ in range(3))
    kv = torch.randn(2, 2, MODEL["num_kv_heads"], 2 * chunk, head_dim, generator=gen)  # k/v travel with kv heads
    ring = Ring(group=dist.group.WORLD, rank=rank, size=world_size, ranks=list(range(world_size)))
    local = LocalRing(group=dist.group.WORLD, rank=rank, size=world_size, ranks=list(range(world_size)))
    masks = Masks(rank=rank, size=world_size, chunk=chunk, starts=None)
    scale = head_dim**-0.5
    lse = ring_forward(q, kv, ring=ring, masks=masks, scale=scale)[1]

    def attention(on: Ring) -> None:
        ring_forward(q, kv, ring=on, masks=masks, scale=scale)
        ring_backward(q, kv, grad=(d_out, out, lse), ring=on, masks=masks, scale=scale)

    def p2p_only() -> None:  # forward: cp-1 key/value hops; backward: cp-1 again and cp-1 of dK/dV
        for _ in range(3 * (world_size - 1)):
            ring.shift(kv).wait()

    runs: dict[str, list[float]] = {"ring": [], "compute": [], "p2p": []}
    for _ in range(args.pairs):
        for name, run in (("ring", lambda: attention(ring)), ("compute", lambda: attention(local)), ("p2p", p2p_only)):
            runs[name].append(timed_block(run)[0])
    medians = {name: statistics.median(values) for name, values in runs.items()}
    hidden = (medians["compute"] + medians["p2p"] - medians["ring"]) / medians["p2p"]
    return {"seconds": runs, "median_s": medians, "p2p_hidden_share": min(1.0, max(0.0, hidden))}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(5.5, 4))
    speeds = dict(results["throughput"]["tokens_per_s"])
    if results["torch_context_parallel"]["ran"]:
        speeds["torch cp2"] = results["torch_context_parallel"]["tokens_per_s"]
    left.bar(list(speeds), list(speeds.values()), color=["tab:gray", "tab:blue", "tab:orange"][: len(speeds)])
    left.set_ylabel("tokens/s (2 ranks)")
    left.set_title(
        f"seq {results['args']['seq']}: cp=2 vs cp=1 (dp=2)"
        + ("" if results["torch_context_parallel"]["ran"] else "; torch CP fails on CPU")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.seq, args.pairs, args.steps = 256, 2, 1
    stem = "context-quick" if args.quick else "context"
    out = args.out or RESULTS_DIR / f"{stem}.json"
    started, loads = time.perf_counter(), {"start": load_average()}
    throughput = run_ranks(throughput_main, 2, args)[0]
    phase = {"throughput": time.perf_counter() - started}
    loads["after_throughput"] = load_average()
    torch_cp = run_ranks(torch_cp_main, 2, args, MODEL)[0]
    phase["torch_context_parallel"] = time.perf_counter() - started - phase["throughput"]
    ratio = throughput["cp2_over_cp1"]
    speeds = [[f"plait {k}", f"{v:,.0f}"] for k, v in throughput["tokens_per_s"].items()]
    speeds.append(["torch context_parallel cp2", f"{torch_cp['tokens_per_s']:,.0f}" if torch_cp["ran"] else "fails"])
    print(format_table(["plan (2 ranks)", "tokens/s"], speeds))
    if not torch_cp["ran"]:
        print(f"torch context_parallel: {torch_cp['error']}")
    print(f"step time cp1/cp2 = {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f})")
    overlap = throughput["overlap"]["median_s"]
    print(
        f"one layer's ring (fwd+bwd, cp=2): {overlap['ring'] * 1e3:.1f} ms; compute alone {overlap['compute'] * 1e3:.1f} ms, "
        f"p2p alone {overlap['p2p'] * 1e3:.1f} ms; share of p2p hidden {throughput['overlap']['p2p_hidden_share']:.2f}"
    )
    payload = {
        "environment": environment(),
        "args": vars(args) | {"out": str(out)},
        "load_average": loads,
        "throughput": throughput,
        "torch_context_parallel": torch_cp,
    }
    plot(payload, out.with_suffix(".png"))
    finish(out, payload, wall_s=time.perf_counter() - started, phase_wall_s=phase)


if __name__ == "__main__":
    sys.exit(main())
