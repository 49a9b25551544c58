"""plait: large-model training on PyTorch, every parallel strand in one plan."""

from plait import losses, models, moe, optim
from plait.config import Config, DataConfig, ModelConfig, Plan, TrainConfig, load_config
from plait.engine import Engine, StepResult, boost

__all__ = [
    "Config",
    "DataConfig",
    "Engine",
    "ModelConfig",
    "Plan",
    "StepResult",
    "TrainConfig",
    "boost",
    "load_config",
    "losses",
    "models",
    "moe",
    "optim",
]
__version__ = "0.1.0"
