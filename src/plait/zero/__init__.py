"""The data-parallel family: plait's bucketed data parallel and ZeRO stages 1-3 over flat, dp-sharded units."""

from plait.zero.buckets import GradBuckets, plan_buckets
from plait.zero.data_parallel import DataParallel

__all__ = ["DataParallel", "GradBuckets", "plan_buckets"]
