"""Hybrid sharding on two emulated nodes: ZeRO-3 over all 4 ranks vs sharded inside each node.

Two network namespaces joined by a tbf-shaped veth pair (scripts/netns.py, root only; the
set-up of benchmarks/multinode.py, whose helpers this reuses), 2 ranks per node, plan dp=4
with ZeRO-3 (stage set by --zero): "zero over 4" shards every unit over the 4 ranks, so every
all-gather and gradient reduction crosses the link; "hybrid" (plan.zero_shard='node') shards
over the 2 ranks of a node, gathers and reduces inside it, and sends only the all-reduce of
each rank's gradient shard (P/2 fp32 elements) to its replica on the other node.

The two runs alternate (A B A B, --repeats pairs) on one link; per run, from rank 0's rows of
metrics.csv: median step time after --skip steps, tokens/s, and the bytes rank 0 sent per step
across nodes and inside its node. "inter formula" is what plait's collectives should send
across nodes per step and rank, from the model's flat units (sizes P_u, padded to the shard
count): all-reduce of B over n ranks sends 2(n-1)/n B, all-gather (n-1)/n B; gloo reduces
with an all-reduce (plan.reduce_op auto); ZeRO-3 gathers a unit before each module's forward
that uses it (twice for the tied embedding and head) and once in backward. The step's scalars (loss, token count, gradient
norm) add a few bytes on top. The model is configs/gpt-tiny.toml widened to d_model 256
(3.7M parameters, vocab 8192), as in multinode.py.

    sudo .venv/bin/python benchmarks/hybrid.py                 # ~4 min on 2 cores
    sudo .venv/bin/python benchmarks/hybrid.py --zero 2 --rate 2.5gbit --repeats 1
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS_DIR, environment, format_bytes, format_table, load_average, write_json
from multinode import CONFIG, NODE0, RDZV_PORT, REPO, in_node, measure_tcp_gbit_s, netns, summarize

GLOBAL_BATCH, SEQ_LEN, RANKS_PER_NODE, DP = 8, 64, 2, 4
MODEL = ["model.d_model=256", "model.num_layers=2"]
SETUPS = {"zero over 4": "all", "hybrid (shard in node)": "node"}


def overrides(args: argparse.Namespace, out_dir: Path, zero_shard: str) -> list[str]:
    items = [
        *MODEL,
        f"data.seq_len={SEQ_LEN}",
        f"plan.dp={DP}",
        f"plan.zero={args.zero}",
        f"plan.zero_shard={zero_shard}",
        f"train.steps={args.steps}",
        f"train.global_batch={GLOBAL_BATCH}",
        "train.warmup=2",
        "train.log_every=1",
        f"train.eval_every={args.steps}",
        "train.eval_batches=1",
        f"train.checkpoint_every={args.steps}",
        f"train.out_dir='{out_dir}'",
    ]
    return [arg for item in items for arg in ("--set", item)]


def run_two_nodes(args: argparse.Namespace, out_dir: Path, zero_shard: str) -> None:
    endpoint = f"{NODE0}:{RDZV_PORT}"
    nodes = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "plait.cli", "train", str(CONFIG), "--nproc", str(RANKS_PER_NODE)]
        command += ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint]
        command += overrides(args, out_dir, zero_shard)
        nodes.append(in_node(rank, command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, node in enumerate(nodes):
        output, _ = node.communicate(timeout=900)
        if node.returncode != 0:
            raise SystemExit(f"node {rank} failed ({node.returncode}):\n{output[-3000:]}")


def model_units() -> tuple[list[int], list[int]]:
    """The benchmark model's flat units (built on the meta device): each one's parameter count, and the
    number of modules whose forward uses it (the tied embedding: the input embedding and the head)."""
    from plait.config import load_config, model_config_for
    from plait.models.gpt import GPT
    from plait.zero.partition import plan_units

    config = load_config(CONFIG, MODEL)
    with torch.device("meta"):
        model = GPT(model_config_for(config))
    specs, sites = plan_units(model)
    sizes = [sum(param.numel() for _, param in spec.named_params) for spec in specs]
    uses = [sum(index in site.unit_indices for site in sites) for index in range(len(specs))]
    return sizes, uses


def inter_formula(sizes: list[int], uses: list[int], *, zero: int, zero_shard: str) -> float:
    """fp32 bytes rank 0 sends across nodes per step (one micro-batch) in the ZeRO collectives."""
    if zero_shard == "node":  # each unit's shard of P/2, all-reduced over its 2 replicas
        shard = RANKS_PER_NODE
        replicas = DP // shard
        return sum(2 * (replicas - 1) / replicas * 4 * math.ceil(n / shard) for n in sizes)
    total = 0.0
    for numel, used in zip(sizes, uses, strict=True):
        padded = 4 * math.ceil(numel / DP) * DP
        # stages 1-2: one gather after the step; 3: one before each forward use (released after it),
        # and one when backward first reaches it (kept until its gradients are reduced)
        gathers = used + 1 if zero == 3 else 1
        total += 2 * (DP - 1) / DP * padded + gathers * (DP - 1) / DP * padded
    return total


def run_setup(args: argparse.Namespace, name: str, zero_shard: str, out_dir: Path, units: tuple) -> dict:
    run_two_nodes(args, out_dir, zero_shard)
    record: dict[str, Any] = {"setup": name, "zero_shard": zero_shard}
    record |= summarize(out_dir, skip=args.skip, tokens_per_step=GLOBAL_BATCH * SEQ_LEN)
    record["inter_formula_bytes"] = inter_formula(*units, zero=args.zero, zero_shard=zero_shard)
    record["load_average"] = load_average()
    print(f"  {name}: {record['tokens_per_s']:.0f} tokens/s, step {record['step_s_median']:.3f} s", flush=True)
    return record


def table(records: list[dict[str, Any]]) -> str:
    headers = ["setup", "run", "step s", "tokens/s", "inter-node/step", "inter formula", "intra-node/step"]
    rows = [
        [
            r["setup"],
            str(r["repeat"]),
            f"{r['step_s_median']:.3f}",
            f"{r['tokens_per_s']:.0f}",
            format_bytes(r["inter_bytes_per_step"]),
            format_bytes(r["inter_formula_bytes"]),
            format_bytes(r["intra_bytes_per_step"]),
        ]
        for r in records
    ]
    return format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="1gbit", help="the link's rate in tc's syntax")
    parser.add_argument("--zero", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="steps left out of the median (warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="A B pairs, alternating")
    parser.add_argument("--probe-mib", type=int, default=32, help="MiB sent by the TCP link probe")
    parser.add_argument("--out", default=str(RESULTS_DIR / "hybrid.json"))
    args = parser.parse_args()
    netns("check")  # not root, no ip or no tbf: its one line and exit code
    start = time.perf_counter()
    units = model_units()
    work = Path(tempfile.mkdtemp(prefix="plait-hybrid-"))
    records: list[dict[str, Any]] = []
    print(netns("up", "--rate", args.rate).strip())
    try:
        tcp_gbit_s = measure_tcp_gbit_s(args.probe_mib)
        for repeat in range(args.repeats):
            for name, zero_shard in SETUPS.items():
                out_dir = work / f"{zero_shard}-{repeat}"
                records.append(run_setup(args, name, zero_shard, out_dir, units) | {"repeat": repeat})
    finally:
        netns("down")
        shutil.rmtree(work, ignore_errors=True)
    baseline = records[0]["losses"]
    for record in records:  # both plans train the same model on the same data: the same losses
        record["max_rel_loss_diff"] = max(abs(a - b) / abs(b) for a, b in zip(record["losses"], baseline, strict=True))
    speedups = [
        hybrid["tokens_per_s"] / plain["tokens_per_s"]
        for plain, hybrid in zip(records[::2], records[1::2], strict=True)
    ]
    print()
    print(table(records))
    print(f"hybrid / zero over 4, tokens/s per pair: {', '.join(f'{s:.2f}x' for s in speedups)}")
    print(f"link: {args.rate} shaped, {tcp_gbit_s:.2f} Gbit/s measured (one TCP stream)")
    payload = {
        "benchmark": "hybrid",
        "environment": environment(),
        "settings": {**vars(args), "plan": f"dp={DP} as 2 nodes x {RANKS_PER_NODE}, ZeRO-{args.zero}"},
        "model": "tiny, d_model 256, 2 layers, vocab 8192",
        "parameters": sum(units[0]),
        "tcp_gbit_s": tcp_gbit_s,
        "speedup_per_pair": speedups,
        "speedup_median": statistics.median(speedups),
        "wall_s": time.perf_counter() - start,
        "results": records,
        "notes": "bytes are rank 0's per step (comm_inter_bytes, comm_intra_bytes of metrics.csv); inter formula: "
        "the ZeRO collectives only (the step's scalar all-reduces add a few bytes)",
    }
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
