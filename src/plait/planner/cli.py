"""`plait plan`: the ranked table of plans for a model on a cluster, and why the best wins."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from plait.planner.advice import explain_no_fit
from plait.planner.cluster import PRESETS, Cluster, parse_bytes
from plait.planner.report import format_table, why_best
from plait.planner.search import SearchSpace, search
from plait.planner.shape import load_shape
from plait.planner.workload import Workload


def add_plan_parser(commands: Any) -> None:
    plan = commands.add_parser("plan", help="estimate every plan's memory and speed and rank them (runs nothing)")
    plan.add_argument("--model", required=True, help="a preset name or a Hugging Face config.json")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu", default="h100", choices=sorted(PRESETS), help="data-sheet figures of the device")
    plan.add_argument("--gpu-mem", default=None, help="device memory, e.g. 80GiB (default: the preset's)")
    plan.add_argument("--calibrate", action="store_true", help="measure this machine (CPU ranks) instead of a preset")
    plan.add_argument("--global-batch", type=int, default=None, help="sequences per step (default 8 per device)")
    plan.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the model's context)")
    plan.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    plan.add_argument("--zero", type=int, nargs="+", default=None, help="ZeRO stages to consider")
    plan.add_argument("--recompute", nargs="+", default=None, choices=["none", "selective", "full"])
    plan.add_argument("--microbatches", type=int, nargs="+", default=None)
    plan.add_argument("--top", type=int, default=10)
    plan.add_argument("--json", default=None, help="also write every estimate to this JSON file")


def _cluster(args: argparse.Namespace, hidden: int, tokens: int) -> Cluster:
    if args.calibrate:
        from plait.amp.policy import PrecisionPolicy
        from plait.planner.calibrate import Probe, calibrate

        memory = parse_bytes(args.gpu_mem) if args.gpu_mem else None
        dtype = PrecisionPolicy.from_name(args.precision or "fp32").param_dtype
        probe = Probe(tokens=tokens, hidden=min(hidden, 1024), dtype=dtype)
        return calibrate(args.gpus_per_node, device_memory=memory, probe=probe).replace(nodes=args.nodes)
    cluster = Cluster.preset(args.gpu, nodes=args.nodes, devices_per_node=args.gpus_per_node)
    return cluster.replace(device_memory=parse_bytes(args.gpu_mem)) if args.gpu_mem else cluster


def _space(args: argparse.Namespace, cluster: Cluster) -> SearchSpace:
    options: dict[str, Any] = {"precision": args.precision or ("fp32" if cluster.backend == "gloo" else "bf16")}
    if args.zero:
        options["zero"] = tuple(args.zero)
    if args.recompute:
        options["recompute"] = tuple(args.recompute)
    if args.microbatches:
        options["microbatches"] = tuple(args.microbatches)
    return SearchSpace(**options)


def _count(num: int) -> str:
    return f"{num / 1e9:.3g}B" if num >= 1e9 else f"{num / 1e6:.3g}M"


def run_plan(args: argparse.Namespace) -> int:
    shape = load_shape(args.model)
    seq = args.seq or shape.config.max_seq_len
    if seq > shape.config.max_seq_len:
        raise ValueError(f"--seq {seq} is longer than the model's context ({shape.config.max_seq_len}); lower it")
    global_batch = args.global_batch or 8 * args.nodes * args.gpus_per_node
    workload = Workload(global_batch, seq)
    cluster = _cluster(args, shape.hidden, seq)
    space = _space(args, cluster)
    result = search(shape, workload, cluster=cluster, space=space)
    print(
        f"{shape.name}: {_count(shape.num_parameters())} parameters, global batch {global_batch} x {seq} tokens, "
        f"{cluster.nodes} x {cluster.devices_per_node} {cluster.name} ({cluster.device_memory / 2**30:.0f} GiB); "
        f"{len(result.estimates)} valid plans estimated in {result.seconds:.1f} s"
    )
    print(format_table(result, top=args.top))
    if args.json:
        Path(args.json).write_text(json.dumps([e.as_dict() for e in result.estimates], indent=1) + "\n")
    if result.best is None:
        print(explain_no_fit(result, shape, workload=workload, space=space))
        return 1
    print(why_best(result))
    return 0
