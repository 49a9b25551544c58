"""What `plait eval` evaluates: checkpoints (plait's, or Hugging Face directories imported through
plait's import) and the held-out data of the run that trained them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from plait.checkpoint.io import read_trainer_state
from plait.checkpoint.lengths import model_context, trained_length
from plait.config import DataConfig
from plait.data.heldout import SPLIT_VERSION, HeldOut, held_out
from plait.data.shards import META_FILE

_MANIFEST = "manifest.json"
_HF_CONFIG = "config.json"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint to evaluate: its directory, the name it is shown under, its step and tokenizer."""

    path: Path
    label: str
    step: int
    tokenizer_json: str
    trained_by_plait: bool  # `plait train` wrote it (its config names the run's data)
    data: dict[str, Any]  # its config's [data]
    context: int  # the model's positions
    trained_length: int | None  # the longest sequence its training recorded (plait.checkpoint.lengths)
    origin: Path | None = None  # the Hugging Face directory it was imported from


def check_paths(paths: list[str]) -> None:
    """Every path exists and is a plait checkpoint or a Hugging Face model directory."""
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise ValueError(
                f"{path} does not exist; pass plait checkpoint directories (<out_dir>/checkpoints/step-N) "
                "or Hugging Face model directories"
            )
        if not path.is_dir() or not ((path / _MANIFEST).is_file() or (path / _HF_CONFIG).is_file()):
            raise ValueError(
                f"{path} is neither a plait checkpoint (no {_MANIFEST}) nor a Hugging Face model directory "
                f"(no {_HF_CONFIG}); pass one of those"
            )


def is_hf_dir(path: Path) -> bool:
    return not (path / _MANIFEST).is_file() and (path / _HF_CONFIG).is_file()


def read_checkpoint(path: Path, *, origin: Path | None = None) -> Checkpoint:
    """The checkpoint's step, tokenizer, data settings and lengths, without reading its weights."""
    trainer_state = read_trainer_state(path)
    tokenizer = trainer_state.get("tokenizer")
    if not tokenizer:
        raise ValueError(f"{path} holds no tokenizer (imported without tokenizer.json?); plait eval needs one")
    config = json.loads((path / _HF_CONFIG).read_text())
    return Checkpoint(
        path=path,
        label=(origin or path).name,
        step=int(trainer_state.get("step", 0)),
        tokenizer_json=tokenizer,
        trained_by_plait="loader" in trainer_state,
        data=config.get("data") or {},
        context=model_context(path, config, trainer_state),
        trained_length=trained_length(config, trainer_state),
        origin=origin,
    )


@dataclass(frozen=True)
class EvalData:
    """The held-out split every checkpoint is evaluated on, and the tokenizer it was tokenized with."""

    part: HeldOut
    tokenizer_json: str
    source: str  # where the split and tokenizer come from, for messages and the report


def eval_data(first: Checkpoint) -> EvalData:
    """The run's held-out split (its data cache's record) for a `plait train` checkpoint; for an imported
    model the default corpus's split, with the model's own tokenizer."""
    defaults = DataConfig()
    if not first.trained_by_plait:
        part = held_out(defaults.corpus, val_fraction=defaults.val_fraction)
        return EvalData(
            part=part,
            tokenizer_json=first.tokenizer_json,
            source=f"{defaults.corpus}'s split, {first.origin or first.path}'s own tokenizer",
        )
    from plait.data.shards import prepare_dataset

    data = {**vars(defaults), **first.data}
    prepared = prepare_dataset(
        data["corpus"], vocab_size=data["vocab_size"], cache_dir=data["cache_dir"], val_fraction=data["val_fraction"]
    )
    meta = json.loads((prepared.tokenizer_path.parent / META_FILE).read_text())
    split = meta.get("split") or {}
    if split and split.get("version") != SPLIT_VERSION:
        raise ValueError(
            f"the data cache {prepared.tokenizer_path.parent} records held-out split version {split.get('version')}, "
            f"this plait makes version {SPLIT_VERSION}; rebuild the cache (delete it) so eval and training agree"
        )
    part = held_out(data["corpus"], val_fraction=data["val_fraction"], threshold=split.get("val_threshold"))
    tokenizer = prepared.tokenizer_path.read_text()
    return EvalData(part=part, tokenizer_json=tokenizer, source=str(prepared.tokenizer_path))


def check_tokenizers(checkpoints: list[Checkpoint], data: EvalData) -> None:
    """Every checkpoint's tokenizer is the eval data's: scores of other tokens would mean nothing."""
    expected = _normalised(data.tokenizer_json)
    for checkpoint in checkpoints:
        if _normalised(checkpoint.tokenizer_json) != expected:
            raise ValueError(
                f"{checkpoint.path}: its tokenizer differs from the eval data's ({data.source}); evaluate checkpoints "
                "that share one tokenizer together, each with the run's data it was trained on"
            )


def _normalised(tokenizer_json: str) -> str:
    return Tokenizer.from_str(tokenizer_json).to_str()


def eot_id(tokenizer: Tokenizer) -> int:
    """The end-of-text token that separates documents (plait's <|endoftext|>, else a model's own)."""
    for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"):
        token = tokenizer.token_to_id(name)
        if token is not None:
            return token
    return 0
