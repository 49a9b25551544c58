"""How many tokens `plait eval` shows a model at once: the longest sequence its training recorded.

A model trained at sequence length L never had a loss at positions L and beyond (learned position
embeddings there only decayed), so scoring a longer window adds noise to every task. The window is
the recorded training length, at most the model's context; ``--max-length`` overrides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plait.config import DataConfig


def trained_length(config: dict[str, Any], trainer_state: dict[str, Any]) -> int | None:
    """The longest sequence length the checkpoint's training recorded: `plait train`'s data.seq_len, a
    `plait finetune` run's own data.seq_len; None for weights whose positions someone else trained (a
    Hugging Face model, imported or fine-tuned from one), which then get their whole context."""
    if (config.get("model") or {}).get("pretrained"):
        return None
    lengths = []
    if "loader" in trainer_state:  # `plait train` wrote it (a fine-tune keeps its base's record)
        lengths.append(int((config.get("data") or {}).get("seq_len", DataConfig().seq_len)))
    finetune = ((trainer_state.get("finetune") or {}).get("data") or {}).get("seq_len")
    if finetune is not None:
        lengths.append(int(finetune))
    return max(lengths, default=None)


def model_context(path: Path, config: dict[str, Any], trainer_state: dict[str, Any]) -> int:
    """The model's positions, from its configs alone (no weights read), as plait.train.generate builds it."""
    from plait.checkpoint import hf_model_export
    from plait.config import config_from_dict, model_config_for
    from plait.train.generate import config_context_length

    # no model state: a checkpoint without a [model] config is taken for a Hugging Face model, as loading does
    if hf_model_export.is_hf_checkpoint({}, trainer_state, config):
        return config_context_length(hf_model_export.checkpoint_hf_config(trainer_state, source=str(path)))
    return model_config_for(config_from_dict(config)).max_seq_len


def scoring_window(*, label: str, context: int, trained: int | None, override: int | None) -> int:
    """``override`` (refused past the model's context), else the trained length, never past the context."""
    if override is not None:
        if override > context:
            raise ValueError(
                f"--max-length {override}: {label} has {context} positions; give at most {context} "
                f"(or leave it out for the length it was trained at, {min(trained or context, context)})"
            )
        return override
    return min(trained or context, context)
