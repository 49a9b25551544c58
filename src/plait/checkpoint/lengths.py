"""How many tokens a checkpoint is shown at once (`plait eval`'s scored windows, `plait generate`'s and RL
rollouts' prompt + new tokens): the longest sequence its training recorded, never past its context.

A model trained at sequence length L never had a loss at positions L and beyond (learned position
embeddings there only decayed), so scoring or sampling a longer window reads positions that were never
trained. The window is the recorded training length, at most the model's context; ``--max-length``
overrides it (up to the context).

Every stage of a checkpoint's history counts: `plait train` records data.seq_len (with its "loader"), a
`plait finetune` run its own data.seq_len (under "finetune"), and a checkpoint trained further from
another (a fine-tune's base, a `plait train --resume`) keeps that one's length as ``BASE_LENGTH``, so a
fine-tune of a fine-tune keeps the longest. Positions someone else trained (a Hugging Face model,
imported or named by model.pretrained, and anything trained further from one) claim the whole context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plait.checkpoint import hf_model_export
from plait.checkpoint.io import CONFIG_FILE, TRAINER_FILE, check_files, complete_manifest, read_trainer_state
from plait.config import DataConfig, config_from_dict, model_config_for

# trainer-state entry: the trained length of the checkpoint this one was trained from (None: HF positions)
BASE_LENGTH = "base_trained_length"


def trained_length(config: dict[str, Any], trainer_state: dict[str, Any]) -> int | None:
    """The longest sequence length any stage of the checkpoint's training recorded; None for weights whose
    positions someone else trained (a Hugging Face model, imported or fine-tuned from one), which then get
    their whole context."""
    if (config.get("model") or {}).get("pretrained") or "imported_from" in trainer_state:
        return None
    if BASE_LENGTH in trainer_state and trainer_state[BASE_LENGTH] is None:
        return None  # trained further from a Hugging Face model
    lengths = [trainer_state[BASE_LENGTH]] if trainer_state.get(BASE_LENGTH) is not None else []
    if "loader" in trainer_state:  # `plait train` wrote it (a fine-tune keeps its base's record)
        lengths.append(int((config.get("data") or {}).get("seq_len", DataConfig().seq_len)))
    finetune = ((trainer_state.get("finetune") or {}).get("data") or {}).get("seq_len")
    if finetune is not None:
        lengths.append(int(finetune))
    return max(lengths, default=None)


def lineage(config: dict[str, Any], trainer_state: dict[str, Any]) -> dict[str, int | None]:
    """The trainer-state entry a checkpoint trained further from this one keeps: this one's trained length."""
    return {BASE_LENGTH: trained_length(config, trainer_state)}


def checkpoint_lineage(path: Path) -> dict[str, int | None]:
    """`lineage` of the plait checkpoint at ``path`` (its config.json and trainer state; no weights read)."""
    return lineage(json.loads((Path(path) / CONFIG_FILE).read_text()), read_trainer_state(path))


def config_context_length(config: Any) -> int:
    """The positions of a plait GPTConfig or a transformers config."""
    return (
        getattr(config, "max_seq_len", None) or getattr(config, "max_position_embeddings", None) or config.n_positions
    )


def model_context(path: Path, config: dict[str, Any], trainer_state: dict[str, Any]) -> int:
    """The model's positions, from its configs alone (no weights read), as plait.train.generate builds it."""
    # no model state: a checkpoint without a [model] config is taken for a Hugging Face model, as loading does
    if hf_model_export.is_hf_checkpoint({}, trainer_state, config):
        return config_context_length(hf_model_export.checkpoint_hf_config(trainer_state, source=str(path)))
    return model_config_for(config_from_dict(config)).max_seq_len


def inference_window(*, label: str, context: int, trained: int | None, override: int | None) -> int:
    """``override`` (refused past the model's context), else the trained length, never past the context."""
    if override is not None:
        if override > context:
            raise ValueError(
                f"--max-length {override}: {label} has {context} positions; give at most {context} "
                f"(or leave it out for the length it was trained at, {min(trained or context, context)})"
            )
        return override
    return min(trained or context, context)


def checkpoint_window(path: Path, *, override: int | None = None) -> int:
    """`inference_window` of the plait checkpoint at ``path``, from its configs alone (no weights read; those
    two files checked against the manifest first, as loading checks every file)."""
    check_files(path, complete_manifest(path), (CONFIG_FILE, TRAINER_FILE))
    config, trainer_state = json.loads((Path(path) / CONFIG_FILE).read_text()), read_trainer_state(path)
    context = model_context(path, config, trainer_state)
    return inference_window(
        label=str(path), context=context, trained=trained_length(config, trainer_state), override=override
    )
