"""[model]: a preset and its overrides, or a pretrained transformers directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plait.config.choices import require


@dataclass
class ModelConfig:
    """A named preset plus field overrides (see `plait.models.preset_names()`), or a pretrained model.

    ``pretrained`` names a local transformers directory (config.json, safetensors weights,
    tokenizer files): `plait train` then continues training that causal LM, and the data is
    tokenized with the directory's tokenizer (``data.vocab_size`` is not used)::

        [model]
        pretrained = "checkpoints/qwen2-0.5b"
    """

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained is None:
            return
        require(
            isinstance(self.pretrained, str) and self.pretrained.strip() != "",
            f"model.pretrained={self.pretrained!r}: give the path of a local transformers directory, "
            'e.g. pretrained = "models/qwen2-0.5b"',
        )
        require(
            not self.overrides,
            f"model.{', model.'.join(sorted(self.overrides))} change fields of plait's presets, but with "
            f"model.pretrained the directory's config.json defines the model; drop the override(s) "
            "(or edit config.json)",
        )
