"""Pipeline parallel: cost-balanced stages, p2p between them, and GPipe, 1F1B, interleaved and ZB-H1 schedules."""

from plait.pipeline.build import Pipeline, build_pipeline
from plait.pipeline.partition import balanced_split, layer_costs, partition_layers
from plait.pipeline.runtime import PipelineRunner
from plait.pipeline.schedules import build_schedule
from plait.pipeline.simulate import simulate
from plait.pipeline.stage import PipelineStage, build_stage, build_stage_chunks

__all__ = [
    "Pipeline",
    "PipelineRunner",
    "PipelineStage",
    "balanced_split",
    "build_pipeline",
    "build_schedule",
    "build_stage",
    "build_stage_chunks",
    "layer_costs",
    "partition_layers",
    "simulate",
]
