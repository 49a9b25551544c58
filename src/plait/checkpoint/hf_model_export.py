"""Export a plait checkpoint of a Hugging Face model (HF parameter names) as a transformers directory.

The checkpoint may come from any plan (tp, ZeRO-3, pp: `load_checkpoint` assembles the pieces).
The model's transformers config comes from the checkpoint (``plait train`` with
``[model] pretrained`` stores it, and so does ``engine.save(path, extra=hf_record(model))``) or is
passed in. The directory holds ``config.json`` (that config, dtype set to the weights'),
``model.safetensors`` (tied weights stored once, as ``save_pretrained`` does) and the tokenizer
files when the checkpoint has them.

Example:
    >>> engine.save("ckpt/step-10", extra=hf_record(model, tokenizer=tokenizer))  # doctest: +SKIP
    >>> export_hf_model(*load_checkpoint("ckpt/step-10")[:2], out_dir="hf/qwen2")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from plait.models.hf_moe import hf_config_dict, hf_names

HF_RECORD = "hf"  # the trainer-state key that holds a model's transformers config and tokenizer files
MODEL_FILE = "model.safetensors"


def hf_record(model: nn.Module, *, tokenizer: Any = None) -> dict[str, Any]:
    """What a checkpoint of a Hugging Face ``model`` needs to export: pass it as ``engine.save(..., extra=)``.

    ``tokenizer`` (a transformers tokenizer, or a directory holding one) is stored with it.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"hf_record needs a Hugging Face model (with .config), got {type(model).__name__}")
    record: dict[str, Any] = {"config": hf_config_dict(model)}
    if tokenizer is not None:
        record["tokenizer_files"] = _tokenizer_files(tokenizer)
    return {HF_RECORD: record}


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    if isinstance(tokenizer, str | os.PathLike):
        from plait.checkpoint.hf_pretrained import tokenizer_files

        return tokenizer_files(tokenizer)
    with tempfile.TemporaryDirectory(prefix="plait-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def is_hf_checkpoint(model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], config: dict) -> bool:
    """Whether a checkpoint holds a Hugging Face model (rather than plait's GPT)."""
    if HF_RECORD in trainer_state or (config.get("model") or {}).get("pretrained"):
        return True
    return "model" not in config and "embed.weight" not in model_state


def read_hf_config(source: str | os.PathLike | dict[str, Any]) -> Any:
    """A transformers config from a dict, a ``config.json`` file or a directory holding one."""
    from transformers import AutoConfig

    if isinstance(source, dict):
        values = dict(source)
    else:
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"{source}: no config.json there; pass a transformers model directory or its config.json")
        values = json.loads(path.read_text())
    if "model_type" not in values:
        raise ValueError("the Hugging Face config has no model_type; pass the config.json save_pretrained wrote")
    return AutoConfig.for_model(**values)


def checkpoint_hf_config(trainer_state: dict[str, Any], *, source: str, override: Any = None) -> Any:
    """The checkpoint's transformers config, or ``override``; ValueError saying how to give one."""
    if override is not None:
        return read_hf_config(override)
    record = trainer_state.get(HF_RECORD) or {}
    if "config" not in record:
        raise ValueError(
            f"{source} holds a Hugging Face model's weights but not its config; pass the model's config "
            "(plait export CKPT --to hf OUT --config DIR_OR_CONFIG_JSON), or save with "
            "engine.save(path, extra=plait.checkpoint.hf_model_export.hf_record(model))"
        )
    return read_hf_config(record["config"])


def build_hf_model(config: Any, *, device: str | torch.device = "meta") -> nn.Module:
    """The model class its config names (``architectures``), else AutoModelForCausalLM, on ``device``."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    model_class = getattr(transformers, names[0], None) if names else None
    with torch.device(device):
        if model_class is not None and hasattr(model_class, "_from_config"):
            return model_class._from_config(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def hf_tensors(model_state: dict[str, torch.Tensor], model: nn.Module, *, source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors named and shaped as ``model``'s state dict, each tied weight once."""
    expected = model.state_dict(keep_vars=True)
    aliases = _tied_aliases(model)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(n for n in parameters if n not in model_state and n not in aliases)
    unexpected = sorted(n for n in model_state if n not in expected)
    if missing or unexpected:
        raise ValueError(
            f"the weights in {source} do not fit {type(model).__name__}: missing {missing[:4] or 'none'}, "
            f"unexpected {unexpected[:4] or 'none'}; is this the checkpoint of that model?"
        )
    tensors = {}
    for name, tensor in expected.items():
        if name in aliases or name not in model_state:
            continue  # a tied copy, or a buffer the model rebuilds
        if tuple(model_state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source}: {name} has shape {tuple(model_state[name].shape)} but the config implies "
                f"{tuple(tensor.shape)}; pass the config the model was trained with"
            )
        tensors[name] = model_state[name].detach().contiguous()
    return tensors


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are an earlier name's parameter (HF keeps the first: the input embedding)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def write_hf_model(
    directory: Path, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], *, config: Any, source: str
) -> str:
    """Write config.json, model.safetensors and the tokenizer into ``directory``; return the model_type."""
    model = build_hf_model(config)
    # a model trained with its MoE blocks swapped for plait MoELayers (plait.models.use_plait_moe)
    tensors = hf_tensors(hf_names(model, model_state), model, source=source)
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    config.architectures = [type(model).__name__]
    config.dtype = dtype  # the weights' own: from_pretrained then computes what plait did
    config.save_pretrained(directory)
    safetensors.torch.save_file(tensors, directory / MODEL_FILE, metadata={"format": "pt"})
    for name, data in ((trainer_state.get(HF_RECORD) or {}).get("tokenizer_files") or {}).items():
        (directory / Path(name).name).write_bytes(data)
    return config.model_type


def has_tokenizer_files(trainer_state: dict[str, Any]) -> bool:
    return bool((trainer_state.get(HF_RECORD) or {}).get("tokenizer_files"))
