"""Models plait trains out of the box, the named sizes they come in, and the registry of
architectures (plait's GPT and the Hugging Face families) every strand reads.

Example:
    >>> from plait import models
    >>> model = models.build("tiny-llama", max_seq_len=128)
    >>> models.preset_names()[:2]
    ['tiny', 'tiny-llama']
"""

from plait.models.factory import build, resolve_config
from plait.models.gpt import GPT, GPTConfig
from plait.models.hf_moe import use_hf_moe, use_plait_moe
from plait.models.presets import get_preset, preset_names

__all__ = [
    "GPT",
    "GPTConfig",
    "build",
    "get_preset",
    "preset_names",
    "resolve_config",
    "use_hf_moe",
    "use_plait_moe",
]
