"""The planner: memory and step time of every plan, estimated before launch, and the best plan chosen.

>>> from plait.planner import Cluster, Workload, load_shape, search
>>> result = search(load_shape("llama-7b"), Workload(global_batch=64, seq_len=4096),
...                 cluster=Cluster.preset("h100", nodes=1))
>>> result.best.plan                                   # doctest: +SKIP
"""

from plait.planner.activations import head_working_bytes, layer_activations
from plait.planner.cluster import PRESETS, Cluster, Link, parse_bytes
from plait.planner.estimate import Estimate, Estimator, describe
from plait.planner.memory import MemoryBreakdown, MemoryModel, zero_paper_bytes
from plait.planner.search import SearchResult, SearchSpace, search
from plait.planner.shape import ModelShape, load_shape
from plait.planner.timing import TimeBreakdown, TimeModel
from plait.planner.workload import Workload

__all__ = [
    "PRESETS",
    "Cluster",
    "Estimate",
    "Estimator",
    "Link",
    "MemoryBreakdown",
    "MemoryModel",
    "ModelShape",
    "SearchResult",
    "SearchSpace",
    "TimeBreakdown",
    "TimeModel",
    "Workload",
    "describe",
    "head_working_bytes",
    "layer_activations",
    "load_shape",
    "parse_bytes",
    "search",
    "zero_paper_bytes",
]
