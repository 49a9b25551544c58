"""The data-parallel family: bucketed data parallel, and (later) ZeRO stages 1-3."""

from plait.zero.buckets import GradBuckets, plan_buckets
from plait.zero.data_parallel import DataParallel

__all__ = ["DataParallel", "GradBuckets", "plan_buckets"]
