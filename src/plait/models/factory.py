"""``build``: a GPT from a preset name or a GPTConfig, with field overrides."""

from __future__ import annotations

import dataclasses

from plait.models.gpt import GPT
from plait.models.gpt_config import GPTConfig, config_field_names
from plait.models.presets import get_preset


def resolve_config(name_or_config: str | GPTConfig, **overrides: object) -> GPTConfig:
    """The GPTConfig for a preset name or config, with ``overrides`` replacing fields.

    The result is validated again, so overrides that break the shape raise ValueError.
    """
    if isinstance(name_or_config, GPTConfig):
        config = name_or_config
    elif isinstance(name_or_config, str):
        config = get_preset(name_or_config)
    else:
        raise TypeError(f"expected a preset name or a GPTConfig, got {type(name_or_config).__name__}")
    valid = config_field_names()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}")
    return dataclasses.replace(config, **overrides) if overrides else config


def build(name_or_config: str | GPTConfig, **overrides: object) -> GPT:
    """Build a GPT from a preset name or a GPTConfig, with fields replaced by ``overrides``.

    Example:
        >>> model = build("tiny", vocab_size=1000, max_seq_len=128)
        >>> model.config.vocab_size
        1000
    """
    return GPT(resolve_config(name_or_config, **overrides))
