"""`plait train --plan auto`: the planner's best plan for a training config on this machine."""

from __future__ import annotations

import dataclasses

from plait.config import Config, Plan, model_config_for
from plait.planner.advice import NoPlanFits, explain_no_fit
from plait.planner.cluster import Cluster
from plait.planner.search import SearchResult, SearchSpace, search
from plait.planner.shape import ModelShape
from plait.planner.workload import Workload

# Fields of the user's plan that the search does not choose and auto keeps.
_KEPT = ("precision", "bucket_mb", "reduce_op")


def local_cluster(world_size: int, *, precision: str = "fp32") -> Cluster:
    """This machine: a data-sheet preset for a known GPU, else a calibration of `world_size` CPU ranks
    timing matmuls in `precision`."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for key in ("h200", "h100", "a100-80gb" if "80" in name else "a100-40gb"):
            if key.split("-")[0] in name:
                return Cluster.preset(key, devices_per_node=world_size)
    from plait.amp.policy import PrecisionPolicy
    from plait.planner.calibrate import Probe, calibrate

    return calibrate(world_size, probe=Probe(dtype=PrecisionPolicy.from_name(precision).param_dtype))


def auto_plan(config: Config, *, world_size: int, cluster: Cluster | None = None) -> tuple[Plan, SearchResult]:
    """The fastest plan that fits for `config` on `world_size` ranks; NoPlanFits says what would fit."""
    shape = ModelShape(model_config_for(config), name=config.model.preset)
    workload = Workload(config.train.global_batch, config.data.seq_len, clips=config.train.max_grad_norm > 0)
    precision = resolved_precision(config.plan.precision)  # the ranks resolve "auto" the same way
    cluster = cluster or local_cluster(world_size, precision=precision)
    if cluster.num_devices != world_size:
        cluster = cluster.replace(nodes=1, devices_per_node=world_size)
    space = SearchSpace(precision=precision)
    result = search(shape, workload, cluster=cluster, space=space)
    if result.best is None:
        raise NoPlanFits(explain_no_fit(result, shape, workload=workload, space=space))
    kept = {name: getattr(config.plan, name) for name in _KEPT}
    return dataclasses.replace(result.best.plan, **kept), result


def resolved_precision(precision: str) -> str:
    """`precision`, with "auto" resolved for this machine's device (plait.distributed.precision)."""
    from plait.distributed.launch import default_device_type
    from plait.distributed.precision import resolve_precision

    return resolve_precision(precision, device_type=default_device_type()).precision


def plan_overrides(plan: Plan) -> list[str]:
    """`--set plan.KEY=VALUE` arguments that reproduce `plan` in a launched rank."""
    items = []
    for key, value in dataclasses.asdict(plan).items():
        text = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value
        items += ["--set", f"plan.{key}={text}"]
    return items
