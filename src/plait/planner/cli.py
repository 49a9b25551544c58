"""`plait plan`: the ranked table of plans for a model on a cluster, and why the best wins."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from plait.config import Plan
from plait.planner.advice import explain_no_fit
from plait.planner.cluster import PRESETS, Cluster, parse_bytes
from plait.planner.estimate import Estimator
from plait.planner.evaluate import checked_plan, format_estimate, parse_plan_fields, plan_to_evaluate
from plait.planner.hardware import DISK_EXAMPLE, parse_disk, parse_host_memory, with_host_and_disk
from plait.planner.plan_string import EXAMPLE as PLAN_EXAMPLE
from plait.planner.plan_string import parse_fields, parse_plan, plan_string
from plait.planner.report import format_table, why_best
from plait.planner.search import SearchSpace, search
from plait.planner.shape import ModelShape, load_shape
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
    plan.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16", "auto"])
    plan.add_argument("--zero", type=int, nargs="+", default=None, help="ZeRO stages to consider")
    plan.add_argument("--recompute", nargs="+", default=None, choices=["none", "selective", "full"])
    plan.add_argument("--microbatches", type=int, nargs="+", default=None)
    plan.add_argument(
        "--zero-shard", nargs="+", default=None, choices=["all", "node"],
        help="ZeRO shard groups to consider: all dp ranks (default), node (hybrid: shard inside a node)",
    )  # fmt: skip
    plan.add_argument("--top", type=int, default=10)
    plan.add_argument("--json", default=None, help="also write every estimate to this JSON file")
    plan.add_argument("--host-mem", default=None, help="host memory per node for offloaded state, e.g. 512GiB")
    plan.add_argument("--disk", default=None, help=f"a local disk per node for offloaded state, e.g. {DISK_EXAMPLE}")
    plan.add_argument(
        "--offload-dir",
        default=None,
        help="where disk offload goes (and --calibrate times the disk; default: temp dir)",
    )
    plan.add_argument(
        "--offload", default="auto", choices=["auto", "none"], help="auto: consider offloading to host memory and disk"
    )
    plan.add_argument(
        "--max-grad-norm", type=float, default=1.0,
        help="the run's gradient clipping (0: none; decides whether offloaded updates run inside backward)",
    )  # fmt: skip
    plan.add_argument(
        "--evaluate", default=None, metavar="KEY=VALUE,...",
        help="estimate this one plan instead of searching, e.g. zero=3,offload_optimizer=disk,offload_dir=/x",
    )  # fmt: skip
    plan.add_argument(
        "--plan", default=None, metavar="PLAN",
        help=f'evaluate exactly this plan (Plan\'s field names), e.g. "{PLAN_EXAMPLE}": memory breakdown, step '
        "time, why it fits or not (precision, when not given, is --precision's)",
    )  # fmt: skip
    plan.add_argument(
        "--profile", default="plait", choices=["plait", "megatron"],
        help="layer accounting: plait's runtime, or Megatron-LM's (materialised attention scores, its kernels)",
    )  # fmt: skip


def _cluster(args: argparse.Namespace, hidden: int, tokens: int) -> Cluster:
    if args.calibrate:
        from plait.amp.policy import PrecisionPolicy
        from plait.planner.calibrate import Probe, calibrate

        memory = parse_bytes(args.gpu_mem) if args.gpu_mem else None
        dtype = PrecisionPolicy.from_name(_on_cpu(args.precision or "fp32")).param_dtype
        probe = Probe(tokens=tokens, hidden=min(hidden, 1024), dtype=dtype)
        cluster = calibrate(args.gpus_per_node, device_memory=memory, probe=probe, io_dir=_offload_dir(args))
        cluster = cluster.replace(nodes=args.nodes)
    else:
        cluster = Cluster.preset(args.gpu, nodes=args.nodes, devices_per_node=args.gpus_per_node)
        cluster = cluster.replace(device_memory=parse_bytes(args.gpu_mem)) if args.gpu_mem else cluster
    return with_host_and_disk(cluster, host_mem=args.host_mem, disk=args.disk)


def _offload_dir(args: argparse.Namespace) -> str:
    return args.offload_dir or tempfile.gettempdir()


def _offload_tiers(args: argparse.Namespace, cluster: Cluster) -> tuple[str, ...]:
    if args.offload == "none":
        return ()
    has_host = cluster.host_memory > 0 and not cluster.host_is_device  # on CPUs the host is the device already
    return ("cpu",) * has_host + ("disk",) * (cluster.disk is not None)


def _space(args: argparse.Namespace, cluster: Cluster) -> SearchSpace:
    options: dict[str, Any] = {"precision": _precision(args, cluster)}
    options |= {"offload": _offload_tiers(args, cluster), "offload_dir": _offload_dir(args)}
    if args.zero:
        options["zero"] = tuple(args.zero)
    if args.recompute:
        options["recompute"] = tuple(args.recompute)
    if args.microbatches:
        options["microbatches"] = tuple(args.microbatches)
    if args.zero_shard:
        options["zero_shard"] = tuple(args.zero_shard)
    return SearchSpace(**options)


def _precision(args: argparse.Namespace, cluster: Cluster) -> str:
    """--precision, by default fp32 on CPU ranks and bf16 on GPUs; "auto" resolved for the cluster."""
    if args.precision == "auto":  # GPU presets all have bf16 tensor cores; CPU ranks are this machine's
        return _on_cpu("auto") if cluster.backend == "gloo" else "bf16"
    return args.precision or ("fp32" if cluster.backend == "gloo" else "bf16")


def _on_cpu(precision: str) -> str:
    from plait.distributed.precision import resolve_precision

    return resolve_precision(precision, device_type="cpu").precision


def _count(num: int) -> str:
    return f"{num / 1e9:.3g}B" if num >= 1e9 else f"{num / 1e6:.3g}M"


def _host_text(cluster: Cluster) -> str:
    text = f", host {cluster.host_memory / 2**30:.0f} GiB per node" if cluster.host_memory else ""
    disk = cluster.disk
    if disk is not None:
        text += (
            f", disk {disk.capacity / 1e9:.0f} GB at {disk.read_bandwidth / 1e9:.2g} GB/s read, "
            f"{disk.write_bandwidth / 1e9:.2g} GB/s write"
        )
    return text


def _check_options(args: argparse.Namespace) -> None:
    """Read --disk, --host-mem and --evaluate before calibrating, so a typo fails at once."""
    if args.disk:
        parse_disk(args.disk)
    if args.host_mem:
        parse_host_memory(args.host_mem)
    if args.evaluate:
        parse_plan_fields(args.evaluate)
    if args.plan:
        parse_plan(args.plan)
    if args.plan and args.evaluate:
        raise ValueError("--plan and --evaluate both name one plan; give one of them")


def _evaluate(args: argparse.Namespace, shape: ModelShape, workload: Workload, cluster: Cluster) -> int:
    """`--evaluate`: the one plan's estimate in full; exit 1 where it does not fit."""
    world = cluster.num_devices
    if args.plan:
        fields = {"precision": _precision(args, cluster)} | parse_fields(args.plan)
        if fields["precision"] == "auto":
            fields["precision"] = _precision(argparse.Namespace(precision="auto"), cluster)
        plan = checked_plan(Plan(**fields), world=world, workload=workload)  # type: ignore[arg-type]
        print(f"plan string: {plan_string(plan)}")
    else:
        plan = plan_to_evaluate(args.evaluate, world=world, workload=workload, precision=_precision(args, cluster))
    estimate = Estimator(shape, workload, cluster=cluster, profile=args.profile).estimate(plan)
    print(format_estimate(estimate, device_memory=cluster.device_memory))
    if args.json:
        Path(args.json).write_text(json.dumps(estimate.as_dict(), indent=1) + "\n")
    return 0 if estimate.fits else 1


def run_plan(args: argparse.Namespace) -> int:
    _check_options(args)
    shape = load_shape(args.model)
    seq = args.seq or shape.config.max_seq_len
    if seq > shape.config.max_seq_len:
        raise ValueError(f"--seq {seq} is longer than the model's context ({shape.config.max_seq_len}); lower it")
    global_batch = args.global_batch or 8 * args.nodes * args.gpus_per_node
    workload = Workload(global_batch, seq, clips=args.max_grad_norm > 0)
    cluster = _cluster(args, shape.hidden, seq)
    if args.calibrate:  # what bf16 buys on this CPU, which plan.precision="auto" counts on
        from plait.planner.calibrate_precision import measure_precision_gain

        print(measure_precision_gain().line())
    active = shape.config.num_active_parameters()
    counted = _count(shape.num_parameters()) + (f" ({_count(active)} active)" if shape.config.moe_experts else "")
    header = (
        f"{shape.name}: {counted} parameters, global batch {global_batch} x {seq} tokens, "
        f"{cluster.nodes} x {cluster.devices_per_node} {cluster.name} ({cluster.device_memory / 2**30:.0f} GiB"
        f"{_host_text(cluster)})"
    )
    if args.evaluate or args.plan:
        print(header)
        return _evaluate(args, shape, workload, cluster)
    space = _space(args, cluster)
    result = search(shape, workload, cluster=cluster, space=space, profile=args.profile)
    print(f"{header}; {len(result.estimates)} valid plans estimated in {result.seconds:.1f} s")
    print(format_table(result, top=args.top))
    if args.json:
        Path(args.json).write_text(json.dumps([e.as_dict() for e in result.estimates], indent=1) + "\n")
    if result.best is None:
        print(explain_no_fit(result, shape, workload=workload, space=space))
        return 1
    print(why_best(result))
    return 0
