"""Plan and training configuration: dataclasses that validate themselves.

A config is four sections (`model`, `data`, `plan`, `train`) that map one to
one onto TOML tables and onto `--set section.key=value` overrides.
"""

from plait.config.choices import (
    AXES,
    COMPILE_MODES,
    LR_SCHEDULES,
    NONFINITE_ACTIONS,
    OFFLOAD_TIERS,
    OFFLOADED_STATES,
    OPTIMIZERS,
    PP_SCHEDULES,
    PRECISIONS,
    RECOMPUTE_MODES,
    REDUCE_OPS,
    TASKS,
    ZERO3_GATHER_MODES,
    ZERO_SHARD_MODES,
)
from plait.config.data import DataConfig
from plait.config.loading import (
    SECTIONS,
    apply_overrides,
    build_section,
    config_from_dict,
    load_config,
    read_toml,
)
from plait.config.model import ModelConfig
from plait.config.plan import Plan
from plait.config.run import Config, model_config_for
from plait.config.task import TaskConfig
from plait.config.train import TrainConfig

__all__ = [
    "AXES",
    "COMPILE_MODES",
    "LR_SCHEDULES",
    "NONFINITE_ACTIONS",
    "OFFLOADED_STATES",
    "OFFLOAD_TIERS",
    "OPTIMIZERS",
    "PP_SCHEDULES",
    "PRECISIONS",
    "RECOMPUTE_MODES",
    "REDUCE_OPS",
    "SECTIONS",
    "TASKS",
    "ZERO3_GATHER_MODES",
    "ZERO_SHARD_MODES",
    "Config",
    "DataConfig",
    "ModelConfig",
    "Plan",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "build_section",
    "config_from_dict",
    "load_config",
    "model_config_for",
    "read_toml",
]
