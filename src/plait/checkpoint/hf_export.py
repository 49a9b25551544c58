"""Hugging Face export and import: ``plait export CKPT --to hf OUT`` and ``plait import HF_DIR OUT``.

A checkpoint of plait's GPT exports as ``GPT2LMHeadModel`` or ``LlamaForCausalLM``, and one of
its MoE GPT as ``MixtralForCausalLM`` (whichever computes exactly what the plait model does; names, layouts and config:
``hf_weights`` and ``hf_config``). A checkpoint of a Hugging Face model (``plait train``
with ``[model] pretrained``, or ``engine.save`` of any HF model under any plan) exports
as that model's own class (``hf_model_export``). Either way the directory holds
``config.json``, ``model.safetensors`` and the tokenizer when the checkpoint has one.

Example:
    >>> export_hf("runs/gpt-tiny/checkpoints/step-000200", "hf/gpt-tiny")  # doctest: +SKIP
    'gpt2'
    >>> import transformers  # doctest: +SKIP
    >>> model = transformers.AutoModelForCausalLM.from_pretrained("hf/gpt-tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tokenizers import Tokenizer

from plait.checkpoint import hf_model_export
from plait.checkpoint.hf_config import ARCHITECTURES, GPT2, MIXTRAL, gpt_config_from_hf, hf_config_dict, hf_family
from plait.checkpoint.hf_weights import check_plait_state, hf_to_plait, plait_to_hf
from plait.checkpoint.io import MANIFEST_FILE, load_checkpoint, save_checkpoint
from plait.checkpoint.lora_merge import merge_lora
from plait.config import Config, DataConfig, ModelConfig, config_from_dict, model_config_for
from plait.data.tokenizer import EOT, TOKENIZER_FILE
from plait.models.gpt import GPTConfig

HF_CONFIG_FILE = "config.json"
HF_MODEL_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The presets an import's overrides start from: every GPTConfig field is overridden,
# so the preset only says which family the checkpoint came from.
_IMPORT_PRESETS = {GPT2: "tiny", "llama": "tiny-llama", MIXTRAL: "mixtral-tiny"}


def export_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, hf_config: Any = None) -> str:
    """Write a plait checkpoint as a Hugging Face model directory; return its ``model_type``.

    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` then loads it and
    reproduces plait's logits. ``out_dir`` must be new or empty; it appears complete or
    not at all. plait's GPT exports as ``"gpt2"`` or ``"llama"``, its MoE GPT as ``"mixtral"``;
    raises ValueError when no class can express it (``parallel_block``, options mixed across
    the families, an MoE model with GELU experts or token dropping). A Hugging Face model exports as its own class, with the config the
    checkpoint holds or ``hf_config`` (a dict, a config.json, or a directory with one).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    _require_checkpoint(checkpoint_dir)
    _require_fresh(out_dir)
    model_state, trainer_state, raw_config = load_checkpoint(checkpoint_dir)
    model_state = merge_lora(model_state, trainer_state.get("lora"))  # a LoRA run exports merged (plait.recipes.lora)
    if hf_config is not None or hf_model_export.is_hf_checkpoint(model_state, trainer_state, raw_config):
        return _export_hf_model(model_state, trainer_state, source=checkpoint_dir, out_dir=out_dir, hf_config=hf_config)
    config = model_config_for(config_from_dict(raw_config))
    family = hf_family(config)
    check_plait_state(model_state, config, source=str(checkpoint_dir))
    tensors = plait_to_hf(model_state, config, family=family)
    tokenizer_json = trainer_state.get("tokenizer")
    eos_token_id = _eos_token_id(tokenizer_json) if tokenizer_json else None
    dtype = str(model_state["embed.weight"].dtype).removeprefix("torch.")
    hf_config = hf_config_dict(config, family=family, dtype=dtype, eos_token_id=eos_token_id)
    with _atomic_dir(out_dir) as staging:
        safetensors.torch.save_file(tensors, staging / HF_MODEL_FILE, metadata={"format": "pt"})
        _write_json(staging / HF_CONFIG_FILE, hf_config)
        if tokenizer_json:
            _write_tokenizer(staging, tokenizer_json, max_seq_len=config.max_seq_len, has_eot=eos_token_id is not None)
    return family


def _export_hf_model(
    model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], *, source: Path, out_dir: Path, hf_config: Any
) -> str:
    config = hf_model_export.checkpoint_hf_config(trainer_state, source=str(source), override=hf_config)
    with _atomic_dir(out_dir) as staging:
        model_type = hf_model_export.write_hf_model(
            staging, model_state, trainer_state, config=config, source=str(source)
        )
        tokenizer_json = trainer_state.get("tokenizer")
        if tokenizer_json and not hf_model_export.has_tokenizer_files(trainer_state):
            eos_token_id = _eos_token_id(tokenizer_json)
            _write_tokenizer(
                staging, tokenizer_json, max_seq_len=_max_positions(config), has_eot=eos_token_id is not None
            )
    return model_type


def _max_positions(config: Any) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


def import_hf(hf_dir: str | os.PathLike, out_checkpoint_dir: str | os.PathLike) -> str:
    """Turn a Hugging Face Llama, Mixtral or GPT-2 directory into a plait checkpoint; return the family.

    The checkpoint loads with ``load_checkpoint`` and samples with ``plait generate``
    (which needs the directory's ``tokenizer.json``). Its config is the preset of the
    family with every GPTConfig field overridden; its trainer state holds step 0 and
    the tokenizer, no optimizer state. Tensors keep the checkpoint's dtype.
    """
    hf_dir, out_checkpoint_dir = Path(hf_dir), Path(out_checkpoint_dir)
    family, model_config = gpt_config_from_hf(_read_hf_config(hf_dir))
    model_state = hf_to_plait(_read_hf_tensors(hf_dir), model_config, family=family)
    config = _plait_config(model_config, family=family)
    tokenizer_file = hf_dir / TOKENIZER_FILE
    trainer_state = {
        "step": 0,
        "tokenizer": tokenizer_file.read_text() if tokenizer_file.is_file() else None,
        "imported_from": {"format": "huggingface", "architecture": ARCHITECTURES[family], "path": str(hf_dir)},
    }
    _require_fresh(out_checkpoint_dir)
    save_checkpoint(
        out_checkpoint_dir, model_state=model_state, trainer_state=trainer_state, config=dataclasses.asdict(config)
    )
    return family


def _require_checkpoint(path: Path) -> None:
    if not (path / MANIFEST_FILE).is_file():
        raise ValueError(
            f"{path} is not a plait checkpoint (no {MANIFEST_FILE}); use a directory under <out_dir>/checkpoints"
        )


def _require_fresh(path: Path) -> None:
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not an empty directory; choose a new output directory")


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """A staging directory beside ``target``, renamed onto it (new or empty) when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".tmp-{target.name}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, target)  # rename(2) replaces an empty directory
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _parse_tokenizer(tokenizer_json: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(f"the checkpoint's tokenizer is not valid tokenizers JSON ({err})") from None


def _eos_token_id(tokenizer_json: str) -> int | None:
    return _parse_tokenizer(tokenizer_json).token_to_id(EOT)


def _write_tokenizer(directory: Path, tokenizer_json: str, *, max_seq_len: int, has_eot: bool) -> None:
    """``tokenizer.json`` and the least ``tokenizer_config.json`` that ``AutoTokenizer`` loads."""
    (directory / TOKENIZER_FILE).write_text(tokenizer_json)
    settings: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        # Byte-level BPE decodes exactly; clean-up would drop the space in "x ." (source code).
        "clean_up_tokenization_spaces": False,
    }
    if has_eot:
        settings |= {"bos_token": EOT, "eos_token": EOT}
    _write_json(directory / HF_TOKENIZER_CONFIG_FILE, settings)


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / HF_CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"{hf_dir} has no {HF_CONFIG_FILE}; pass a Hugging Face model directory (written by save_pretrained)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint."""
    if (hf_dir / HF_MODEL_FILE).is_file():
        return safetensors.torch.load_file(hf_dir / HF_MODEL_FILE)
    index = hf_dir / HF_INDEX_FILE
    if not index.is_file():
        raise ValueError(
            f"{hf_dir} has no {HF_MODEL_FILE} or {HF_INDEX_FILE}; save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors |= safetensors.torch.load_file(hf_dir / shard)
    return tensors


def _plait_config(model_config: GPTConfig, *, family: str) -> Config:
    """A plait Config whose model section rebuilds ``model_config`` exactly."""
    vocab_size = model_config.vocab_size
    if vocab_size <= 256:
        raise ValueError(
            f"the model's vocab_size={vocab_size} is too small for a plait config (data.vocab_size must exceed 256)"
        )
    data = DataConfig(vocab_size=vocab_size, seq_len=min(DataConfig.seq_len, model_config.max_seq_len))
    model = ModelConfig(preset=_IMPORT_PRESETS[family], overrides=dataclasses.asdict(model_config))
    config = Config(model=model, data=data)
    assert model_config_for(config) == model_config, "the imported config must rebuild the same model"
    return config
