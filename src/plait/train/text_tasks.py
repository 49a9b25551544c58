"""`plait train` with a text task: the task a run's [task] kind names, and the BERT / ALBERT / T5
presets that train with masked-LM, masked-LM + sentence order and span corruption.

The loop is the language-model loop (plait.train.loop): the same corpus, loader, engine, logs and
checkpoints. The task decides what each loader row becomes (plait.tasks.text) and which loss counts
its tokens; the model is built from transformers' classes (plait.models.language).

    [model]
    preset = "bert-tiny"
    [task]
    kind = "masked_lm"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from plait.config import Config, Plan
from plait.data.tokenizer import add_special_tokens
from plait.models.language import (
    build_language,
    is_language_preset,
    language_config,
    language_preset_names,
    language_task_kind,
)
from plait.tasks.masked_lm import MaskedLM, SentenceOrderMLM, WordEdges
from plait.tasks.span_corruption import SpanCorruption
from plait.tasks.text import CausalLMTask, TextTask
from plait.train import metrics

TEXT_TASKS = ("masked_lm", "masked_lm_sop", "span_corruption")  # beside causal_lm, the default


def uses_language_preset(config: Config) -> bool:
    """Whether the run trains a BERT / ALBERT / T5 preset (with its task) rather than a causal LM."""
    return config.task.kind in TEXT_TASKS or is_language_preset(config.model.preset)


def text_task(config: Config, *, eot_id: int | None = None, tokenizer: Tokenizer | None = None) -> TextTask:
    """The task of the run's [task] kind; `eot_id`: causal LM's per-document positions (data.document_mask);
    `tokenizer`: the corpus's, which whole-word masking reads word edges from (the loss needs neither)."""
    kind, task, seed, vocab = config.task.kind, config.task, config.train.seed, config.data.vocab_size
    if kind == "masked_lm":
        words = WordEdges.of(tokenizer) if task.whole_word and tokenizer is not None else None
        return MaskedLM(vocab_size=vocab, seed=seed, mask_prob=task.mask_prob, words=words)
    if kind == "masked_lm_sop":
        return SentenceOrderMLM(vocab_size=vocab, seed=seed, mask_prob=task.mask_prob)
    if kind == "span_corruption":
        return SpanCorruption(vocab_size=vocab, seed=seed, noise_density=task.noise_density, mean_span=task.mean_span)
    return CausalLMTask(eot_id=eot_id, loss_chunk=config.train.loss_chunk)


@dataclass(frozen=True)
class LanguageModel:
    """A checked BERT / ALBERT / T5 run: its preset, transformers config and sizes (for the metrics)."""

    preset: str
    hf_config: Any
    build_args: dict[str, Any]  # build_language's keywords: sizes and [model] overrides
    num_parameters: int
    matmul_parameters: int  # all but the embedding tables, plus a tied head's
    num_layers: int
    d_model: int

    def flops_per_token(self, seq_len: int) -> float:
        return metrics.model_flops_per_token(
            num_params=self.matmul_parameters, num_layers=self.num_layers, d_model=self.d_model, seq_len=seq_len
        )


def validate_language(config: Config, *, plan: Plan) -> LanguageModel:
    """Check a BERT / ALBERT / T5 run before any process group exists (ValueError with the fix)."""
    preset, kind = config.model.preset, config.task.kind
    if not is_language_preset(preset) or config.model.pretrained is not None:
        raise ValueError(
            f"task.kind={kind!r} trains one of plait's presets {', '.join(language_preset_names())}, got "
            f"model.preset={preset!r}{' with model.pretrained' if config.model.pretrained else ''}; set model.preset"
        )
    if kind != language_task_kind(preset):
        raise ValueError(
            f"model.preset={preset!r} trains with task.kind={language_task_kind(preset)!r}, got {kind!r}; set "
            f'[task] kind = "{language_task_kind(preset)}"'
        )
    if config.data.document_mask or plan.sequence_parallel:
        raise ValueError(
            f"{preset} attends across the whole sample: set data.document_mask=false and plan.sequence_parallel=false "
            "(sequence parallel with BERT, ALBERT and T5 is not available yet)"
        )
    text_task(config).sample_tokens(config.data.seq_len)  # too short a sample for the task's layout
    overrides = config.model.overrides
    sizes = {"vocab_size": config.data.vocab_size, "max_positions": config.data.seq_len}
    hf_config = language_config(preset, **sizes, **overrides)
    with torch.device("meta"):
        model = build_language(preset, **sizes, **overrides)
    _check_splits(model, plan=plan)
    return LanguageModel(
        preset=preset,
        hf_config=hf_config,
        build_args={**sizes, **overrides},
        num_parameters=sum(p.numel() for p in model.parameters()),
        matmul_parameters=_matmul_parameters(model),
        num_layers=getattr(hf_config, "num_hidden_layers", None) or hf_config.num_layers + hf_config.num_decoder_layers,
        d_model=getattr(hf_config, "hidden_size", None) or hf_config.d_model,
    )


def _check_splits(model: nn.Module, *, plan: Plan) -> None:
    """tp and pp refuse what they cannot split (ALBERT's shared layers under pp, T5 under both), with the reason."""
    if plan.tp > 1:
        from plait.tensor.hf import check_tp

        check_tp(model, plan.tp)
    if plan.pp > 1:
        from plait.pipeline.partition import decoder_layout

        layout = decoder_layout(model)
        num_layers, stages = len(model.get_submodule(layout.layers)), plan.pp * plan.pp_chunks
        if plan.pp_split:  # may leave the end stages layer-less (embedding / head alone)
            from plait.train.setup import check_pp_split

            check_pp_split(plan, num_layers=num_layers)
        elif stages > num_layers:
            raise ValueError(
                f"plan.pp={plan.pp} x plan.pp_chunks={plan.pp_chunks} = {stages} stages but the model has "
                f"{num_layers} layers; use at most {num_layers} stages"
            )


def _matmul_parameters(model: nn.Module) -> int:
    tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    head = model.get_output_embeddings()
    tied = head.weight.numel() if head is not None and id(head.weight) in tables else 0
    return sum(p.numel() for p in model.parameters() if id(p) not in tables) + tied


def build_language_model(language: LanguageModel, *, device: torch.device) -> nn.Module:
    """The run's freshly initialised model (seeded by the caller), on `device`."""
    return build_language(language.preset, **language.build_args).to(device)


def language_model_for(config: Config) -> nn.Module:
    """The model a BERT / ALBERT / T5 run builds, as one plain process builds it (plait verify's reference)."""
    sizes = {"vocab_size": config.data.vocab_size, "max_positions": config.data.seq_len}
    return build_language(config.model.preset, **sizes, **config.model.overrides)


def task_tokenizer(tokenizer: Tokenizer, task: TextTask) -> Tokenizer:
    """The corpus tokenizer with the task's special tokens after its vocabulary (checkpoints keep it, so
    decoding shows [MASK] or <extra_id_0>); ValueError when the vocabulary is not the size the model has."""
    tokens = getattr(task, "tokens", None)
    if tokens is None:
        return tokenizer
    if tokenizer.get_vocab_size() != tokens.vocab_size:
        raise ValueError(
            f"the corpus tokenizer has {tokenizer.get_vocab_size()} tokens, not data.vocab_size={tokens.vocab_size} "
            f"(the corpus is too small for that many); set data.vocab_size={tokenizer.get_vocab_size()}"
        )
    add_special_tokens(tokenizer, tokens.names)
    return tokenizer
