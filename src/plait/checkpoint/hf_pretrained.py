"""A local transformers directory as the model of ``plait train`` (``[model] pretrained = "DIR"``).

:func:`inspect_pretrained` checks the directory before any process group exists, so every
rank fails at once with one line saying what is wrong and how to fix it: the directory and
its ``config.json``, safetensors weights, a causal LM (what ``AutoModelForCausalLM`` loads),
an entry in plait's architecture registry, and a tokenizer whose vocabulary fits the
model's embedding. :func:`load_pretrained_model` then loads the weights, each tensor-parallel
rank reading only its own slices.

Example:
    >>> pretrained = inspect_pretrained("models/qwen2-0.5b")  # doctest: +SKIP
    >>> model = load_pretrained_model(pretrained, tp_group=None, device=torch.device("cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plait.data.tokenizer import GivenTokenizer
from plait.models.architectures import Architecture, architecture_of

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Any of these makes a directory hold a tokenizer AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
CAUSAL_EXAMPLES = "LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel"
# What a Hugging Face class name's ending says the model computes (the first match wins).
_TASKS = (
    ("LMHeadModel", "a causal LM"),
    ("ForMaskedLM", "a masked language model (fill-mask: it predicts hidden tokens from both sides)"),
    ("ForSequenceClassification", "a sequence classifier"),
    ("ForTokenClassification", "a token classifier"),
    ("ForQuestionAnswering", "an extractive question-answering model"),
    ("ForConditionalGeneration", "an encoder-decoder or multimodal generation model"),
    ("Model", "a bare base model for feature extraction (it outputs hidden states and has no language-model head)"),
)


@dataclass(frozen=True)
class Pretrained:
    """A checked pretrained directory: its config, its model on the meta device, its tokenizer."""

    path: Path
    config: Any  # transformers.PretrainedConfig
    meta_model: nn.Module = field(repr=False, compare=False)  # AutoModelForCausalLM.from_config on meta
    architecture: Architecture
    tokenizer: GivenTokenizer = field(repr=False)

    @property
    def label(self) -> str:
        return f"model.pretrained={self.path}"

    @property
    def num_layers(self) -> int:
        return len(self.meta_model.get_submodule(self.architecture.layers))

    @property
    def embedding_rows(self) -> int:
        return self.meta_model.get_input_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes, when its config says."""
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.meta_model.parameters())

    def matmul_parameters(self) -> int:
        """Parameters that take part in a matmul: all but the embedding tables, plus a tied head's."""
        model = self.meta_model
        tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
        head = model.get_output_embeddings()
        tied = head.weight.numel() if head is not None and id(head.weight) in tables else 0
        return sum(p.numel() for p in model.parameters() if id(p) not in tables) + tied

    def hidden_size(self) -> int:
        return self.meta_model.get_input_embeddings().weight.shape[1]


def inspect_pretrained(path: str | Path) -> Pretrained:
    """Check a pretrained directory for `plait train`; ValueError (one line, with the fix) otherwise."""
    path = Path(path)
    label = f"model.pretrained={path}"
    config = _read_config(path, label=label)
    _require_weights(path, label=label)
    _require_causal_lm(config, label=label)
    meta_model = build_meta_model(config)
    architecture = architecture_of(meta_model, purpose=f"plait train ({label})")
    if not architecture.causal:
        raise ValueError(
            f"{label} holds {type(meta_model).__name__}, an encoder in plait's architecture registry, not a causal "
            f"LM; plait train needs weights that AutoModelForCausalLM loads (such as {CAUSAL_EXAMPLES})"
        )
    _require_no_dropped_aux_loss(config, architecture, label=label)
    rows = meta_model.get_input_embeddings().weight.shape[0]
    tokenizer = read_tokenizer(path, config=config, embedding_rows=rows, label=label)
    return Pretrained(path=path, config=config, meta_model=meta_model, architecture=architecture, tokenizer=tokenizer)


def _require_no_dropped_aux_loss(config: Any, architecture: Architecture, *, label: str) -> None:
    """An HF MoE model adds its load-balancing loss only to the loss it computes from labels, which plait's
    loss functions replace: with ``output_router_logits`` set it would silently not train."""
    if architecture.moe_block is not None and getattr(config, "output_router_logits", False):
        raise ValueError(
            f"{label} sets output_router_logits=true, but transformers adds that load-balancing loss only to the "
            "loss it computes itself, which plait train does not use, so the routers would train without it; set "
            '"output_router_logits": false in its config.json (in Python, plait.models.use_plait_moe(model) '
            "trains a per-layer load-balancing loss instead)"
        )


def build_meta_model(config: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` with every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _read_config(path: Path, *, label: str) -> Any:
    if not path.is_dir():
        problem = "is a file, not a directory" if path.exists() else "does not exist"
        raise ValueError(
            f"{label} {problem}; point it at a local transformers model directory "
            "(config.json, model.safetensors, tokenizer files), as save_pretrained writes it"
        )
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(
            f"{label} has no {CONFIG_FILE}; point it at a transformers model directory written by save_pretrained"
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{label}: transformers cannot read its {CONFIG_FILE} ({reason[:300]})") from None


def _require_weights(path: Path, *, label: str) -> None:
    if any((path / name).is_file() for name in WEIGHT_FILES):
        return
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.safetensors"))
    found = f" (it has {', '.join(others[:3])})" if others else ""
    raise ValueError(
        f"{label} has no weights: no model.safetensors or model.safetensors.index.json{found}; plait reads "
        "safetensors: save the model there with model.save_pretrained(DIR)"
    )


def _task_of(class_name: str) -> str:
    return next((task for ending, task in _TASKS if class_name.endswith(ending)), "not a causal LM")


def _require_causal_lm(config: Any, *, label: str) -> None:
    """The directory's weights are a causal LM's: its config's class (and model_type) load with AutoModelForCausalLM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    architectures = list(getattr(config, "architectures", None) or [])
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if causal_class is not None and (not architectures or any(name in causal_names for name in architectures)):
        return
    saved = architectures[0] if architectures else f"a {model_type!r} model"
    what = _task_of(architectures[0]) if architectures else "a model transformers has no causal-LM class for"
    raise ValueError(
        f"{label} holds {saved} (model_type {model_type!r}): {what}, not a causal LM; plait train continues "
        f"training causal language models and needs weights that AutoModelForCausalLM loads (such as "
        f"{CAUSAL_EXAMPLES})"
    )


def read_tokenizer(path: Path, *, config: Any, embedding_rows: int, label: str) -> GivenTokenizer:
    """The directory's tokenizer, checked to fit the model's embedding and to have an end-of-text token."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{label} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); plait train tokenizes the data "
            f"with the model's own tokenizer, which must fit its {embedding_rows}-row embedding: save it there "
            "with tokenizer.save_pretrained(DIR)"
        )
    tokenizer = _auto_tokenizer(path, label=label)
    size = len(tokenizer)
    if size > embedding_rows:
        raise ValueError(
            f"{label}: its tokenizer has {size} tokens but the model's embedding has {embedding_rows} rows, so "
            f"token ids {embedding_rows}..{size - 1} have no embedding; use the tokenizer the model was trained "
            "with, or grow the embedding (model.resize_token_embeddings(len(tokenizer))) and save_pretrained again"
        )
    eot_id = _end_of_text_id(tokenizer, config)
    if eot_id is None:
        raise ValueError(
            f"{label}: neither its tokenizer nor config.json names an end-of-sequence token, which plait puts "
            "between packed documents; set eos_token in tokenizer_config.json (or eos_token_id in config.json)"
        )
    return GivenTokenizer(json=tokenizer.backend_tokenizer.to_str(), eot_id=eot_id, vocab_size=size)


def _auto_tokenizer(path: Path, *, label: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{label}: transformers cannot load its tokenizer ({reason[:300]})") from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(
            f"{label}: its tokenizer ({type(tokenizer).__name__}) has no fast (tokenizers) form, which plait's "
            "data pipeline uses; save a tokenizer.json there (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
        )
    return tokenizer


def _end_of_text_id(tokenizer: Any, config: Any) -> int | None:
    if isinstance(tokenizer.eos_token_id, int):
        return tokenizer.eos_token_id
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) else None


def tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """The files ``AutoTokenizer.from_pretrained(path).save_pretrained`` writes, by name (a checkpoint keeps them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory(prefix="plait-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def load_pretrained_model(
    pretrained: Pretrained, *, tp_group: Any, device: torch.device, sequence_parallel: bool = False
) -> nn.Module:
    """The directory's causal LM in fp32 and train mode; under tensor parallel each rank reads only its slices.

    Without tensor parallel every rank loads the whole model (ZeRO-3 then shards it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(pretrained.path)
    config.use_cache = False  # training: no key/value cache
    if tp_group is None:
        model = AutoModelForCausalLM.from_pretrained(pretrained.path, config=config, dtype=torch.float32)
        model = model.to(device)
    else:
        from plait.tensor.hf import load_pretrained_tp

        model = load_pretrained_tp(
            AutoModelForCausalLM,
            pretrained.path,
            group=tp_group,
            config=config,
            dtype=torch.float32,
            device=device,
            sequence_parallel=sequence_parallel,
        )
    return model.train()
